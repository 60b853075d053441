#!/usr/bin/env bash
# Runs inside the real-kernel guest (see run-guest.sh): a whole ember fleet (coordinator + storage agent) on the
# guest's loopback with two LVM backends on real virtio disks — thick LVs exported over tgt, thin LVs exported
# over LIO — driven through the public API with the `ember` CLI, and checked against what the node really has:
# `lvs`, `tgtadm`, LIO's configfs, and data written through the kernel iSCSI initiator (iscsiadm, CHAP) read
# back from the LVs, snapshots and clones; then backups of thick and thin LVs through a backup agent, restored
# onto new and existing LVs. Every check prints "[PASS] name" or "[FAIL] name"; the exit
# status is the number of failures. Timings of each operation go to /ember/out/timings.txt.
set -u
JOB=$(cd "$(dirname "$0")" && pwd)
OUT=/ember/out
W=/tmp/ember
mkdir -p "$OUT" "$W"/{certs,logs,state}
export PATH=$JOB:$PATH
source "$JOB/lib.sh"

modprobe -a dm-mod dm-snapshot dm-thin-pool iscsi_tcp sd_mod target_core_mod target_core_iblock iscsi_target_mod
pvcreate -q "$EMBER_GUEST_DISK0" "$EMBER_GUEST_DISK1"
vgcreate -q ember-thick "$EMBER_GUEST_DISK0"
vgcreate -q ember-thin "$EMBER_GUEST_DISK1"
mkdir -p /etc/iscsi/nodes /etc/iscsi/send_targets /var/lib/iscsi
iscsid
INITIATOR=$(sed -n 's/^InitiatorName=//p' /etc/iscsi/initiatorname.iscsi)

# ---------------------------------------------------------------- the fleet
fleet_certs "$W/certs" coordinator:coordinator storage-agent:storage1 backup-agent:backup1
{ printf 'listen = "127.0.0.1:7000"\ndatabase = "%s/ember.db"\n' "$W"; tls coordinator; } >"$W/coordinator.toml"
cat >"$W/storage.toml" <<EOF
name = "storage1"
listen = "127.0.0.1:7001"
coordinator = "https://127.0.0.1:7000"
state_dir = "$W/state"

[[backends]]
name = "thick"
driver = "lvm"
volume_group = "ember-thick"
lvm_type = "thick"
target = "tgt"

[[backends]]
name = "thin"
driver = "lvm"
volume_group = "ember-thin"
lvm_type = "auto"
target = "lio"

[tgt]
portal = "127.0.0.1:3260"

[lio]
portal = "127.0.0.1:3261"

EOF
tls storage1 >>"$W/storage.toml"
export EMBER_COORDINATOR=https://127.0.0.1:7000
ember-coordinator --config "$W/coordinator.toml" >"$W/logs/coordinator.out" 2>"$W/logs/coordinator.log" &
coordinator=$!
ember-storage-agent --config "$W/storage.toml" >"$W/logs/storage.out" 2>"$W/logs/storage.log" &
storage=$!
cat >"$W/backup.toml" <<CFG
name = "backup1"
listen = "127.0.0.1:7003"
coordinator = "https://127.0.0.1:7000"

[[repositories]]
name = "local"
directory = "$W/repository"

CFG
tls backup1 >>"$W/backup.toml"
mkdir -p "$W/repository"
ember-backup-agent --config "$W/backup.toml" >"$W/logs/backup.out" 2>"$W/logs/backup.log" &
backup=$!
up() { ember service list | grep "$1" | grep -q ' up'; }
storage_up() { up storage1; }
check "storage agent registers with both LVM backends" wait_for 90 storage_up
check "the backup agent registers" wait_for 90 up backup1
check "auto lvm_type made the thin pool in the empty VG" lvs ember-thin/ember-thin-pool
ember type create thick --spec volume_backend_name=thick >/dev/null
ember type create thin --spec volume_backend_name=thin >/dev/null

new_volume() { # new_volume TYPE ARGS... → prints the id of an available volume
  ember --json volume create --type "$@" --wait | json_field id
}
lv_size() { lvs --noheadings --nosuffix --units b -o lv_size "$1" 2>/dev/null | tr -d ' '; }
lv_has_tag() { lvs --noheadings -o lv_tags "$1" 2>/dev/null | grep -qw "$2"; }
same_head() { cmp -n "$3" "$1" "$2"; }

no_session() { ! iscsiadm -m session >/dev/null 2>&1; }

head -c 4194304 /dev/urandom >"$W/pattern-a"
head -c 4194304 /dev/urandom >"$W/pattern-b"
head -c 4194304 /dev/urandom >"$W/pattern-c"

