#!/usr/bin/env bash
# Runs virtlogd and libvirtd for the test suite on a host without systemd.
#   scripts/libvirtd.sh start   starts both unless libvirt already answers; records what it started
#   scripts/libvirtd.sh stop    stops only what `start` started
set -euo pipefail
cd "$(dirname "$0")/.."
run=target/libvirtd
mkdir -p "$run"
run=$(cd "$run" && pwd)
case ${1:-} in
  start)
    if virsh -c qemu:///system version >/dev/null 2>&1; then
      echo "libvirtd already answers; using it" >&2
      exit 0
    fi
    mkdir -p /run/libvirt
    virtlogd --daemon --pid-file="$run/virtlogd.pid"
    LIBVIRT_LOG_OUTPUTS="3:file:$run/libvirtd.log" libvirtd --daemon --pid-file="$run/libvirtd.pid"
    for _ in $(seq 300); do
      virsh -c qemu:///system version >/dev/null 2>&1 && { echo "libvirtd started" >&2; exit 0; }
      sleep 0.1
    done
    echo "libvirtd did not answer within 30 s; see $run/libvirtd.log" >&2
    exit 1
    ;;
  stop)
    for d in libvirtd virtlogd; do
      if [ -f "$run/$d.pid" ]; then
        kill "$(cat "$run/$d.pid")" 2>/dev/null || true
        rm -f "$run/$d.pid"
      fi
    done
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
