#!/usr/bin/env python3
"""A chaos soak of the all-in-one fleet, by hand (not part of CI: it is random by design).

It runs the coordinator, the storage agent and the backup agent of a fleet that `./scripts/fleet.sh` made
(stop that first; its state directory holds the configs), drives a workload through the `ember` CLI from a
few threads (creates, clones, snapshots, backups full and incremental, restores, extends, reverts, deletes)
and meanwhile SIGKILLs one of the three daemons every 2-6 s and starts it again 0.2-3 s later. Then it waits
for everything to settle and checks what must hold after any crash:

- no volume, snapshot or backup is left in a transitional status;
- `ember quota check` finds no drift between recorded usage and what exists;
- each of the two file backends holds exactly the volumes and snapshots the coordinator places there (the
  soak adds a second backend, file2, to the storage agent's config and migrates volumes between the two);
- every available backup verifies (every chunk present and hashing to its name).

Exit status 0 when all hold. Usage:

    EMBER_STATE=/tmp/f ./scripts/fleet.sh      # once, to make the state directory; then stop it (Ctrl-C)
    ./scripts/chaos.py /tmp/f [SECONDS] [SEED]  # default 120 s, seed 1

The workload runs as admin, whose quotas it raises first, and keeps below them (from 30 volumes, or 30 backups, it
deletes instead of making more); the log is STATE/chaos.log.

With EMBER_CHAOS_COMPUTE=1 the compute agent joins in (libvirtd must answer: `./scripts/libvirtd.sh start`;
the project's instance image must be built: tests/realkernel/instance-image.sh): the workload also boots up to
three instances from volumes made from that image, attaches and detaches volumes and deletes instances, and the
chaos kills the compute agent too. Then it also checks that

- no instance or attachment is left in a transitional status;
- every active instance's domain runs in libvirt with exactly the disks of its attachments (by serial), and
  libvirt runs no ember domain that no instance owns;
- tgt exports exactly the volumes that are attached.

At the end it deletes the instances it booted (and checks that their domains go).
"""
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

STATE = sys.argv[1]
DURATION = float(sys.argv[2]) if len(sys.argv) > 2 else 120
SEED = int(sys.argv[3]) if len(sys.argv) > 3 else 1
BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target",
                   "release" if os.environ.get("EMBER_RELEASE") else "debug")
COMPUTE = os.environ.get("EMBER_CHAOS_COMPUTE") == "1"
DAEMONS = {"coordinator": "ember-coordinator", "storage": "ember-storage-agent", "backup": "ember-backup-agent"}
if COMPUTE:
    DAEMONS["compute"] = "ember-compute-agent"
TRANSITIONAL = {"creating", "deleting", "extending", "restoring-backup", "backing-up", "reverting", "restoring",
                "attaching", "detaching", "migrating", "retyping", "maintenance", "building"}
INSTANCE_IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "realkernel", "instance",
                              "root.raw")
MAX_INSTANCES = 3
# Volumes, and backups: from this many on (of the quota's 40 each) the workload deletes instead of making more,
# so that a long soak keeps making, restoring and deleting rather than being refused by its quota.
CROWDED = 30
SETTLE_SECONDS = 180

env = dict(os.environ, EMBER_CLI_CONFIG=f"{STATE}/cli.toml")
log = open(f"{STATE}/chaos.log", "a")
log_lock = threading.Lock()
procs = {}
stop = threading.Event()


def say(*words):
    with log_lock:
        print(time.strftime("%H:%M:%S"), *words, file=log, flush=True)


def start(name):
    out = open(f"{STATE}/logs/{name}.log", "a")
    procs[name] = subprocess.Popen([f"{BIN}/{DAEMONS[name]}", "--config", f"{STATE}/{name}.toml"],
                                   stdout=out, stderr=out)
    say("started", name, procs[name].pid)