for kind in thick thin; do
  vg=ember-$kind
  vol=$(timed "$kind.create" new_volume "$kind" --size 1)
  check "$kind: volume created, available" test -n "$vol"
  check "$kind: LV volume-<id> of 1 GiB with the owner tag" lv_has_tag "$vg/volume-$vol" ember
  check "$kind: LV size is 1 GiB" test "$(lv_size "$vg/volume-$vol")" = 1073741824
  case $kind in
    thick) check "thick: LV is not thin" test -z "$(lvs --noheadings -o pool_lv "$vg/volume-$vol" | tr -d ' ')" ;;
    thin) check "thin: LV is in the thin pool" test "$(lvs --noheadings -o pool_lv "$vg/volume-$vol" | tr -d ' ')" = ember-thin-pool ;;
  esac

  # Export to this node's initiator, log in with CHAP, write through the SCSI disk, read from the LV.
  ember volume export "$vol" --initiator "$INITIATOR" --host guest --ip 127.0.0.1 >"$W/export.txt"
  portal=$(awk '$1 == "target_portal" { print $2 }' "$W/export.txt")
  iqn=$(awk '$1 == "target_iqn" { print $2 }' "$W/export.txt")
  user=$(awk '$1 == "auth_username" { print $2 }' "$W/export.txt")
  pass=$(awk '$1 == "auth_password" { print $2 }' "$W/export.txt")
  case $kind in
    thick) check "thick: tgtadm lists the target backed by the LV" sh -c "tgtadm --lld iscsi --op show --mode target | grep -q /dev/$vg/volume-$vol" ;;
    thin) check "thin: LIO has the target with an ACL for this initiator" test -d "/sys/kernel/config/target/iscsi/$iqn/tpgt_1/acls/$INITIATOR" ;;
  esac
  iscsiadm -m node -o new -T "$iqn" -p "$portal" >/dev/null
  iscsiadm -m node -T "$iqn" -p "$portal" -o update -n node.session.auth.authmethod -v CHAP
  iscsiadm -m node -T "$iqn" -p "$portal" -o update -n node.session.auth.username -v "$user"
  iscsiadm -m node -T "$iqn" -p "$portal" -o update -n node.session.auth.password -v wrong-secret-123
  check "$kind: login with a wrong CHAP secret is refused" absent iscsiadm -m node -T "$iqn" -p "$portal" --login
  iscsiadm -m node -T "$iqn" -p "$portal" -o delete >/dev/null 2>&1
  # The compute agent's kernel-initiator connector does the login: node new → update (CHAP) → login → the
  # by-path device; a second connect finds the same device and session.
  export EMBER_CHAP_PASSWORD=$pass
  dev=$(timed "$kind.iscsi_login" ember-compute-agent iscsi-connect --portal "$portal" --iqn "$iqn" --username "$user")
  check "$kind: the connector logged in with CHAP and returned /dev/disk/by-path/...-lun-1" test -b "$dev"
  again=$(ember-compute-agent iscsi-connect --portal "$portal" --iqn "$iqn" --username "$user")
  check "$kind: a second connect returns the same device" test "$again" = "$dev"
  check "$kind: ... over one session" test "$(iscsiadm -m session 2>/dev/null | grep -c "$iqn")" = 1
  check "$kind: the disk has the volume's size" test "$(blockdev --getsize64 "$dev" 2>/dev/null)" = 1073741824
  dd if="$W/pattern-a" of="$dev" bs=1M oflag=direct conv=fsync status=none
  check "$kind: data written through iSCSI is on the LV" same_head "$W/pattern-a" "/dev/$vg/volume-$vol" 4194304
  # Grown while this initiator is logged in (as an attached volume is): the target reports the new size (tgt's
  # LUN re-made, LIO's iblock reading the LV) and the connector's rescan makes the device show it.
  timed "$kind.extend" ember volume extend "$vol" 2 --wait >/dev/null
  check "$kind: extend while logged in grew the LV to 2 GiB" test "$(lv_size "$vg/volume-$vol")" = 2147483648
  check "$kind: ... the connector's rescan shows the device at 2 GiB" \
    ember-compute-agent iscsi-rescan --portal "$portal" --iqn "$iqn" --username "$user" --size 2147483648
  check "$kind: ... blockdev agrees" test "$(blockdev --getsize64 "$dev" 2>/dev/null)" = 2147483648
  check "$kind: ... and the data is still there" same_head "$W/pattern-a" "$dev" 4194304
  if [ $kind = thin ]; then
    # An interrupted disconnect: the device was flushed and deleted, then the process died before logout.
    sd=$(basename "$(readlink -f "$dev")")
    blockdev --flushbufs "$dev"
    echo 1 >"/sys/block/$sd/device/delete"
    check "thin: (interrupted disconnect) the session is still logged in" sh -c "iscsiadm -m session | grep -q $iqn"
  fi
  timed "$kind.iscsi_logout" ember-compute-agent iscsi-disconnect --portal "$portal" --iqn "$iqn" --username "$user"
  check "$kind: disconnect left no session" no_session
  check "$kind: ... no by-path device" absent test -e "$dev"
  check "$kind: ... and no node record" absent sh -c "iscsiadm -m node 2>/dev/null | grep -q $iqn"
  check "$kind: a repeated disconnect succeeds" ember-compute-agent iscsi-disconnect --portal "$portal" --iqn "$iqn" --username "$user"
  ember volume unexport "$vol" --initiator "$INITIATOR" >/dev/null
  case $kind in
    thick) check "thick: unexport removed the tgt target" sh -c "! tgtadm --lld iscsi --op show --mode target | grep -q $iqn" ;;
    thin) check "thin: unexport removed the LIO target and backstore" absent test -e "/sys/kernel/config/target/iscsi/$iqn" ;;
  esac

  # Data the snapshot will share with the volume, which a revert need not read (see the revert below).
  dd if="$W/pattern-c" of="/dev/$vg/volume-$vol" bs=1M seek=8 oflag=direct conv=notrunc,fsync status=none
  snap=$(timed "$kind.snapshot" sh -c "ember --json snapshot create $vol --wait | sed -n 's/^ *\"id\": \"\\([^\"]*\\)\".*/\\1/p' | head -1")
  check "$kind: snapshot LV _snapshot-<id> exists" lv_has_tag "$vg/_snapshot-$snap" ember
  check "$kind: snapshot's origin is the volume" test "$(lvs --noheadings -o origin "$vg/_snapshot-$snap" | tr -d ' ')" = "volume-$vol"
  dd if="$W/pattern-b" of="/dev/$vg/volume-$vol" bs=1M oflag=direct conv=fsync status=none
  check "$kind: the snapshot keeps the data of its time" same_head "$W/pattern-a" "/dev/$vg/_snapshot-$snap" 4194304
  if [ $kind = thick ]; then
    # The snapshot's copy-on-write store as the kernel wrote it, read the way the agent reads it (O_DIRECT): its
    # header, then its first five metadata areas. The agent's parser is tested on this capture
    # (storage-agent/testdata/lvm-snapshot-cow-head.bin).
    cow=/dev/mapper/${vg//-/--}-_snapshot--${snap//-/--}-cow
    dd if="$cow" of="$W/cow-header" bs=4096 count=1 iflag=direct status=none
    cow_chunk=$(($(od -An -tu4 -j 12 -N 4 "$W/cow-header" | tr -d ' ') * 512))
    { cat "$W/cow-header"; for area in 0 1 2 3 4; do
        dd if="$cow" bs="$cow_chunk" skip=$((1 + area * (cow_chunk / 16 + 1))) count=1 iflag=direct status=none
      done; } >"$OUT/lvm-snapshot-cow-head.bin"
    check "thick: the snapshot's store has 4 KiB chunks" test "$cow_chunk" = 4096
  fi
  # One page changed in the middle of what the volume shares with its snapshot (at 9 MiB + 4 KiB).
  head -c 4096 /dev/urandom | dd of="/dev/$vg/volume-$vol" bs=4096 seek=2305 oflag=direct conv=notrunc,fsync status=none
  from_snap=$(timed "$kind.from_snapshot" new_volume "$kind" --snapshot "$snap" --size 2)
  check "$kind: volume from snapshot holds the snapshot's data" same_head "$W/pattern-a" "/dev/$vg/volume-$from_snap" 4194304
  check "$kind: volume from snapshot grew to 2 GiB" test "$(lv_size "$vg/volume-$from_snap")" = 2147483648
  clone=$(timed "$kind.clone" new_volume "$kind" --source-volume "$vol")
  check "$kind: clone holds the volume's current data" same_head "$W/pattern-b" "/dev/$vg/volume-$clone" 4194304
  check "$kind: deleting a volume with snapshots is refused" absent ember volume delete "$vol"
  check "$kind: ... and the LV is still there" lv_has_tag "$vg/volume-$vol" ember
  # A snapshot LV of the volume that the coordinator has no record of, as a lost database leaves one: made by
  # hand the way the agent makes them. The sweeper leaves it alone; an admin adopts it under its own volume only.
  hand=$(cat /proc/sys/kernel/random/uuid)
  case $kind in
    thick) lvcreate -q -y -s -L "$(lv_size "$vg/volume-$vol")b" -n "_snapshot-$hand" --addtag ember "$vg/volume-$vol" ;;
    thin) lvcreate -q -y -s -kn -n "_snapshot-$hand" --addtag ember "$vg/volume-$vol" ;;
  esac >/dev/null
  left_alone() { grep "$hand" "$W/logs/coordinator.log" | grep -q "is left alone"; }
  check "$kind: the sweeper leaves an unknown snapshot LV alone and reports it" wait_for 60 left_alone
  check "$kind: ... the LV is still there" lv_has_tag "$vg/_snapshot-$hand" ember
  check "$kind: manageable lists it with its origin volume" sh -c "ember --json volume manageable storage1@$kind | grep -q '\"volume_id\": \"$vol\"'"
  ember snapshot manage "$from_snap" "$hand" >/dev/null 2>"$W/refused"
  check "$kind: adopting it under another volume is refused, naming its origin" grep -q "is a snapshot of volume $vol" "$W/refused"
  check "$kind: adopting it under its volume makes it available" test "$(ember --json snapshot manage "$vol" "$hand" | json_field status)" = available
  check "$kind: ... of the volume's 2 GiB" test "$(ember --json snapshot show "$hand" | json_field size_gb)" = 2
  ember snapshot unmanage "$hand" >/dev/null
  check "$kind: an unmanaged snapshot is forgotten" absent ember snapshot show "$hand"
  check "$kind: ... and the sweeper leaves its LV" wait_for 60 sh -c "grep $hand '$W/logs/coordinator.log' | grep -c 'is left alone' | grep -qx 2"
  check "$kind: ... which manage takes back" test "$(ember --json snapshot manage "$vol" "$hand" | json_field status)" = available
  timed "$kind.adopted_snapshot_delete" ember snapshot delete "$hand" --wait >/dev/null
  check "$kind: deleting the adopted snapshot removed its LV" absent lvs "$vg/_snapshot-$hand"
  if [ $kind = thick ]; then
    # A thick copy an agent never finished (it still carries the incomplete tag) holds partial data: not adopted.
    partial=$(cat /proc/sys/kernel/random/uuid)
    lvcreate -q -y -L 1g -n "volume-$partial" --addtag ember --addtag ember-incomplete "$vg" >/dev/null
    ember volume manage storage1@thick "$partial" >/dev/null 2>"$W/refused"
    check "thick: adopting a volume whose copy never finished is refused" grep -q "never finished" "$W/refused"
    lvremove -q -y "$vg/volume-$partial" >/dev/null
  fi
  # A volume and its snapshot as Cinder's LVM driver leaves them in a VG (named as ember names them, without
  # ember's tag). Not taken over unasked; an operator moving from Cinder takes them with --foreign, ids kept.
  cv=$(cat /proc/sys/kernel/random/uuid)
  cs=$(cat /proc/sys/kernel/random/uuid)
  case $kind in
    thick) lvcreate -q -y -L 1g -n "volume-$cv" "$vg" ;;
    thin) lvcreate -q -y -T "$vg/ember-thin-pool" -V 1g -n "volume-$cv" ;;
  esac >/dev/null
  dd if="$W/pattern-b" of="/dev/$vg/volume-$cv" bs=1M oflag=direct conv=fsync status=none
  case $kind in
    thick) lvcreate -q -y -s -L 1g -n "_snapshot-$cs" "$vg/volume-$cv" ;;
    thin) lvcreate -q -y -s -kn -n "_snapshot-$cs" "$vg/volume-$cv" ;;
  esac >/dev/null
  dd if="$W/pattern-c" of="/dev/$vg/volume-$cv" bs=1M oflag=direct conv=fsync status=none
  ember --json volume manageable "storage1@$kind" >"$W/manageable.json"
  listed_foreign() { grep -B2 -A6 "\"id\": \"$1\"" "$W/manageable.json" >"$W/entry" && grep -q '"foreign": true' "$W/entry" &&
    grep -q '"safe_to_manage": false' "$W/entry" && grep -q -- '--foreign' "$W/entry"; }
  check "$kind: manageable lists Cinder's volume as foreign, to take with --foreign" listed_foreign "$cv"
  check "$kind: ... and its snapshot" listed_foreign "$cs"
  ember volume manage "storage1@$kind" "$cv" >/dev/null 2>"$W/refused"
  check "$kind: managing Cinder's LV unasked is refused, naming --foreign" grep -q "not made by ember.*--foreign" "$W/refused"
  check "$kind: ... and leaves it untagged" absent lv_has_tag "$vg/volume-$cv" ember
  check "$kind: with --foreign it is adopted under its own id" \
    test "$(ember --json volume manage "storage1@$kind" "$cv" --foreign | json_field status)" = available
  check "$kind: ... its LV now carries ember's tag" lv_has_tag "$vg/volume-$cv" ember
  check "$kind: its snapshot is adopted with --foreign too" \
    test "$(ember --json snapshot manage "$cv" "$cs" --foreign | json_field status)" = available
  check "$kind: ... and tagged" lv_has_tag "$vg/_snapshot-$cs" ember
  from_cinder=$(new_volume "$kind" --snapshot "$cs")
  check "$kind: a volume made from the adopted snapshot holds the snapshot's data" \
    same_head "$W/pattern-b" "/dev/$vg/volume-$from_cinder" 4194304
  check "$kind: ... and the adopted volume keeps its own" same_head "$W/pattern-c" "/dev/$vg/volume-$cv" 4194304
  ember volume delete "$from_cinder" --wait >/dev/null
  ember snapshot delete "$cs" --wait >/dev/null
  ember volume delete "$cv" --wait >/dev/null
  check "$kind: deleting them through ember removed Cinder's LVs" absent sh -c "lvs --noheadings -o lv_name $vg | grep -e $cv -e $cs"
  if [ $kind = thin ]; then
    # A thin LV of another pool: ember reads a thin LV's blocks from its own pool's metadata, so it refuses it.
    lvcreate -q -y -T "$vg/other-pool" -L 64m >/dev/null
    lvcreate -q -y -T "$vg/other-pool" -V 1g -n "volume-$cv" >/dev/null 2>&1
    ember volume manage storage1@thin "$cv" --foreign >/dev/null 2>"$W/refused"
    check "thin: taking over an LV of another thin pool is refused, naming it" grep -q "in pool other-pool" "$W/refused"
    check "thin: ... and records nothing" absent ember volume show "$cv"
    check "thin: ... nor tags the LV" absent lv_has_tag "$vg/volume-$cv" ember
    lvremove -q -y "$vg/volume-$cv" "$vg/other-pool" >/dev/null
  fi

  # A marker in the clone, then where it sits on the disk (a linear LV: "0 <len> linear <dev> <start>").
  marker="EMBER-WIPE-MARKER-$kind-$RANDOM$RANDOM"
  printf '%s' "$marker" >"$W/marker"
  truncate -s 4096 "$W/marker"
  dd if="$W/marker" of="/dev/$vg/volume-$clone" bs=4096 seek=100 oflag=direct conv=fsync status=none
  start=$(dmsetup table "${vg//-/--}-volume--${clone//-/--}" 2>/dev/null | awk '$3 == "linear" { print $5; exit }')
  disk_block() { dd if="$EMBER_GUEST_DISK0" bs=512 skip=$((${start:-0} + 800)) count=8 iflag=direct status=none; }
  [ $kind = thick ] && disk_block >"$W/before"
  timed "$kind.delete" ember volume delete "$clone" --wait >/dev/null
  check "$kind: delete removed the clone's LV" absent lvs "$vg/volume-$clone"
  if [ $kind = thick ]; then
    disk_block >"$W/after"
    check "thick: the marker was on the disk where the LV was" grep -aq "$marker" "$W/before"
    check "thick: the deleted LV's data was wiped from the disk" absent grep -aq "$marker" "$W/after"
  fi
  # Revert in place: the volume reads as its snapshot again. Only the chunks that differ are written, so on thin
  # the blocks it shares with the snapshot stay shared and the volume's allocation does not grow.
  used_before=$(lvs --noheadings -o data_percent "$vg/volume-$vol" 2>/dev/null | tr -d ' ')
  # The thin pool's used data blocks, exactly (dmsetup status: "<used>/<total>" data blocks, field 6).
  pool_used() { dmsetup status ember--thin-ember--thin--pool-tpool | awk '{ split($6, b, "/"); print b[1] }'; }
  [ $kind = thin ] && pool_before=$(pool_used)
  timed "$kind.revert" ember volume revert "$vol" "$snap" --wait >/dev/null
  check "$kind: revert put the snapshot's data back in the LV" same_head "$W/pattern-a" "/dev/$vg/volume-$vol" 4194304
  # Only the 1 MiB chunks written since the snapshot are read (what the snapshot's copy-on-write store, or
  # thin_delta, says changed): the first 4 MiB and the one holding the page at 9 MiB; not the 2 GiB of both
  # thick LVs, nor the rest of the 4 MiB at 8 MiB that the thin LVs share. Of those, only the pages that differ
  # are written, so the shared blocks around that page stay shared (the allocation check below).
  reverted() { # reverted VOLUME FIELDS: the storage agent logged that revert of VOLUME with FIELDS
    tr -d '\033' <"$W/logs/storage.log" | sed 's/\[[0-9;]*m//g' | grep 'volume reverted' | grep "$1" | grep -q "$2"
  }
  check "$kind: ... comparing only the 5 MiB written since the snapshot, rewriting 4 MiB and a page" \
    reverted "$vol" 'compared=5242880 changed=4198400'
  check "$kind: ... and the data both share is still there" \
    sh -c "dd if=/dev/$vg/volume-$vol bs=1M skip=8 count=4 iflag=direct status=none | cmp - '$W/pattern-c'"
  check "$kind: ... and the volume is available" test "$(ember --json volume show "$vol" | json_field status)" = available
  if [ $kind = thin ]; then
    used_after=$(lvs --noheadings -o data_percent "$vg/volume-$vol" 2>/dev/null | tr -d ' ')
    check "thin: ... and provisioned no more of the volume ($used_before% -> $used_after%)" \
      awk -v a="$used_after" -v b="$used_before" 'BEGIN { exit !(a + 0 <= b + 0) }'
    # Rewriting the whole 1 MiB around the changed page would have taken new blocks for the 15 it shares.
    check "thin: ... nor of the pool: the blocks shared with the snapshot stay shared ($pool_before -> $(pool_used))" \
      test "$(pool_used)" = "$pool_before"
  fi
  ember snapshot delete "$snap" --wait >/dev/null
  ember volume delete "$from_snap" --wait >/dev/null
  ember volume delete "$vol" --wait >/dev/null
  check "$kind: every owned LV is gone" test -z "$(lvs --noheadings -o lv_name -S lv_tags=ember $vg)"
