#!/usr/bin/env bash
# The live-migration benchmark: the driver alone (the floor) against NovaCron's API on a 2-host
# dev cluster, and achieved bandwidth against the cap (see
# crates/novacron/examples/migration_bench.rs). Extra arguments go to the benchmark:
# --runs N --caps 10,50,200.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet --bin novacron --example migration_bench
exec target/release/examples/migration_bench --novacron target/release/novacron "$@"
