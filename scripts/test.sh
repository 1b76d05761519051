#!/usr/bin/env bash
# Sets up and runs every check: formatting, clippy (warnings are errors), and every test (unit,
# storage suite, and the integration tests that boot real QEMU guests and real novacron processes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
export NOVACRON_DEMO_IMAGE="$PWD/.novacron/demo-image"

echo "test: cargo fmt --check"
cargo fmt --all -- --check
echo "test: cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  echo "test: cargo nextest run"
  cargo nextest run --workspace --profile ci
else
  echo "test: cargo test (cargo-nextest not installed)"
  cargo test --workspace
fi
# The API under a fuzzer: no 5xx, every error in the JSON error shape (uses the debug binary
# the tests built).
echo "test: scripts/fuzz-api.sh"
cargo build --quiet -p novacron
scripts/fuzz-api.sh
# Nothing a test started may outlive it.
if pgrep -f "qemu-system-x86_64 -name .*process=novacron-" >/dev/null; then
  echo "test: QEMU processes were left running by the tests:" >&2
  pgrep -af "qemu-system-x86_64 -name .*process=novacron-" >&2
  exit 1
fi