done

# ---------------------------------------------------------------- backups of LVs
head -c 4194304 /dev/zero >"$W/zeros"
at() { dd if="$1" bs=1M skip="$2" count=4 iflag=direct status=none; } # at DEVICE MiB: the 4 MiB there
put() { dd if="$1" of="$2" bs=1M seek="$3" oflag=direct conv=notrunc,fsync status=none; } # put FILE DEVICE MiB
holds() { at "$1" "$2" | cmp - "$3"; } # holds DEVICE MiB FILE
backup_of() { ember --json backup create "$@" --wait | json_field id; }
field_of() { ember --json backup show "$1" | json_field "$2"; }
thin_used() { lvs --noheadings -o data_percent "ember-thin/volume-$1" | tr -d ' '; }
below() { awk -v v="$1" -v max="$2" 'BEGIN { exit !(v != "" && v + 0 < max + 0) }'; }
streamed_thin() { # streamed_thin VOLUME BYTES: the storage agent logged reading only BYTES of the thin LV
  tr -d '\033' <"$W/logs/storage.log" | sed 's/\[[0-9;]*m//g' | grep 'streaming volume data (thin map)' | grep "$1" |
    grep -q "mapped_bytes=$2"
}

# Thick: every byte of the LV is read; a restore onto an existing LV overwrites all of it.
vol=$(new_volume thick --size 1)
put "$W/pattern-a" "/dev/ember-thick/volume-$vol" 0
put "$W/pattern-b" "/dev/ember-thick/volume-$vol" 700
bk=$(timed thick.backup backup_of "$vol")
check "thick backup: available" test "$(field_of "$bk" status)" = available
check "thick backup: stores the 8 MiB of data, not the zeros" test "$(field_of "$bk" stored_bytes)" -lt 9437184
target=$(new_volume thick --size 1)
put "$W/pattern-a" "/dev/ember-thick/volume-$target" 300
timed thick.restore ember backup restore "$bk" --volume "$target" --wait >/dev/null
check "thick restore onto an existing LV: bit-identical, old data overwritten" \
  cmp "/dev/ember-thick/volume-$vol" "/dev/ember-thick/volume-$target"
