#!/usr/bin/env bash
# The real-kernel guest's job: every in-guest suite, one after the other, in one boot. Exit status: the number
# of failed checks over all suites. A suite stopped as stuck (lib.sh) ends the job: what hung may still hold
# the devices the next suite would use.
cd "$(dirname "$0")"
total=0
for suite in lvm-fleet.sh nfs-fleet.sh; do
  bash "./$suite"
  total=$((total + $?))
  if [ -f /ember/out/stuck.txt ]; then
    echo "guest: $suite was stuck; the later suites did not run"
    break
  fi
done
exit "$total"
