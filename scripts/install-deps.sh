#!/usr/bin/env bash
# Installs what ember's build, fleet and tests need on a fresh Debian 12 machine of this kind, skipping what
# is already there. Safe to run again.
set -euo pipefail

apt_packages=(tgt libiscsi-bin)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing apt packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A client that is not ours, for the reflection test and for operators: Python grpcio with reflection.
if ! python3 -c 'import grpc, grpc_reflection' 2>/dev/null; then
  echo "installing python grpcio + grpcio-reflection" >&2
  python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-reflection protobuf
fi
