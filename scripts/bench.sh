#!/usr/bin/env bash
# Builds release binaries and runs the benchmark (see crates/novacron/examples/bench.rs).
# Extra arguments go to the benchmark: --runs N --clients C --seconds S.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet --bin novacron --example bench
exec target/release/examples/bench "$@"
