#!/usr/bin/env bash
# Runs inside the real-kernel guest: the kernel NFS server exports an ext4 disk on the guest's loopback, and a
# fleet (coordinator, storage agent, backup agent) uses it the way a user would — the storage agent's file
# backend on an NFS 4.2 mount it makes itself, the backup agent's repository on another share of the same
# server. Checks: sparse volume files on the server, snapshot and clone data, a backup whose chunks land on
# the server, a bit-identical restore, verify, deletes that leave nothing behind, a repository share that a
# second backup agent refuses while the first holds it, and a dead server that fails a backup, not the agents.
set -u
JOB=$(cd "$(dirname "$0")" && pwd)
OUT=/ember/out
W=/tmp/ember-nfs
mkdir -p "$OUT" "$W"/{certs,logs,state}
export PATH=$JOB:$PATH
source "$JOB/lib.sh"

# ---------------------------------------------------------------- the NFS server (v4 only, on 127.0.0.1)
modprobe -a ext4 nfsd nfsv4
mkfs.ext4 -q -F "$EMBER_GUEST_DISK2"
mkdir -p /srv/nfs /run/rpc_pipefs /var/lib/nfs/nfsdcld /var/lib/nfs/v4recovery
mount -t ext4 "$EMBER_GUEST_DISK2" /srv/nfs
mkdir -p /srv/nfs/volumes /srv/nfs/backups
mount -t rpc_pipefs rpc_pipefs /run/rpc_pipefs
mount -t nfsd nfsd /proc/fs/nfsd
nfsdcld -p /run/rpc_pipefs # a client tracker, so the server skips the 90 s grace period of a first start
echo "/srv/nfs 127.0.0.1(rw,no_root_squash,sync,no_subtree_check)" >/etc/exports
exportfs -ra
rpc.mountd -N 2 -N 3 --no-udp
rpc.nfsd -N 3 --no-udp 8
check "nfs: the kernel server exports /srv/nfs on the guest's loopback" sh -c "exportfs | grep -q /srv/nfs"

# ---------------------------------------------------------------- the fleet
fleet_certs "$W/certs" coordinator:coordinator storage-agent:storage2 backup-agent:backup1 backup-agent:backup2
# Heartbeats every 2 s, down after 10 s without one: the dead-server check below sees an agent whose heartbeat
# waits on a dead mount go down.
{
  printf 'listen = "127.0.0.1:7010"\ndatabase = "%s/ember.db"\n' "$W"
  printf 'heartbeat_interval_seconds = 2\nservice_down_seconds = 10\n'
  tls coordinator
} >"$W/coordinator.toml"
cat >"$W/storage.toml" <<CFG
name = "storage2"
listen = "127.0.0.1:7011"
coordinator = "https://127.0.0.1:7010"
state_dir = "$W/state"

[[backends]]
name = "nfs1"
driver = "file"
directory = "/mnt/ember-volumes"
nfs_share = "127.0.0.1:/srv/nfs/volumes"

[tgt]
control_port = 9
portal = "127.0.0.1:3262"

CFG
tls storage2 >>"$W/storage.toml"
cat >"$W/backup.toml" <<CFG
name = "backup1"
listen = "127.0.0.1:7013"
coordinator = "https://127.0.0.1:7010"

[[repositories]]
name = "nfsrepo"
directory = "/mnt/ember-backups"
nfs_share = "127.0.0.1:/srv/nfs/backups"

CFG
tls backup1 >>"$W/backup.toml"
mkdir -p /mnt/ember-volumes /mnt/ember-backups
export EMBER_COORDINATOR=https://127.0.0.1:7010
ember-coordinator --config "$W/coordinator.toml" >"$W/logs/nfs-coordinator.out" 2>"$W/logs/nfs-coordinator.log" &
coordinator=$!
ember-storage-agent --config "$W/storage.toml" >"$W/logs/nfs-storage.out" 2>"$W/logs/nfs-storage.log" &
storage=$!
ember-backup-agent --config "$W/backup.toml" >"$W/logs/nfs-backup.out" 2>"$W/logs/nfs-backup.log" &
backup=$!
up() { ember service list | grep "$1" | grep -q ' up'; }
check "nfs: the storage agent registers" wait_for 90 up storage2
check "nfs: the backup agent registers" wait_for 90 up backup1
check "nfs: the storage agent mounted its share with NFS 4.2" sh -c "grep ' /mnt/ember-volumes nfs4 ' /proc/mounts | grep -q vers=4.2"
check "nfs: the backup agent mounted its repository share" sh -c "grep -q ' /mnt/ember-backups nfs4 ' /proc/mounts"