check "thick restore onto an existing LV: a whole restore leaves no incomplete tag" \
  absent lv_has_tag "ember-thick/volume-$target" ember-incomplete
# A restore cut short: one stored chunk damaged, so the backup agent stops its stream there. The storage agent
# tagged the LV before its first write and keeps the tag, so manage would refuse the partial data. The chunk is
# put back afterwards: later backups of the same patterns reuse it.
chunk=$(find "$W/repository/chunks" -type f | head -1)
cp "$chunk" "$W/chunk.orig"
printf 'X' | dd of="$chunk" bs=1 seek=100 conv=notrunc status=none
ember backup restore "$bk" --volume "$target" --wait >/dev/null 2>"$W/refused"
check "thick restore from a damaged chunk: fails naming it" grep -q "$(basename "$chunk")" "$W/refused"
check "thick restore from a damaged chunk: the target LV stays tagged incomplete" \
  lv_has_tag "ember-thick/volume-$target" ember-incomplete
cp "$W/chunk.orig" "$chunk"
ember backup delete "$bk" --wait >/dev/null
for v in "$vol" "$target"; do ember volume delete "$v" --wait >/dev/null; done

# Thin: only the blocks the pool has mapped are read. 64 GiB holding 8 MiB would be minutes of zeros here.
big=$(new_volume thin --size 64)
put "$W/pattern-a" "/dev/ember-thin/volume-$big" 0
put "$W/pattern-b" "/dev/ember-thin/volume-$big" 40960
# The pool's metadata snapshot an agent killed between reserving and releasing it would leave behind.
tpool=ember--thin-ember--thin--pool-tpool
held_root() { dmsetup status "$tpool" | awk '{ print $7 }'; } # "-" when no metadata snapshot is held
mapped_bytes() { # mapped_bytes VOLUME: how much of the thin LV its pool maps, read from the pool's metadata
  dmsetup message "$tpool" 0 reserve_metadata_snap
  thin_dump --metadata-snap --dev-id "$(lvs --noheadings -o thin_id "ember-thin/volume-$1" | tr -d ' ')" \
    /dev/mapper/ember--thin-ember--thin--pool_tmeta >"$W/thin_dump.xml"
  dmsetup message "$tpool" 0 release_metadata_snap
  awk -F'"' '{ for (i = 1; i < NF; i++) {
      if ($i ~ /data_block_size=$/) bytes = $(i + 1) * 512
      if ($i ~ / length=$/) blocks += $(i + 1) } }
    /<single_mapping/ { blocks++ }
    END { print blocks * bytes }' "$W/thin_dump.xml"
}
dmsetup message "$tpool" 0 reserve_metadata_snap
check "thin: (a crashed agent's) metadata snapshot is held" test "$(held_root)" != -
full=$(timed thin.backup backup_of "$big")
check "thin backup: available" test "$(field_of "$full" status)" = available
check "thin backup: the storage agent read only the 8 MiB the pool maps" streamed_thin "$big" 8388608
check "thin backup: ... after releasing the metadata snapshot left behind" grep -q "left reserved" "$W/logs/storage.log"
check "thin backup: ... and it holds none now" test "$(held_root)" = -
put "$W/pattern-c" "/dev/ember-thin/volume-$big" 20480
inc=$(timed thin.incremental backup_of "$big" --incremental)
new_bytes=$(field_of "$inc" new_bytes) # stored: raw random data and a small header per chunk
check "thin incremental: only the 4 MiB written since is new ($new_bytes bytes)" test "$new_bytes" -ge 4194304 -a "$new_bytes" -lt 4259840
check "thin incremental: ... and only the 12 MiB mapped were read" streamed_thin "$big" 12582912
check "thin: the map's thin_dump files are gone from the agent's state directory" \
  test -z "$(find "$W/state" -name '.thin_dump-*')"
