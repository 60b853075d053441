#!/usr/bin/env bash
# Builds the tiny images the compute tests run as libvirt instances: the guest tier's Debian kernel, an
# initramfs with busybox and the virtio and ext4 modules, and root.raw, an ext4 root filesystem with the same
# busybox and init (the image a bootable volume is made from).
#
# The init: with `root=` on the kernel command line, the initramfs mounts that disk and switches to its
# /sbin/init; otherwise (and on the volume's root) it prints "EMBER-INSTANCE-BOOTED root=<dev>" on the serial
# console, then watches for hot-plugged virtio disks other than the root: for each new one it links
# /dev/disk/by-id/virtio-<serial> (as udev would), writes "EMBER-GUEST-WROTE <serial>" padded to 4 KiB
# through that link, flushes, and prints DISK-WRITTEN <serial>; when a disk goes it prints DISK-GONE <serial>.
# It prints DISK-SIZE serial=<serial> sectors=<n> when it first sees a disk and whenever the disk's size changes
# (a volume extended while attached).
#
# Output: target/realkernel/instance/{vmlinuz,initrd.img,root.raw} (world-readable: QEMU runs as
# libvirt-qemu).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${EMBER_GUEST_CACHE:-$HERE/../../target/realkernel}
"$HERE/build-guest.sh" >&2
CACHE=$(cd "$CACHE" && pwd)
ROOT=$CACHE/rootfs OUT=$CACHE/instance
kver=$(ls "$ROOT/usr/lib/modules" | head -1)
stamp="$(cat "$CACHE/out/stamp") $(sha256sum < "$HERE/instance-image.sh" | cut -c1-16)"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ]; then exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,tmp,lib/modules} "$OUT"
cp "$ROOT/usr/bin/busybox" "$work/bin/busybox"
for m in virtio_pci virtio_blk ext4 crc32c_generic; do
  "$CACHE/bin/modprobe" -d "$ROOT" -S "$kver" --show-depends "$m"
done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' > "$work/modules.txt"
i=0
while read -r ko; do
  i=$((i + 1))
  cp "$ko" "$work/lib/modules/$(printf %02d $i)-$(basename "$ko")"
done < "$work/modules.txt"
cat > "$work/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
root=
for a in $(cat /proc/cmdline); do case $a in root=*) root=${a#root=} ;; esac; done
if [ -f /ember-initramfs ]; then
  for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
  if [ -n "$root" ]; then
    i=0
    while [ ! -b "$root" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    mkdir -p /newroot
    mount -t ext4 "$root" /newroot || { echo "EMBER-ROOT-MOUNT-FAILED $root"; exec sh; }
    mount --move /dev /newroot/dev
    umount /proc /sys
    exec switch_root /newroot /sbin/init
  fi
fi
mkdir -p /dev/disk/by-id /tmp
echo "EMBER-INSTANCE-BOOTED root=${root:-none} uptime=$(cut -d' ' -f1 /proc/uptime)"
rootdev=${root#/dev/}
seen=" "
sizes=" "
while true; do
  for b in /sys/block/vd*; do
    [ -e "$b" ] || continue
    name=${b##*/}
    [ "$name" = "$rootdev" ] && continue
    serial=$(cat "$b/serial" 2>/dev/null)
    size=$(cat "$b/size" 2>/dev/null)
    case "$sizes" in *" $name:$size "*) ;; *)
      sizes="$(echo "$sizes" | sed "s| $name:[0-9]* | |")$name:$size "
      [ -n "$serial" ] && echo "DISK-SIZE serial=$serial sectors=$size" ;;
    esac
    case "$seen" in *" $name=$serial "*) continue ;; esac
    seen="$seen$name=$serial "
    [ -n "$serial" ] || continue
    ln -sf "/dev/$name" "/dev/disk/by-id/virtio-$serial"
    echo "DISK-PRESENT $name serial=$serial"
    printf 'EMBER-GUEST-WROTE %s' "$serial" > /tmp/block
    dd if=/dev/zero bs=4096 count=1 2>/dev/null | cat /tmp/block - | head -c 4096 > /tmp/page
    dd if=/tmp/page of="/dev/disk/by-id/virtio-$serial" bs=4096 count=1 conv=fsync 2>/dev/null && sync &&
      echo "DISK-WRITTEN serial=$serial"
  done
  for entry in $seen; do
    name=${entry%%=*}
    if [ ! -e "/sys/block/$name" ]; then
      echo "DISK-GONE serial=${entry#*=}"
      rm -f "/dev/disk/by-id/virtio-${entry#*=}"
      sizes=$(echo "$sizes" | sed "s| $name:[0-9]* | |")
      seen=$(echo "$seen" | sed "s| $entry | |")
    fi
  done
  sleep 0.2
done
INIT
chmod 755 "$work/init"
# The root filesystem of a bootable volume: busybox and the same init, no modules.
mkdir -p "$work/rootfs"/{bin,sbin,dev,proc,sys,tmp}
cp "$work/bin/busybox" "$work/rootfs/bin/busybox"
cp "$work/init" "$work/rootfs/sbin/init"
rm -f "$OUT/root.raw"
mkfs.ext4 -q -F -L ember-root -d "$work/rootfs" "$OUT/root.raw" 32M
rm -rf "$work/rootfs"
touch "$work/ember-initramfs"
(cd "$work" && rm modules.txt && find . | "$ROOT/usr/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -1 > "$OUT/initrd.img"
cp "$CACHE/out/vmlinuz" "$OUT/vmlinuz"
chmod 755 "$OUT" && chmod 644 "$OUT/initrd.img" "$OUT/vmlinuz" "$OUT/root.raw"
echo "$stamp" > "$OUT/stamp"
echo "instance image: $OUT ($(du -h "$OUT/initrd.img" | cut -f1) initrd)" >&2
