#!/usr/bin/env bash
# Builds the real-kernel test guest: a Debian 12 kernel and an initramfs that is the guest's whole root
# filesystem (it stays in RAM). Packages are fetched with `apt-get download` and unpacked with `dpkg -x`;
# nothing is installed on the host. Re-running reuses the downloaded packages.
#
# Output in $EMBER_GUEST_CACHE/out (default target/realkernel/out): vmlinuz, initramfs.cpio, packages.txt.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${EMBER_GUEST_CACHE:-$HERE/../../target/realkernel}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
DEBS=$CACHE/debs OUT=$CACHE/out ROOT=$CACHE/rootfs KTREE=$CACHE/kernel
started=$SECONDS
say() { echo "[guest build ${SECONDS}s] $*" >&2; }

# What the tests use in the guest: LVM (thick and thin), tgt, the kernel initiator with udev's by-path links,
# the kernel NFS server and client, mkfs for the NFS export, and qemu-img to format encrypted (LUKS) LVs.
PACKAGES=(busybox-static kmod bash coreutils util-linux mount e2fsprogs lvm2 thin-provisioning-tools tgt
          open-iscsi udev nfs-kernel-server nfs-common rpcbind qemu-utils)
# Kernel modules (kmod adds their dependencies): disks, device-mapper, the SCSI initiator, LIO, NFS.
MODULES=(virtio_pci virtio_blk virtio_rng dm-mod dm-snapshot dm-thin-pool dm-zero dm-bufio scsi_mod sd_mod
         iscsi_tcp configfs target_core_mod target_core_iblock iscsi_target_mod loop ext4 nfsv3 nfsv4 nfsd)

kernel_version() { # the kernel Debian's linux-image-amd64 depends on, per the package lists
  apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { sub("linux-image-", "", $2); print $2; exit }'
}
kver=$(kernel_version)
[ -n "$kver" ] || { echo "cannot tell the kernel version from apt-cache" >&2; exit 1; }
stamp="$kver $(cat "$HERE/build-guest.sh" "$HERE/init.sh" "$HERE/resolve.py" | sha256sum | cut -c1-16)"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] && [ -f "$OUT/initramfs.cpio" ]; then
  say "up to date ($stamp)"
  exit 0
fi

fetch() { # resolves the package set and downloads what is not here yet
  say "kernel $kver; resolving packages"
  python3 "$HERE/resolve.py" "${PACKAGES[@]}" > "$CACHE/packages.list"
  echo "linux-image-$kver" >> "$CACHE/packages.list"
  mkdir -p "$DEBS" "$OUT"
  local missing=() p
  while read -r p; do
    compgen -G "$DEBS/${p}_*.deb" >/dev/null || missing+=("$p")
  done < "$CACHE/packages.list"
  [ ${#missing[@]} -gt 0 ] || return 0
  say "downloading ${#missing[@]} packages"
  (cd "$DEBS" && apt-get download -qq "${missing[@]}" >/dev/null)
}
# Package lists older than the mirror name versions it no longer has ("Can't find a source to download"): a
# machine whose packages were all installed long ago never ran apt-get update for this. Update once and retry.
if ! fetch; then
  say "download failed; updating the package lists and trying again"
  apt-get update -qq
  kver=$(kernel_version)
  stamp="$kver ${stamp#* }"
  fetch
fi

say "unpacking"
rm -rf "$ROOT" "$KTREE"
mkdir -p "$ROOT" "$KTREE"
: > "$OUT/packages.txt"
while read -r p; do
  deb=$(compgen -G "$DEBS/${p}_*.deb" | head -1)
  dpkg-deb -W --showformat='${Package}=${Version}\n' "$deb" >> "$OUT/packages.txt"
  if [[ $p == linux-image-* ]]; then dpkg -x "$deb" "$KTREE"; else dpkg -x "$deb" "$ROOT"; fi
done < "$CACHE/packages.list"

# dpkg -x turns bookworm's merged-/usr symlinks into directories: merge them back.
for d in bin sbin lib lib64; do
  if [ -d "$ROOT/$d" ] && [ ! -L "$ROOT/$d" ]; then
    mkdir -p "$ROOT/usr/$d" && cp -a "$ROOT/$d/." "$ROOT/usr/$d/" && rm -rf "${ROOT:?}/$d"
  fi
  mkdir -p "$ROOT/usr/$d"
  ln -sfn "usr/$d" "$ROOT/$d"
done
rm -rf "$ROOT"/usr/share/{doc,man,info,locale,lintian,bug,zsh,bash-completion}
# busybox fills in the small tools no package brings (never an applet named busybox: it would replace itself).
busybox=$ROOT/usr/bin/busybox
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] && continue
  [ -e "$ROOT/usr/bin/$applet" ] || [ -e "$ROOT/usr/sbin/$applet" ] || ln -s busybox "$ROOT/usr/bin/$applet"
done

say "selecting kernel modules"
# The host may have no kmod tools; the guest's kmod runs here too (the host is the same Debian release).
# kmod picks its command from the name it is called by.
mkdir -p "$CACHE/bin"
ln -sfn "$ROOT/usr/bin/kmod" "$CACHE/bin/depmod"
ln -sfn "$ROOT/usr/bin/kmod" "$CACHE/bin/modprobe"
modules_src=$KTREE/lib/modules/$kver
modules_dst=$ROOT/usr/lib/modules/$kver
"$CACHE/bin/depmod" -b "$KTREE" "$kver"   # the package ships no modules.dep
for m in "${MODULES[@]}"; do
  "$CACHE/bin/modprobe" -d "$KTREE" -S "$kver" --show-depends "$m"
done | awk '$1 == "insmod" { print $2 }' | sort -u | while read -r ko; do
  rel=${ko#"$modules_src"/}
  mkdir -p "$modules_dst/$(dirname "$rel")"
  cp "$ko" "$modules_dst/$rel"
done
cp "$modules_src"/modules.{order,builtin,builtin.modinfo} "$modules_dst/"
"$CACHE/bin/depmod" -b "$ROOT" "$kver"
cp "$KTREE/boot/vmlinuz-$kver" "$OUT/vmlinuz"
rm -rf "$KTREE"

say "configuring"
mkdir -p "$ROOT"/{proc,sys,dev,run,tmp,root,mnt,etc/iscsi,ember/job,ember/out}
chmod 1777 "$ROOT/tmp"
rm -rf "$ROOT/var/run" "$ROOT/var/lock"
ln -s /run "$ROOT/var/run"
ln -s /run/lock "$ROOT/var/lock"
printf 'root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\ndisk:x:6:\ntty:x:5:\nnogroup:x:65534:\n' > "$ROOT/etc/group"
echo "127.0.0.1 localhost ember-guest" > "$ROOT/etc/hosts"
echo ember-guest > "$ROOT/etc/hostname"
echo "InitiatorName=iqn.2025-01.org.ember:guest" > "$ROOT/etc/iscsi/initiatorname.iscsi"
echo 'include /etc/ld.so.conf.d/*.conf' > "$ROOT/etc/ld.so.conf"
ldconfig -r "$ROOT"
install -m 0755 "$HERE/init.sh" "$ROOT/init"

say "writing the initramfs"
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) > "$OUT/initramfs.cpio"
echo "$stamp" > "$OUT/stamp"
say "done in $((SECONDS - started))s: $(wc -l < "$OUT/packages.txt") packages, initramfs $(du -h "$OUT/initramfs.cpio" | cut -f1)"
