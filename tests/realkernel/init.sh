#!/bin/busybox sh
# PID 1 of the real-kernel test guest. Mounts the pseudo filesystems, brings up loopback (the guest has no
# NIC), starts udev (for /dev/disk/by-path and by-id links), runs /ember/job/run.sh, prints
# "@@EMBER_GUEST_EXIT=<rc>@@", writes /ember/out as a tar onto the disk with serial "ember-out" and powers off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock /run/lvm /run/udev
exec </dev/console >/dev/console 2>&1
hostname ember-guest
ip link set lo up
echo 4 > /proc/sys/kernel/printk

modprobe -a virtio_pci virtio_blk virtio_rng configfs
mount -t configfs configfs /sys/kernel/config
/usr/lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --type=subsystems --action=add
udevadm trigger --type=devices --action=add
udevadm settle --timeout=30

out_disk=
for b in /sys/block/vd*; do
  serial=$(cat "$b/serial" 2>/dev/null)
  case $serial in
    ember-out) out_disk=/dev/${b##*/} ;;
    ember-data*) export EMBER_GUEST_DISK${serial#ember-data}=/dev/${b##*/} ;;
  esac
done

echo "@@EMBER_GUEST_BOOTED@@ uptime=$(cut -d' ' -f1 /proc/uptime)s kernel=$(uname -r)"
cd /ember/job && bash ./run.sh
rc=$?
cd /
echo "@@EMBER_GUEST_EXIT=$rc@@ uptime=$(cut -d' ' -f1 /proc/uptime)s"
udevadm control --exit 2>/dev/null
[ -n "$out_disk" ] && tar -cf "$out_disk" -C /ember/out .
sync
poweroff -f
