#!/usr/bin/env bash
# Attach/detach latency against a running all-in-one fleet (./scripts/fleet.sh, after
# tests/realkernel/instance-image.sh so the compute agent can boot the tiny test image): boots an instance
# from a volume made from that image (prints create-to-marker time), runs `ember bench attach` (RUNS cycles,
# default 20), and splits the medians into export (coordinator), connect, libvirt and confirm (compute
# agent) from the daemons' logs. Deletes the instance and its volume at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
state=${EMBER_STATE:-$PWD/.ember-dev}
runs=${RUNS:-20}
bin=${EMBER_BIN:-$PWD/target/debug}
export EMBER_CLI_CONFIG=$state/cli.toml
ember() { "$bin/ember" "$@"; }
image=$PWD/target/realkernel/instance/root.raw
[ -f "$image" ] || { echo "run tests/realkernel/instance-image.sh first (and restart the fleet)" >&2; exit 2; }

field() { sed -n "s/^ *\"$1\": \"\\{0,1\\}\\([^\",]*\\)\"\\{0,1\\},\\{0,1\\}\$/\\1/p" | head -1; }
root=$(ember --json volume create --image "$image" --size 1 --name bench-root --wait | field id)
started=$(date +%s%N)
vm=$(ember --json instance create bench-vm --boot-volume "$root" --memory 256 --delete-on-terminate --wait | field id)
until ember instance console-log "$vm" 2>/dev/null | grep -q EMBER-INSTANCE-BOOTED; do sleep 0.1; done
echo "boot from volume: $(( ($(date +%s%N) - started) / 1000000 )) ms from instance create to the guest's marker"

mark=$(wc -l < "$state/logs/compute.log")
cmark=$(wc -l < "$state/logs/coordinator.log")
ember bench attach --instance "$vm" --host compute1 --runs "$runs"
ember instance delete "$vm" --wait >/dev/null

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "-" }'; }
plain() { sed 's/\x1b\[[0-9;]*m//g'; }
pick() { grep -o "$1=[0-9]*" | cut -d= -f2 | median; }
compute=$(tail -n +"$((mark + 1))" "$state/logs/compute.log" | plain)
coordinator=$(tail -n +"$((cmark + 1))" "$state/logs/coordinator.log" | plain)
attached=$(grep 'volume attached' <<<"$compute")
detached=$(grep 'volume detached' <<<"$compute")
echo "attach medians (ms): export $(grep ' attached' <<<"$coordinator" | pick export_ms)," \
  "connect $(pick connect_ms <<<"$attached"), libvirt $(pick libvirt_ms <<<"$attached"), confirm $(pick confirm_ms <<<"$attached")"
echo "detach medians (ms): libvirt $(pick libvirt_ms <<<"$detached"), confirm $(pick confirm_ms <<<"$detached")," \
  "disconnect $(pick disconnect_ms <<<"$detached"), unexport $(grep ' detached' <<<"$coordinator" | pick unexport_ms)"