target=$(new_volume thin --size 64)
put "$W/pattern-b" "/dev/ember-thin/volume-$target" 30720
put "$W/pattern-a" "/dev/ember-thin/volume-$target" 50000
check "thin: the restore target maps its 8 MiB of old data ($(mapped_bytes "$target") bytes)" \
  test "$(mapped_bytes "$target")" = 8388608
timed thin.restore_onto ember backup restore "$inc" --volume "$target" --wait >/dev/null
for spot in 0:pattern-a 20480:pattern-c 40960:pattern-b 30720:zeros 50000:zeros 10240:zeros; do
  check "thin restore onto an existing LV: ${spot#*:} at ${spot%:*} MiB" \
    holds "/dev/ember-thin/volume-$target" "${spot%:*}" "$W/${spot#*:}"
done
check "thin restore onto an existing LV: the zeros did not provision the LV ($(thin_used "$target")% used)" \
  below "$(thin_used "$target")" 0.1
check "thin restore onto an existing LV: the pool maps only the 12 MiB restored; the old blocks went back" \
  test "$(mapped_bytes "$target")" = 12582912
new=$(timed thin.restore_new ember --json backup restore "$inc" --wait | json_field volume_id)
check "thin restore to a new volume: scheduled into the thin pool" lvs "ember-thin/volume-$new"
check "thin restore to a new volume: a whole restore leaves no incomplete tag" \
  absent lv_has_tag "ember-thin/volume-$new" ember-incomplete
