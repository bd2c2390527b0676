#!/usr/bin/env bash
# The failover test: primary, backup, subscriber and a 10 Hz test publisher; the primary is
# killed at 30 s, publishing goes on 10 s more, and the run is judged and reported.
# Every option is passed to the harness (run with --help to list them), e.g.
#   ./scripts/test_backup.sh --kill-at 5s --after 3s --signal STOP
# Exit status: 0 when no acknowledged message is lost and first deliveries came in order, 1
# otherwise, 2 when the run could not be made.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "test_backup.sh: cargo not found; install the Rust toolchain (https://rustup.rs)" >&2
  exit 2
fi
# Builds in release mode when anything changed (a no-op otherwise): the harness (lab crate) and
# the broker binaries it starts from its own folder.
cargo build --release --quiet --workspace --bins
exec target/release/harness "$@"
