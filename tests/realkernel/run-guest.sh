#!/usr/bin/env bash
# Boots the test guest (built by build-guest.sh) under QEMU/TCG and runs JOB inside it as root, with the FILEs
# (the project's binaries) beside it in /ember/job. The console streams to stdout and to $OUTDIR/console.log;
# whatever the job writes to /ember/out comes back into $OUTDIR.
#
#   run-guest.sh OUTDIR JOB [FILE...]
#
# Exit status: the job's, or 124 when the guest ran past $EMBER_GUEST_TIMEOUT seconds (default 900), or 125
# when it stopped without reporting one (a panic). The guest has no NIC: only its own loopback.
# Knobs: EMBER_GUEST_DISKS (default 1) sparse data disks of EMBER_GUEST_DISK_SIZE (default 4G), serial
# ember-dataN, seen in the guest as $EMBER_GUEST_DISK0...; EMBER_GUEST_MEM (default 2G).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUTDIR JOB [FILE...]" >&2; exit 2; }
OUTDIR=$1 JOB=$2
shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
IMAGE=${EMBER_GUEST_CACHE:-$HERE/../../target/realkernel}/out
[ -f "$IMAGE/initramfs.cpio" ] || { echo "no guest image in $IMAGE: run build-guest.sh" >&2; exit 2; }
mkdir -p "$OUTDIR"
# A run killed outright (SIGKILL skips the trap below) leaves its working directory behind; sweep those of
# runs long over (a run lasts at most the tier's 50-minute budget), so that they do not pile up on the disk.
find /tmp -maxdepth 1 -type d -name 'ember-guest.*' -mmin +180 -exec rm -rf {} + 2>/dev/null || true
WORK=$(mktemp -d /tmp/ember-guest.XXXXXX)
qemu_pid=
cleanup() {
  [ -z "$qemu_pid" ] || kill "$qemu_pid" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The job rides in a second cpio archive appended to the image: the kernel unpacks both in order.
mkdir -p "$WORK/job/ember/job"
cp "$JOB" "$WORK/job/ember/job/run.sh"
for f in "$@"; do cp -a "$f" "$WORK/job/ember/job/"; done
busybox=$(dirname "$IMAGE")/rootfs/usr/bin/busybox
(cd "$WORK/job" && find . -mindepth 1 | "$busybox" cpio -o -H newc 2>/dev/null) > "$WORK/job.cpio"
cat "$IMAGE/initramfs.cpio" "$WORK/job.cpio" > "$WORK/initrd"

drives=()
for ((i = 0; i < ${EMBER_GUEST_DISKS:-1}; i++)); do
  truncate -s "${EMBER_GUEST_DISK_SIZE:-4G}" "$WORK/data$i.img"
  # detect-zeroes=unmap: the guest's wipes and zero runs become holes punched in the sparse file instead of
  # gigabytes written onto the host's disk, whose speed varies from machine to machine and hour to hour, and
  # whose free space may be short (=on would still allocate those gigabytes, only without writing them).
  zeroes=discard=unmap,detect-zeroes=unmap
  drives+=(-drive "file=$WORK/data$i.img,format=raw,if=none,id=data$i,cache=unsafe,aio=threads,$zeroes"
           -device "virtio-blk-pci,drive=data$i,serial=ember-data$i")
done
truncate -s 256M "$WORK/out.tar"
drives+=(-drive "file=$WORK/out.tar,format=raw,if=none,id=out,cache=unsafe"
         -device "virtio-blk-pci,drive=out,serial=ember-out")

# The guest learns its time limit from its command line (ember.timeout=), so that it can say what it was doing
# before the limit instead of being cut off mid-step (lib.sh).
timeout=${EMBER_GUEST_TIMEOUT:-900}
started=$SECONDS
# KVM does not work on this machine kind (nested virtualisation), so TCG; -no-reboot makes poweroff or a
# panic end QEMU.
qemu-system-x86_64 -nodefaults -no-user-config -M q35 -accel tcg,thread=multi -cpu max \
  -smp 2 -m "${EMBER_GUEST_MEM:-2G}" -display none -monitor none -serial stdio -nic none -no-reboot \
  -device virtio-rng-pci -kernel "$IMAGE/vmlinuz" -initrd "$WORK/initrd" \
  -append "console=ttyS0,115200 panic=-1 oops=panic rdinit=/init quiet loglevel=3 ember.timeout=$timeout" \
  "${drives[@]}" < /dev/null > "$WORK/console.raw" 2>&1 &
qemu_pid=$!
tail -n +1 -F --pid="$qemu_pid" "$WORK/console.raw" 2>/dev/null | sed -u 's/\r$//' | tee "$OUTDIR/console.log" &
tail_pid=$!
timed_out=0
while kill -0 "$qemu_pid" 2>/dev/null; do
  if ((SECONDS - started >= timeout)); then
    echo "guest: no exit after ${timeout}s; stopping QEMU" >&2
    kill "$qemu_pid"
    timed_out=1
    break
  fi
  sleep 0.5
done
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=
wait "$tail_pid" 2>/dev/null || true
tar -xf "$WORK/out.tar" -C "$OUTDIR" 2>/dev/null || true
rc=$(sed -n 's/.*@@EMBER_GUEST_EXIT=\([0-9]*\)@@.*/\1/p' "$OUTDIR/console.log" | tail -1)
held=$(du -cm "$WORK"/data*.img 2>/dev/null | tail -1 | cut -f1)
echo "guest: ran $((SECONDS - started))s, exit ${rc:-none}, data disks held ${held:-0} MiB of the host's disk," \
  "outputs in $OUTDIR" >&2
[ $timed_out = 0 ] || exit 124
[ -n "$rc" ] || exit 125
exit "$rc"