for spot in 0:pattern-a 20480:pattern-c 40960:pattern-b; do
  check "thin restore to a new volume: ${spot#*:} at ${spot%:*} MiB" \
    holds "/dev/ember-thin/volume-$new" "${spot%:*}" "$W/${spot#*:}"
done
check "thin restore to a new volume: the pool maps only the 12 MiB of data ($(mapped_bytes "$new") bytes)" \
  test "$(mapped_bytes "$new")" = 12582912
# A pool that takes no discards: the restore falls back to writing zeros over the old data. The mode can only
# change while the pool and its LVs are inactive; nothing holds them open between requests.
vgchange -q -an ember-thin >>"$OUT/checks.log" 2>&1
lvchange -q --discards ignore ember-thin/ember-thin-pool >>"$OUT/checks.log" 2>&1
vgchange -q -ay ember-thin >>"$OUT/checks.log" 2>&1
check "thin, discards=ignore: the pool takes no discards now" \
  test "$(lvs --noheadings -o discards ember-thin/ember-thin-pool | tr -d ' ')" = ignore
put "$W/pattern-a" "/dev/ember-thin/volume-$new" 30720
timed thin.restore_no_discards ember backup restore "$inc" --volume "$new" --wait >/dev/null
for spot in 0:pattern-a 20480:pattern-c 40960:pattern-b 30720:zeros; do
  check "thin restore, discards=ignore: ${spot#*:} at ${spot%:*} MiB" \
    holds "/dev/ember-thin/volume-$new" "${spot%:*}" "$W/${spot#*:}"