def ember(*args, timeout=60):
    """The CLI's JSON answer, or None (the error is logged)."""
    try:
        r = subprocess.run([f"{BIN}/ember", "--json", *args], env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        say("timeout", *args)
        return None
    if r.returncode != 0:
        say("refused", " ".join(args[:3]), r.stderr.strip()[:300])
        return None
    try:
        return json.loads(r.stdout) if r.stdout.strip() else {}
    except json.JSONDecodeError:
        return {}  # a command that answers in text (e.g. a delete's confirmation)


def listed(kind):
    return ember(kind, "list") or []


def compute_step(r, op, usable):
    instances = listed("instance")
    active = [i for i in instances if i["status"] == "active"]
    if op == "boot" and len([i for i in instances if i["status"] != "deleting"]) < MAX_INSTANCES:
        made = ember("volume", "create", "--size", "1", "--image", os.path.realpath(INSTANCE_IMAGE), "--wait",
                     timeout=120)
        if made:
            ember("instance", "create", f"chaos-{r.randrange(10**6)}", "--boot-volume", made[0]["id"], "--memory",
                  "256", "--delete-on-terminate")
    elif op == "attach" and active and usable:
        ember("volume", "attach", r.choice(usable)["id"], "--instance", r.choice(active)["id"])
    elif op == "detach":
        boot = {i["boot_volume_id"] for i in instances}
        data = [a for a in listed("attachment") if a["status"] == "attached" and a["volume_id"] not in boot]
        if data:
            ember("volume", "detach", r.choice(data)["id"])
    elif op == "delete_instance" and len(active) > 1:
        ember("instance", "delete", r.choice(active)["id"])


def one_step(r):
    ops = ["create", "create_image", "snapshot", "clone", "backup", "incremental", "restore", "delete_volume",
           "delete_snapshot", "delete_backup", "extend", "revert", "migrate"]
    if COMPUTE:
        ops += ["boot", "attach", "attach", "detach", "detach", "delete_instance"]
    op = r.choice(ops)
    volumes, snapshots, all_backups = listed("volume"), listed("snapshot"), listed("backup")
    if op in ("create", "create_image", "clone", "restore") and len(volumes) >= CROWDED:
        op = "delete_volume"
    if op in ("backup", "incremental") and len(all_backups) >= CROWDED:
        op = "delete_backup"
    if op == "create":
        ember("volume", "create", "--size", "1")
        return
    if op == "create_image":
        ember("volume", "create", "--size", "1", "--image", f"{STATE}/images/chaos-seed.raw")
        return
    usable = [v for v in volumes if v["status"] == "available"]
    broken = [v for v in volumes if v["status"].startswith("error")]
    snaps = [s for s in snapshots if s["status"] == "available"]
    backups = [b for b in all_backups if b["status"] == "available"]
    # A backup that an incremental builds on is refused deletion: the workload picks among the others.
    parents = {b.get("parent_id") for b in all_backups}
    leaves = [b for b in backups if b["id"] not in parents]
    if op in ("boot", "attach", "detach", "delete_instance"):
        compute_step(r, op, usable)
    elif op == "snapshot" and usable:
        ember("snapshot", "create", r.choice(usable)["id"])
    elif op == "clone" and snaps:
        s = r.choice(snaps)
        ember("volume", "create", "--snapshot", s["id"], "--size", str(s["size_gb"]))
    elif op in ("backup", "incremental") and usable:
        ember("backup", "create", r.choice(usable)["id"], *(["--incremental"] if op == "incremental" else []))
    elif op == "restore" and backups:
        ember("backup", "restore", r.choice(backups)["id"])
    elif op == "delete_volume" and (len(usable) > 4 or broken):
        ember("volume", "delete", r.choice(broken or usable)["id"], "--cascade")
    elif op == "delete_snapshot" and snaps:
        ember("snapshot", "delete", r.choice(snaps)["id"])
    elif op == "delete_backup" and leaves:
        ember("backup", "delete", r.choice(leaves)["id"])
    elif op == "extend" and usable:
        v = r.choice(usable)
        ember("volume", "extend", v["id"], str(v["size_gb"] + 1))
    elif op == "migrate" and volumes:
        # Any volume: the coordinator refuses those that cannot move (snapshots, a transitional status).
        ember("volume", "migrate", r.choice(volumes)["id"])
    elif op == "revert" and snaps:
        s = r.choice(snaps)
        ember("volume", "revert", s["volume_id"], s["id"])


def workload(n):
    r = random.Random(SEED * 100 + n)
    while not stop.is_set():
        one_step(r)
        time.sleep(r.uniform(0.05, 0.4))


def chaos():
    r = random.Random(SEED)
    kills = 0
    while not stop.wait(r.uniform(2, 6)):
        name = r.choice(list(DAEMONS))
        procs[name].send_signal(signal.SIGKILL)
        procs[name].wait()
        kills += 1
        say("killed", name)
        time.sleep(r.uniform(0.2, 3))
        start(name)
    say("kills", kills)


KINDS = ("volume", "snapshot", "backup") + (("instance", "attachment") if COMPUTE else ())


def settle():
    """What is still transitional after SETTLE_SECONDS (empty when everything settled)."""
    deadline = time.time() + SETTLE_SECONDS
    while True:
        busy = [(kind, x["id"], x["status"]) for kind in KINDS for x in listed(kind) if x["status"] in TRANSITIONAL]
        if not busy or time.time() > deadline:
            return busy
        time.sleep(2)


def virsh(*args):
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True).stdout


