#!/usr/bin/env bash
# Starts an all-in-one ember fleet on localhost: a coordinator (embedded SQLite), a storage agent with a
# file backend, a compute agent and a backup agent, all on mutual TLS with a freshly made fleet CA.
# This is the README's first command. Ctrl-C stops everything it started.
#
#   EMBER_STATE  state directory (default ./.ember-dev)
#   EMBER_PORT   coordinator port (default 7000; agents use the next three, the iSCSI portal the fourth)
#   EMBER_RELEASE=1  build and run optimised binaries (for benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
state=${EMBER_STATE:-$root/.ember-dev}
port=${EMBER_PORT:-7000}

./scripts/install-deps.sh
# EMBER_FLEET_BUILT=1: the caller built the binaries already (the test suite, whose other tests run them while
# this runs: a rebuild here would replace them under those tests).
if [ "${EMBER_RELEASE:-}" = 1 ]; then
  [ "${EMBER_FLEET_BUILT:-}" = 1 ] || cargo build --workspace --bins --locked --release
  bin=$root/target/release
else
  [ "${EMBER_FLEET_BUILT:-}" = 1 ] || cargo build --workspace --bins --locked
  bin=$root/target/debug
fi

mkdir -p "$state"/{certs,logs,file-backend,backups}
certs=$state/certs
if [ ! -f "$certs/ca.pem" ]; then
  "$bin/ember" certs init --dir "$certs" >/dev/null
  "$bin/ember" certs issue --dir "$certs" --role coordinator --name coordinator --dns localhost --ip 127.0.0.1 >/dev/null
  "$bin/ember" certs issue --dir "$certs" --role storage-agent --name storage1 --dns localhost --ip 127.0.0.1 >/dev/null
  "$bin/ember" certs issue --dir "$certs" --role compute-agent --name compute1 --dns localhost --ip 127.0.0.1 >/dev/null
  "$bin/ember" certs issue --dir "$certs" --role backup-agent --name backup1 --dns localhost --ip 127.0.0.1 >/dev/null
  "$bin/ember" certs issue --dir "$certs" --role admin --name admin >/dev/null
  "$bin/ember" certs issue --dir "$certs" --role member --name demo --project demo >/dev/null
fi

# crl: `ember certs revoke --dir $certs CERT.pem` writes it; each daemon follows it within seconds.
tls() { printf '[tls]\nca = "%s"\ncert = "%s/%s.pem"\nkey = "%s/%s.key"\ncrl = "%s"\n' "$certs/ca.pem" "$certs" "$1" "$certs" "$1" "$certs/crl.pem"; }
coordinator_url=https://127.0.0.1:$port
{ printf 'listen = "127.0.0.1:%s"\ndatabase = "%s"\n' "$port" "$state/ember.db"; tls coordinator; } >"$state/coordinator.toml"
agent() { printf 'name = "%s"\nlisten = "127.0.0.1:%s"\ncoordinator = "%s"\n' "$1" "$2" "$coordinator_url"; }
# Volumes may be filled from the files of these directories only (`--image PATH`): the project's test image,
# and .ember-dev/images for your own.
mkdir -p "$state/images"
{ agent storage1 $((port + 1)); printf 'state_dir = "%s"\n' "$state/storage-state"
  printf 'image_dirs = ["%s", "%s"]\n' "$root/target/realkernel/instance" "$state/images"
  printf '\n[[backends]]\nname = "file1"\ndriver = "file"\ndirectory = "%s"\n\n' "$state/file-backend"
  printf '[tgt]\ncontrol_port = %s\nportal = "127.0.0.1:%s"\n\n' $(( (port + 5) % 30000 + 1000 )) $((port + 4)); tls storage1; } >"$state/storage.toml"
# Instances boot the project's tiny test image directly when it was built (tests/realkernel/instance-image.sh);
# otherwise from the volume through the BIOS.
instance=$root/target/realkernel/instance
boot=
if [ -f "$instance/vmlinuz" ]; then
  boot=$(printf '[boot]\nkernel = "%s"\ninitrd = "%s"\ncmdline = "console=ttyS0 root=/dev/vda rw quiet"\n\n' \
    "$instance/vmlinuz" "$instance/initrd.img")
fi
{ agent compute1 $((port + 2)); printf 'state_dir = "%s"\n\n%s\n' "$state/compute-state" "$boot"; tls compute1; } >"$state/compute.toml"
{ agent backup1 $((port + 3)); printf '\n[[repositories]]\nname = "repo1"\ndirectory = "%s"\n\n' "$state/backups"; tls backup1; } >"$state/backup.toml"

pids=()
stop() {
  echo; echo "stopping the fleet..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  echo "stopped. State is kept in $state"
  exit 0
}
trap stop INT TERM

"$bin/ember-coordinator" --config "$state/coordinator.toml" >"$state/logs/coordinator.out" 2>"$state/logs/coordinator.log" & pids+=($!)
"$bin/ember-storage-agent" --config "$state/storage.toml" >"$state/logs/storage.out" 2>"$state/logs/storage.log" & pids+=($!)
"$bin/ember-compute-agent" --config "$state/compute.toml" >"$state/logs/compute.out" 2>"$state/logs/compute.log" & pids+=($!)
"$bin/ember-backup-agent" --config "$state/backup.toml" >"$state/logs/backup.out" 2>"$state/logs/backup.log" & pids+=($!)

cat >"$state/cli.toml" <<CFG
coordinator = "$coordinator_url"
ca = "$certs/ca.pem"
cert = "$certs/admin.pem"
key = "$certs/admin.key"
CFG

cat <<MSG

ember fleet running (Ctrl-C stops it)
  coordinator   $coordinator_url   database $state/ember.db
  agents        storage1 (file backend $state/file-backend), compute1, backup1 (repository $state/backups)
  certificates  $certs   (admin.pem = admin, demo.pem = member of project "demo")
  logs          $state/logs

Use it as admin with the ember CLI:
  export EMBER_CLI_CONFIG=$state/cli.toml PATH=$bin:\$PATH
  ember service list
  ember type create gold --spec volume_backend_name=file1
  ember type list
  ember quota show demo
  ember instance list          # boot from volume and attach: README, "Boot an instance from a volume"

Or with any gRPC client through server reflection, e.g. buf curl (npm install @bufbuild/buf):
  npx buf curl --protocol grpc --cacert $certs/ca.pem --cert $certs/admin.pem --key $certs/admin.key \\
    --list-services $coordinator_url
  npx buf curl --protocol grpc --cacert $certs/ca.pem --cert $certs/admin.pem --key $certs/admin.key \\
    $coordinator_url/ember.v1.FleetService/ListServices -d '{}'
MSG

wait -n "${pids[@]}" || true
echo "a fleet process exited; see $state/logs" >&2
stop