done
check "thin restore, discards=ignore: zeros were written over the old 4 MiB, which stay mapped" \
  test "$(mapped_bytes "$new")" = 16777216
# Retypes that move the volume between the pools (migration policy on-demand): the storage agent copies from
# itself, thick LV to thin LV and back, reading only where the data is and clearing everything else.
mig=$(new_volume thick --size 1)
put "$W/pattern-a" "/dev/ember-thick/volume-$mig" 0
put "$W/pattern-b" "/dev/ember-thick/volume-$mig" 700
timed migrate.thick_to_thin ember volume retype "$mig" thin --migration-policy on-demand --wait >/dev/null
check "retype thick → thin: the volume moved into the thin pool" lvs "ember-thin/volume-$mig"
check "retype thick → thin: ... and its thick LV is gone" sh -c "! lvs ember-thick/volume-$mig 2>/dev/null"
for spot in 0:pattern-a 700:pattern-b 300:zeros; do
  check "retype thick → thin: ${spot#*:} at ${spot%:*} MiB" holds "/dev/ember-thin/volume-$mig" "${spot%:*}" "$W/${spot#*:}"
done
check "retype thick → thin: the pool maps only the 8 MiB of data ($(mapped_bytes "$mig") bytes)" \
  test "$(mapped_bytes "$mig")" = 8388608
timed migrate.thin_to_thick ember volume retype "$mig" thick --migration-policy on-demand --wait >/dev/null
check "retype thin → thick: the volume is a thick LV again" lvs "ember-thick/volume-$mig"
check "retype thin → thick: ... and its thin LV is gone" sh -c "! lvs ember-thin/volume-$mig 2>/dev/null"
for spot in 0:pattern-a 700:pattern-b 300:zeros 1020:zeros; do
  check "retype thin → thick: ${spot#*:} at ${spot%:*} MiB" holds "/dev/ember-thick/volume-$mig" "${spot%:*}" "$W/${spot#*:}"
