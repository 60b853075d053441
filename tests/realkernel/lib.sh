# Helpers shared by the in-guest test scripts (sourced): checks that print "[PASS] name" / "[FAIL] name" and
# count, a polling wait, and timings appended to /ember/out/timings.txt.
passed=0
failed=0
check() {
  local name=$1
  shift
  if "$@" >>"$OUT/checks.log" 2>&1; then
    echo "[PASS] $name"
    passed=$((passed + 1))
  else
    echo "[FAIL] $name"
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
