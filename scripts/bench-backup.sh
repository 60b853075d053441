#!/usr/bin/env bash
# Backup benchmark through the whole fleet (coordinator + storage agent + backup agent on loopback, file
# backend), on the deterministic volume of ../shared/bench/make_volume.py:
#   full backup, incremental after mutating 1% of the runs, restore to a new volume; backup-agent peak RSS
#   and stored bytes; and the CPU time each data agent spent in each step (from /proc/<pid>/stat), which
#   shows whether a step waits or computes. For the restore it also counts the bytes both agents moved through
#   the disk (/proc/<pid>/io) and measures, with dd, how fast this disk moves reads and writes at once: how
#   long that I/O alone takes while the repository and the volumes share one disk, as they do here.
# Start a release fleet first (EMBER_RELEASE=1 ./scripts/fleet.sh), then:
#   ./scripts/bench-backup.sh [SIZE]        (default 1G; the issue's figures also want 8G for the RSS)
# The run deletes its backups at the end, and starts with a garbage collection. GC keeps chunks younger than
# gc_grace_seconds (60 s), so a run started sooner finds the last run's chunks and its full backup stores
# less than a cold one would; the output says so when that happens.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1G}
state=${EMBER_STATE:-$PWD/.ember-dev}
make_volume=${EMBER_MAKE_VOLUME:-$PWD/../shared/bench/make_volume.py}
bin=$PWD/target/release
export EMBER_CLI_CONFIG=$state/cli.toml
ember() { "$bin/ember" "$@"; }
now() { date +%s.%N; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gib=${size%G}
ember backup gc >/dev/null
python3 "$make_volume" create --size "$size" --out "$work/vol.img" --seed 1 >/dev/null
vol=$(ember --json volume create --size "$gib" --name bench-backup --wait 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
file=$state/file-backend/volume-$vol
dd if="$work/vol.img" of="$file" bs=1M conv=notrunc,sparse status=none
sync

agent_pid=$(pgrep -f "ember-backup-agent --config $state/backup.toml" | head -1)
storage_pid=$(pgrep -f "ember-storage-agent --config $state/storage.toml" | head -1)
ticks() { awk '{ printf "%d ", $14 + $15 }' "/proc/$1/stat"; } # user + system CPU, in clock ticks
cpu() { echo "$(ticks "$agent_pid")$(ticks "$storage_pid")"; }
c0=$(cpu); t0=$(now); full=$(ember --json backup create "$vol" --wait 2>/dev/null | python3 -c 'import json,sys; b=json.load(sys.stdin)[0]; print(b["id"], b["stored_bytes"], b["new_bytes"])'); t1=$(now); c1=$(cpu)
python3 "$make_volume" mutate --volume-file "$work/vol.img" --seed 2 --fraction 0.01 >/dev/null
# Not sparse this time: runs that became zero must overwrite their old data.
dd if="$work/vol.img" of="$file" bs=1M conv=notrunc status=none
sync
c2=$(cpu); t2=$(now); inc=$(ember --json backup create "$vol" --incremental --wait 2>/dev/null | python3 -c 'import json,sys; b=json.load(sys.stdin)[0]; print(b["id"], b["new_bytes"])'); t3=$(now); c3=$(cpu)
read -r full_id stored full_new <<<"$full"
read -r inc_id inc_new <<<"$inc"
disk_bytes() { awk '/^(read|write)_bytes/ { n += $2 } END { printf "%.0f\n", n }' "/proc/$agent_pid/io" "/proc/$storage_pid/io"; }
d4=$(disk_bytes)
c4=$(cpu); t4=$(now); restored=$(ember --json backup restore "$inc_id" --wait 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["volume_id"])'); t5=$(now); c5=$(cpu)
d5=$(disk_bytes)
same=$(cmp -s "$work/vol.img" "$state/file-backend/volume-$restored" && echo yes || echo NO)
rss=$(awk '/VmHWM/ {print $2}' "/proc/$agent_pid/status")
# The disk's speed with reads and writes at once, as a restore uses it: 512 MiB read while 512 MiB are written
# into a new sparse file, both with O_DIRECT, in the state directory (where the repository and volumes are).
probe_in=$state/disk-probe-in probe_out=$state/disk-probe-out
dd if="$work/vol.img" of="$probe_in" bs=1M count=512 oflag=direct status=none
rm -f "$probe_out" && truncate -s 512M "$probe_out"
t6=$(now)
dd if="$probe_in" of=/dev/null bs=1M iflag=direct status=none & probe_reader=$!
dd if="$work/vol.img" of="$probe_out" bs=1M count=512 oflag=direct conv=notrunc status=none
wait "$probe_reader"
t7=$(now)
rm -f "$probe_in" "$probe_out"
python3 - "$size" "$t0" "$t1" "$t2" "$t3" "$t4" "$t5" "$stored" "$inc_new" "$rss" "$same" "$(getconf CLK_TCK)" \
  "$full_new" "$d4" "$d5" "$t6" "$t7" "$c0" "$c1" "$c2" "$c3" "$c4" "$c5" <<'PY'
import sys
size, t0, t1, t2, t3, t4, t5, stored, new, rss, same, hz, full_new, d4, d5, t6, t7 = sys.argv[1:18]
c = [list(map(int, x.split())) for x in sys.argv[18:]]
t = lambda a, b: float(b) - float(a)
def cpu(a, b):
    backup, storage = (c[b][i] - c[a][i] for i in (0, 1))
    return f"CPU: backup agent {backup / int(hz):4.2f} s, storage agent {storage / int(hz):4.2f} s"
print(f"volume {size} (make_volume.py seed 1; incremental: mutate seed 2, fraction 0.01)")
print(f"full backup      {t(t0, t1):6.2f} s   stored {int(stored)/1e6:8.1f} MB   {cpu(0, 1)}")
print(f"incremental      {t(t2, t3):6.2f} s   new    {int(new)/1e6:8.1f} MB   {cpu(2, 3)}")
print(f"restore          {t(t4, t5):6.2f} s   bit-identical: {same}   {cpu(4, 5)}")
disk_rate = 2 * 512 * 2**20 / t(t6, t7)
moved = int(d5) - int(d4)
print(f"  disk: the restore read and wrote {moved/1e6:.0f} MB; this disk moves {disk_rate/1e6:.0f} MB/s with reads "
      f"and writes at once (dd, O_DIRECT), so that I/O alone takes {moved/disk_rate:.2f} s here")
print(f"backup-agent peak RSS {int(rss)/1024:.1f} MiB")
if int(full_new) < int(stored):
    print(f"NOTE: the repository already held {(int(stored) - int(full_new))/1e6:.1f} MB of these chunks (a run less "
          "than gc_grace_seconds ago?), so the full backup wrote less than a cold one: wait a minute and run again")
PY
for b in "$inc_id" "$full_id"; do ember backup delete "$b" --wait >/dev/null 2>&1 || true; done
for v in "$restored" "$vol"; do ember volume delete "$v" >/dev/null 2>&1 || true; done