# A second backup agent given the same share, as a second backup node would be, must refuse it: its start-up
# clean-up and its garbage collection know nothing of the first agent's running backups. The lock is an NFS
# lock, held on the server.
sed -e 's/"backup1"/"backup2"/' -e 's/:7013"/:7014"/' -e 's#/mnt/ember-backups"#/mnt/ember-backups2"#' \
  -e 's#/backup1\.#/backup2.#' "$W/backup.toml" >"$W/backup2.toml"
mkdir -p /mnt/ember-backups2
refuses_shared_repository() {
  ! timeout 60 ember-backup-agent --config "$W/backup2.toml" >/dev/null 2>"$W/logs/nfs-backup2.log" &&
    grep -q 'repository nfsrepo at /mnt/ember-backups2: in use by another process (backup agent backup1 ' \
      "$W/logs/nfs-backup2.log"
}
check "nfs: a second backup agent on the same share refuses it, naming the first" refuses_shared_repository
check "nfs: ... which holds the lock file on the server" grep -q 'backup agent backup1 ' /srv/nfs/backups/lock
check "nfs: ... and the refused agent left the share it mounted unmounted" absent grep -q ' /mnt/ember-backups2 ' /proc/mounts

# A storage agent whose start is refused after it mounted its share (a later backend's volume group is not
# there) unmounts it again. It never gets as far as TLS, so it borrows storage2's settings.
{
  sed -e 's/:7011"/:7015"/' -e 's#/mnt/ember-volumes"#/mnt/ember-volumes3"#' -e "s#$W/state\"#$W/state3\"#" \
    "$W/storage.toml"
  printf '[[backends]]\nname = "lvm9"\ndriver = "lvm"\nvolume_group = "ember-no-such-vg"\n'
} >"$W/storage3.toml"
mkdir -p /mnt/ember-volumes3
refuses_missing_volume_group() {
  ! timeout 60 ember-storage-agent --config "$W/storage3.toml" >/dev/null 2>"$W/logs/nfs-storage3.log" &&
    grep -q 'ember-storage-agent: backend lvm9: ' "$W/logs/nfs-storage3.log"
}
check "nfs: a storage agent whose second backend will not open refuses to start, naming it" refuses_missing_volume_group
check "nfs: ... after it had mounted its first backend's share" grep -q 'NFS share mounted.*/mnt/ember-volumes3' "$W/logs/nfs-storage3.log"
check "nfs: ... which it unmounted again" absent grep -q ' /mnt/ember-volumes3 ' /proc/mounts

vol=$(timed nfs.create ember --json volume create --size 1 --wait | json_field id)
check "nfs: the volume file is on the server" test -f "/srv/nfs/volumes/volume-$vol"
check "nfs: ... and sparse (a 1 GiB thin volume allocates almost nothing)" test "$(du -k "/srv/nfs/volumes/volume-$vol" | cut -f1)" -lt 1024
head -c 8388608 /dev/urandom >"$W/data"
dd if="$W/data" of="/mnt/ember-volumes/volume-$vol" bs=1M seek=100 conv=notrunc,fsync status=none
same_region() { dd if="$1" bs=1M skip=100 count=8 status=none | cmp - "$W/data"; }
check "nfs: data written through the client is on the server" same_region "/srv/nfs/volumes/volume-$vol"
snap=$(timed nfs.snapshot ember --json snapshot create "$vol" --wait | json_field id)
check "nfs: the snapshot file holds the data" same_region "/srv/nfs/volumes/snapshot-$snap"
clone=$(timed nfs.from_snapshot ember --json volume create --snapshot "$snap" --size 2 --wait | json_field id)
check "nfs: a volume from the snapshot holds the data" same_region "/srv/nfs/volumes/volume-$clone"
check "nfs: ... and grew to 2 GiB" test "$(stat -c %s "/srv/nfs/volumes/volume-$clone")" = 2147483648
check "nfs: ... sparsely" test "$(du -k "/srv/nfs/volumes/volume-$clone" | cut -f1)" -lt 65536