done
ember volume delete "$mig" --wait >/dev/null
fields=lv_name,lv_size,lv_attr,pool_lv,origin,data_percent,lv_tags,thin_id
lvs --reportformat json --units b --nosuffix -a -o "$fields" ember-thin >"$OUT/lvs-thin-ids.json" 2>&1
ember backup delete "$inc" --wait >/dev/null
ember backup delete "$full" --wait >/dev/null
for v in "$big" "$target" "$new"; do ember volume delete "$v" --wait >/dev/null; done
check "backups: every owned LV is gone" test -z "$(lvs --noheadings -o lv_name -S lv_tags=ember ember-thick ember-thin)"

# ---------------------------------------------------------------- encrypted LVs
# An encrypted type's volumes are LUKS1 containers that qemu-img formats in place on the LV. The key never
# reaches this node's disks (the compute host's QEMU opens the container), so the checks read the header's
# fields on the LV, and follow it byte for byte through extend, clone, backup and restore.
field() { dd if="$1" bs=1 skip="$2" count="$3" status=none | tr -d '\0'; } # field DEVICE OFFSET LENGTH: text
u32() { dd if="$1" bs=1 skip="$2" count=4 status=none | od -An -tu1 | awk '{ print (($1 * 256 + $2) * 256 + $3) * 256 + $4 }'; }
header=1052672 # what the coordinator records for key_size 256: 4 KiB, then 8 key slots of 128 KiB
for kind in thick thin; do
  vg=ember-$kind
  ember type create "secret-$kind" --spec volume_backend_name=$kind --spec encryption:provider=luks >/dev/null
  enc=$(timed "$kind.encrypted_create" new_volume "secret-$kind" --size 1)
  dev=/dev/$vg/volume-$enc
  check "$kind encrypted: the volume is an LV of the $kind pool, of 1 GiB" test "$(lv_size "$vg/volume-$enc")" = 1073741824
  check "$kind encrypted: the LV starts with a LUKS1 header" \
    test "$(head -c 8 "$dev" | od -An -tx1 | tr -d ' ')" = 4c554b53babe0001 # magic, then version 1 (u16)
  check "$kind encrypted: ... aes, xts-plain64, sha512, a 32-byte key" \
    test "$(field "$dev" 8 32)/$(field "$dev" 40 32)/$(field "$dev" 72 32)/$(u32 "$dev" 108)" = aes/xts-plain64/sha512/32
  check "$kind encrypted: ... whose payload starts where the coordinator says ($(($(u32 "$dev" 104) * 512)) bytes)" \
    test "$(($(u32 "$dev" 104) * 512))" = $header
  check "$kind encrypted: ... with key slot 0 in use" test "$(u32 "$dev" 208)" = $((0x00AC71F3))
  if [ $kind = thin ]; then
    check "thin encrypted: the pool maps the header, not the payload ($(mapped_bytes "$enc") bytes)" \
      below "$(mapped_bytes "$enc")" 2097153
  fi
  head -c $header "$dev" >"$W/header-$kind"
  put "$W/pattern-a" "$dev" 4 # what a guest's writes leave there: ciphertext
  timed "$kind.encrypted_extend" ember volume extend "$enc" 2 --wait >/dev/null
  check "$kind encrypted: extend grew the LV to 2 GiB" test "$(lv_size "$vg/volume-$enc")" = 2147483648
  check "$kind encrypted: ... and left the header (the payload grows with the LV)" same_head "$W/header-$kind" "$dev" $header
  clone=$(timed "$kind.encrypted_clone" new_volume "secret-$kind" --source-volume "$enc")
  check "$kind encrypted: a clone holds the same header" same_head "$W/header-$kind" "/dev/$vg/volume-$clone" $header
  check "$kind encrypted: ... and the same data" holds "/dev/$vg/volume-$clone" 4 "$W/pattern-a"
  bk=$(timed "$kind.encrypted_backup" backup_of "$enc")
  check "$kind encrypted: backup available" test "$(field_of "$bk" status)" = available
  ember backup restore "$bk" --type "$kind" --wait >/dev/null 2>"$W/refused"
  check "$kind encrypted: restoring it into a plain type is refused" grep -q "encrypted" "$W/refused"
  back=$(timed "$kind.encrypted_restore" ember --json backup restore "$bk" --type "secret-$kind" --wait | json_field volume_id)
  check "$kind encrypted: the restore is an LV of the $kind pool, bit-identical" cmp "$dev" "/dev/$vg/volume-$back"
  ember backup delete "$bk" --wait >/dev/null
  for v in "$clone" "$back" "$enc"; do ember volume delete "$v" --wait >/dev/null; done
  check "$kind encrypted: every owned LV is gone" test -z "$(lvs --noheadings -o lv_name -S lv_tags=ember $vg)"
done

check "the agent's capacity report reached the coordinator (thin pool)" sh -c "ember --json service list | grep -q thin"
kill -TERM "$storage" "$backup" "$coordinator"
wait "$storage" "$backup" "$coordinator" 2>/dev/null
lvs --reportformat json --units b --nosuffix -a >"$OUT/lvs-final.json" 2>&1
cp "$W"/logs/* "$OUT/"
finish lvm
