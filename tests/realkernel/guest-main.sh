#!/usr/bin/env bash
# The real-kernel guest's job: every in-guest suite, one after the other, in one boot. Exit status: the number
# of failed checks over all suites.
cd "$(dirname "$0")"
total=0
for suite in lvm-fleet.sh nfs-fleet.sh; do
  bash "./$suite"
  total=$((total + $?))
done
exit "$total"