bk=$(timed nfs.backup ember --json backup create "$vol" --wait | json_field id)
check "nfs: the backup is available" sh -c "ember --json backup show $bk | grep -q '\"status\": \"available\"'"
check "nfs: its chunks are on the NFS server" test -n "$(find /srv/nfs/backups -type f -name '[0-9a-f]*' | head -1)"
check "nfs: verify finds every chunk intact" sh -c "ember --json backup verify $bk | grep -q '\"ok\": true'"
restored=$(timed nfs.restore ember --json backup restore "$bk" --wait | json_field volume_id)
check "nfs: the restore is bit-identical to the volume" cmp "/srv/nfs/volumes/volume-$vol" "/srv/nfs/volumes/volume-$restored"

# The backup node dies (SIGKILL, no clean-up). Another agent mounts the same share: the NFS client gave up the
# dead process's lock on the server, so it starts, and it takes the repository over with the backup in it.
kill -KILL "$backup"
wait "$backup" 2>/dev/null
check "nfs: the killed backup agent is seen down" wait_for 60 absent up backup1
ember-backup-agent --config "$W/backup2.toml" >"$W/logs/nfs-backup2.out" 2>"$W/logs/nfs-backup2-takeover.log" &
backup=$!
check "nfs: a second backup agent gets the dead one's share and registers" wait_for 90 up backup2
check "nfs: ... and holds the lock on the server" grep -q 'backup agent backup2 ' /srv/nfs/backups/lock
ember --json backup import-repository backup2@nfsrepo >>"$OUT/checks.log" 2>&1
check "nfs: import-repository moves the backup to it" sh -c "ember --json backup show $bk | grep -q '\"host\": \"backup2@nfsrepo\"'"
moved=$(timed nfs.restore_after_takeover ember --json backup restore "$bk" --wait | json_field volume_id)
check "nfs: ... and it restores bit-identically from there" cmp "/srv/nfs/volumes/volume-$vol" "/srv/nfs/volumes/volume-$moved"

ember backup delete "$bk" --wait >/dev/null
for v in "$clone" "$restored" "$moved"; do ember volume delete "$v" --wait >/dev/null; done
ember snapshot delete "$snap" --wait >/dev/null
ember volume delete "$vol" --wait >/dev/null
check "nfs: deletes left no volume or snapshot file on the server" test -z "$(ls /srv/nfs/volumes)"

# A dead server. The soft mounts turn every file call into an error once their timeout runs out, and the agents
# keep heartbeating meanwhile: their capacity reports, which read the mounts, are built off their async threads
# and a heartbeat does not wait for one that is stuck.
dead=$(ember --json volume create --size 1 --wait | json_field id)
rpc.nfsd 0
stopped_at=$(now_ms)
dead_backup=$(ember --json backup create "$dead" | json_field id)
agents_up() { up storage2 && up backup2; }
# Polled until the backup settles; notes any moment an agent was seen down.
backup_failed() {
  agents_up || echo "$(now_ms)" >>"$W/agent-down"
  ember --json backup show "$dead_backup" | grep -q '"status": "error"'
}
check "nfs: with the server stopped, a backup ends in error instead of hanging" wait_for 400 backup_failed
echo "nfs.dead_server_backup_error $(($(now_ms) - stopped_at))" >>"$OUT/timings.txt"
ember --json backup show "$dead_backup" >>"$OUT/checks.log" 2>&1
check "nfs: ... and both agents stayed up all the while" test ! -e "$W/agent-down"
rpc.nfsd -N 3 --no-udp 8
echo Y >/proc/fs/nfsd/v4_end_grace 2>/dev/null || true

kill -TERM "$storage" "$backup" "$coordinator"
wait "$storage" "$backup" "$coordinator" 2>/dev/null
cp "$W"/logs/* "$OUT/"
finish nfs
