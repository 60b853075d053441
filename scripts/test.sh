#!/usr/bin/env bash
# Runs ember's whole test suite: unit tests and the fleet tests that start the real binaries.
# This is the README's second command, and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
# A whole-suite run, as on a fresh machine or in CI, gains nothing from incremental compilation's caches, which
# would take a third of its disk (set CARGO_INCREMENTAL=1 to keep them).
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# A machine short of disk fails in the build or the guest tier with ENOSPC: say up front how much there is (a
# fresh run needs about 6 GiB for the build and a few hundred MiB for the guest).
df -h . /tmp | sed 's/^/disk: /'
# The fleet tests start the real daemons, so every binary must exist before the tests run.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
log=$(mktemp)
# Compute tests attach volumes to real libvirt domains; the suite runs one libvirtd (stopped at the end if
# this script started it).
./scripts/libvirtd.sh start
trap 'rm -f "$log"; ./scripts/libvirtd.sh stop' EXIT
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
# The real-kernel tier: LVM, LIO and the kernel initiator in a QEMU guest (this kernel has none of them).
guest_status=0
./scripts/realkernel.sh debug | tee -a "$log" || guest_status=$?
[ "$guest_status" = 0 ] || status=$guest_status
# One closing line for the whole suite (cargo prints one per test binary, the last often a 0-test doc run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^guest checks/ { gp += $4; gf += $6 }
     END { printf "tests: %d passed, %d failed; real-kernel guest checks: %d passed, %d failed\n", p, f, gp, gf }' "$log"
exit "$status"
