#!/usr/bin/env python3
"""Prints the Debian packages a guest needs: the Depends/Pre-Depends closure of the packages named on the
command line, taking the first installable member of each alternative group and never following the
packages in SKIP (maintainer-script machinery: the guest never runs maintainer scripts)."""
import subprocess
import sys

SKIP = set("""debconf cdebconf debconf-2.0 perl-base perl init-system-helpers adduser lsb-base
sysvinit-utils libconfig-general-perl sg3-utils dpkg libc-bin install-info libpam-runtime
systemd systemd-sysv python3 python3-minimal""".split())


def depends(packages):
    """Yields (package, [alternative groups]) from one `apt-cache depends` run."""
    out = subprocess.run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
         "--no-replaces", "--no-enhances", *packages],
        check=True, capture_output=True, text=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}).stdout
    groups, group, virtual = [], [], None
    for line in out.splitlines():
        if not line.startswith(" "):
            continue
        if line.startswith("    "):  # a provider of the virtual package just named
            if virtual is not None:
                group.append(line.strip())
            continue
        alt = line[1] == "|"
        kind, _, name = line[2:].partition(": ")
        if kind not in ("Depends", "PreDepends"):
            continue
        name = name.split(":")[0]
        virtual = name if name.startswith("<") else None
        if virtual is None:
            group.append(name)
        if not alt:
            groups.append(group)
            group = []
    return groups


def main():
    wanted = sys.argv[1:]
    chosen, frontier = set(), list(wanted)
    while frontier:
        todo = [p for p in frontier if p not in chosen and p not in SKIP]
        chosen.update(todo)
        frontier = []
        if not todo:
            break
        for group in depends(todo):
            names = [n for n in group if n not in SKIP]
            if not names or any(n in chosen for n in names):
                continue
            frontier.append(names[0])
    print("\n".join(sorted(chosen)))


main()
