#!/usr/bin/env bash
# Installs what ember's build, fleet and tests need on a fresh Debian 12 machine of this kind, skipping what
# is already there. Safe to run again.
set -euo pipefail

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
updated=
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  [ -n "$updated" ] || { apt-get update -qq; updated=1; }
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# tgt: the iSCSI target; libiscsi-bin: a userspace initiator (iscsi-ls); systemd: systemd-analyze, which checks
# the unit files in deploy/.
missing=()
for p in tgt libiscsi-bin systemd; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing apt packages: ${missing[*]}" >&2
  apt_install "${missing[@]}"
fi

# qemu-img with its iSCSI driver (qemu-block-extra), the initiator the tests read and write volumes with, and
# qemu-system-x86, which runs the real-kernel test guest. A fresh machine ships a backported qemu-utils that
# Debian 12's qemu-block-extra and qemu-system cannot sit beside, so all three come from bookworm together.
if ! installed qemu-block-extra || ! installed qemu-system-x86 || ! command -v qemu-img >/dev/null; then
  echo "installing qemu-utils, qemu-block-extra and qemu-system-x86 (Debian 12)" >&2
  apt_install --allow-downgrades qemu-utils/bookworm qemu-block-extra/bookworm qemu-system-x86/bookworm
fi

# libvirt (daemon, QEMU driver, virsh): the compute agent attaches volumes to libvirt domains. Installed after
# qemu-system-x86 from bookworm above, so apt does not pull in the backported qemu-utils again.
missing=()
for p in libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing apt packages: ${missing[*]}" >&2
  apt_install "${missing[@]}"
fi

# /dev/kvm as Debian's udev rule leaves it (root:kvm 0660; libvirt-qemu is in kvm). Machines without udev
# keep it root-only, and libvirt then finds KVM "enabled when probing but not available now" and re-probes
# QEMU on every call (about 45 s per domain define here). Guests still run under TCG where KVM does not work.
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ]; then
  chgrp kvm /dev/kvm && chmod 660 /dev/kvm
fi

# A client that is not ours, for the reflection test and for operators: Python grpcio with reflection.
if ! python3 -c 'import grpc, grpc_reflection' 2>/dev/null; then
  echo "installing python grpcio + grpcio-reflection" >&2
  python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-reflection protobuf
fi