def compute_problems(volumes):
    """What libvirt and tgt hold that the coordinator's records do not say, and the reverse."""
    problems = []
    instances = listed("instance")
    attachments = listed("attachment")
    print("instance", dict(collections.Counter(i["status"] for i in instances)))
    for i in instances:
        if i["status"] != "active":
            print("  ", i["id"], i["status"], i.get("status_reason", "")[:300])
    for i in instances:
        if i["status"] != "active":
            continue
        xml = virsh("dumpxml", i["id"])
        disks = set(re.findall(r"<serial>([0-9a-f-]{36})</serial>", xml))
        attached = {a["volume_id"] for a in attachments if a["instance"] == i["id"] and a["status"] == "attached"}
        if "<domain" not in xml:
            problems.append(f"instance {i['id']} is active but libvirt has no domain for it")
        elif disks != attached:
            problems.append(f"instance {i['id']}: its domain has disks {sorted(disks)}, its attachments say "
                            f"{sorted(attached)}")
    orphans = [a["id"] for a in attachments if a["instance"] not in {i["id"] for i in instances}]
    if orphans:
        problems.append(f"attachments to instances that do not exist: {orphans}")
    owned = {f"ember-{i['id']}" for i in instances}
    domains = {d for d in virsh("list", "--all", "--name").split() if d.startswith("ember-")}
    if domains - owned:
        problems.append(f"libvirt domains no instance owns: {sorted(domains - owned)}")
    port = re.search(r"control_port = (\d+)", open(f"{STATE}/storage.toml").read()).group(1)
    targets = subprocess.run(["tgtadm", "-C", port, "--lld", "iscsi", "--op", "show", "--mode", "target"],
                             capture_output=True, text=True).stdout
    exported = set(re.findall(r"^Target \d+: \S+:volume-([0-9a-f-]{36})$", targets, re.M))
    attached = {a["volume_id"] for a in attachments}
    if exported != attached:
        problems.append(f"tgt exports {sorted(exported - attached)} not attached; attached "
                        f"{sorted(attached - exported)} not exported")
    for i in instances:
        ember("instance", "delete", i["id"])
    deadline = time.time() + SETTLE_SECONDS
    while listed("instance") and time.time() < deadline:
        time.sleep(2)
    left = [d for d in virsh("list", "--all", "--name").split() if d.startswith("ember-")]
    if listed("instance") or left:
        problems.append(f"instances not deleted: {listed('instance')}; domains left {left}")
    # Every attachment was to one of those instances, so none is left, and nothing is exported.
    targets = subprocess.run(["tgtadm", "-C", port, "--lld", "iscsi", "--op", "show", "--mode", "target"],
                             capture_output=True, text=True).stdout
    if listed("attachment") or "Target" in targets:
        problems.append(f"left after the instances went: attachments {listed('attachment')}; targets {targets}")
    return problems


BACKENDS = {"file1": f"{STATE}/file-backend", "file2": f"{STATE}/file-backend2"}


def add_second_backend():
    config = f"{STATE}/storage.toml"
    text = open(config).read()
    if 'name = "file2"' not in text:
        with open(config, "a") as f:
            f.write(f'\n[[backends]]\nname = "file2"\ndriver = "file"\ndirectory = "{BACKENDS["file2"]}"\n')
    os.makedirs(BACKENDS["file2"], exist_ok=True)


def main():
    add_second_backend()
    image = f"{STATE}/images/chaos-seed.raw"
    if not os.path.exists(image):
        os.makedirs(os.path.dirname(image), exist_ok=True)
        with open(image, "wb") as f:
            f.write(random.Random(SEED).randbytes(48 << 20))
    for name in DAEMONS:
        start(name)
    time.sleep(3)
    ember("quota", "set", "admin", "volumes=40", "snapshots=40", "backups=40", "gigabytes=2000",
          "backup_gigabytes=2000")
    threads = [threading.Thread(target=workload, args=(n,)) for n in range(3)] + [threading.Thread(target=chaos)]
    for t in threads:
        t.start()
    time.sleep(DURATION)
    stop.set()
    for t in threads:
        t.join()
    print(f"chaos over after {DURATION:.0f} s; waiting up to {SETTLE_SECONDS} s for everything to settle")
    problems = []
    busy = settle()
    if busy:
        problems.append(f"still transitional: {busy}")
    volumes, snapshots = listed("volume"), listed("snapshot")
    for kind, items in (("volume", volumes), ("snapshot", snapshots), ("backup", listed("backup"))):
        print(kind, dict(collections.Counter(x["status"] for x in items)))
        for x in items:
            if x["status"] != "available":
                print("  ", x["id"], x["status"], x.get("status_reason", "")[:300])
    drifts = (ember("quota", "check") or {}).get("drifts", ["(quota check failed)"])
    if drifts:
        problems.append(f"quota drift: {drifts}")
    pool = {v["id"]: v["host"] for v in volumes}
    for backend, directory in BACKENDS.items():
        files = set(os.listdir(directory))
        placed = {f"volume-{v['id']}" for v in volumes if v["host"] == f"storage1@{backend}"}
        placed |= {f"snapshot-{s['id']}" for s in snapshots if pool.get(s["volume_id"]) == f"storage1@{backend}"}
        if files - placed:
            problems.append(f"files in {backend} the coordinator does not place there: {sorted(files - placed)}")
        if placed - files:
            problems.append(f"records placed in {backend} without a file: {sorted(placed - files)}")
    for b in listed("backup"):
        if b["status"] == "available":
            verdict = ember("backup", "verify", b["id"], timeout=300) or {}
            if not verdict.get("ok"):
                problems.append(f"backup {b['id']} does not verify: {verdict}")
    if COMPUTE:
        problems += compute_problems(volumes)
    for p in procs.values():
        p.terminate()
    print("\n".join(problems) if problems else "every check held")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
