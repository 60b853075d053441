# Helpers shared by the in-guest test scripts (sourced): checks that print "[PASS] name" / "[FAIL] name" and
# count, a polling wait, timings appended to /ember/out/timings.txt, and a bound on every CLI call.
passed=0
failed=0
check() {
  local name=$1
  shift
  if "$@" >>"$OUT/checks.log" 2>&1; then
    echo "[PASS] $name (${SECONDS}s)"
    passed=$((passed + 1))
  else
    echo "[FAIL] $name (${SECONDS}s)"
    failed=$((failed + 1))
  fi
}
# Waits up to $1 seconds for a command to succeed (polling a condition, not sleeping for a result).
wait_for() {
  local limit=$1 i=0
  shift
  until "$@" >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt $((limit * 10)) ] || return 1
    sleep 0.1
  done
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
timed() { # timed LABEL command...: runs it, appends "LABEL ms" to timings.txt, keeps its stdout
  local label=$1 start rc
  shift
  start=$(now_ms)
  "$@"
  rc=$?
  echo "$label $(($(now_ms) - start))" >>"$OUT/timings.txt"
  return $rc
}

absent() { ! "$@"; }
# The value of "key": "value" (or a number) in the CLI's pretty JSON.
json_field() { sed -n "s/^ *\"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\\1/p" | head -1; }
# Prints the closing line and exits with the number of failures.
finish() {
  kill "$watchdog_pid" 2>/dev/null
  echo "guest checks ($1): $passed passed, $failed failed"
  exit "$failed"
}
# fleet_certs DIR ROLE:NAME...: a fleet CA in DIR, an admin certificate, and one loopback certificate per
# daemon; sets $certs and exports the CLI's EMBER_CA/CERT/KEY (admin).
fleet_certs() {
  certs=$1
  shift
  ember certs init --dir "$certs" >/dev/null
  for daemon in "$@"; do
    ember certs issue --dir "$certs" --role "${daemon%%:*}" --name "${daemon#*:}" --dns localhost --ip 127.0.0.1 >/dev/null
  done
  ember certs issue --dir "$certs" --role admin --name admin >/dev/null
  export EMBER_CA=$certs/ca.pem EMBER_CERT=$certs/admin.pem EMBER_KEY=$certs/admin.key
}
# tls NAME: the [tls] section of daemon NAME's config.
tls() { printf '[tls]\nca = "%s/ca.pem"\ncert = "%s/%s.pem"\nkey = "%s/%s.key"\n' "$certs" "$certs" "$1" "$certs" "$1"; }

# Every `ember` call is bounded. One that runs past $EMBER_STEP_LIMIT seconds is stuck: `stuck` writes what
# the guest was doing to the console and to /ember/out/stuck.txt, and stops the suite, so that a hang costs
# minutes and says where it is instead of running into the guest's overall timeout with nothing to show.
# The slowest step, a backup onto a dead NFS server, takes about 215 s here.
EMBER_STEP_LIMIT=${EMBER_STEP_LIMIT:-600}
suite_pid=$$
ember() {
  local rc=0
  timeout "$EMBER_STEP_LIMIT" "$JOB/ember" "$@" || rc=$?
  [ "$rc" != 124 ] || stuck "stuck for ${EMBER_STEP_LIMIT}s: ember $*"
  return "$rc"
}
# stuck WHY: the evidence of a hang (every process and what it waits on, the stacks of those in D state,
# the kernel's and the daemons' last lines, the LVs and device-mapper tables), then the suite's end.
stuck() {
  {
    echo "=== $1"
    echo "--- processes (pid state wchan: command)"
    local p cmd
    for p in /proc/[0-9]*; do
      cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null | cut -c1-160)
      [ -n "$cmd" ] || continue # kernel threads
      echo "${p#/proc/} $(cut -d' ' -f3 "$p/stat" 2>/dev/null) $(cat "$p/wchan" 2>/dev/null): $cmd"
    done
    for p in /proc/[0-9]*; do
      [ "$(cut -d' ' -f3 "$p/stat" 2>/dev/null)" = D ] || continue
      echo "--- kernel stack of ${p#/proc/} ($(tr '\0' ' ' <"$p/cmdline" | cut -c1-80))"
      cat "$p/stack" 2>/dev/null
    done
    echo "--- lvs -a; dmsetup table"
    timeout 20 lvs -a 2>&1
    timeout 20 dmsetup table 2>&1
    echo "--- kernel log"
    dmesg | tail -n 30
    for log in "$W"/logs/*.log; do
      echo "--- $log"
      tail -n 15 "$log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300
    done
    echo "=== end of stuck"
  } 2>&1 | tee "$OUT/stuck.txt" >"${EMBER_CONSOLE:-/dev/console}"
  kill -TERM "$suite_pid"
}
# The host stops the guest at ember.timeout= seconds (run-guest.sh). A suite still running 90 s before then
# ends as stuck, so that the console says what the guest was doing rather than stopping mid-step. The host's
# clock starts a few seconds before the guest's, which the margin covers.
tier_timeout=$(sed -n 's/.*ember\.timeout=\([0-9]*\).*/\1/p' /proc/cmdline)
watchdog_pid=
if [ -n "$tier_timeout" ]; then
  (
    sleep $((tier_timeout - 90 - $(cut -d. -f1 /proc/uptime)))
    stuck "out of time: the host stops the guest at ${tier_timeout}s"
  ) &
  watchdog_pid=$!
fi
