#!/usr/bin/env bash
# Runs ember's whole test suite: unit tests and the fleet tests that start the real binaries.
# This is the README's second command, and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
# The fleet tests start the real daemons, so every binary must exist before the tests run.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
cargo test --workspace --locked --no-fail-fast
