#!/usr/bin/env bash
# The tiering evaluation: every predictor, baseline and the oracle on the CloudPhysics trace
# (../shared/traces/, or the path given) and on synthetic traces of every shape with seeds no
# tuning saw (see crates/novacron-tiering/examples/tiering_eval.rs). Prints `NOT MET` for
# every missed goal.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet -p novacron-tiering --example tiering_eval
exec target/release/examples/tiering_eval "$@"
