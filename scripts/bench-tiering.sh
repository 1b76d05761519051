#!/usr/bin/env bash
# The tiering evaluation: every predictor, baseline and the oracle on the CloudPhysics trace
# (../shared/traces/, or the path given) and on synthetic traces of every shape with seeds no
# tuning saw (see crates/novacron-tiering/examples/tiering_eval.rs), the planner's time per
# volume at 10,000 volumes, the move limiter's rates and fairness
# (crates/novacron-server/examples/limiter_bench.rs), and real volume copies as moves run them
# (crates/novacron-server/examples/move_bench.rs: qemu-storage-daemon block jobs at the rates
# the move scheduler gives, against `qemu-img convert -r`). Prints `NOT MET` for every missed
# goal.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet -p novacron-tiering --example tiering_eval
cargo build --release --quiet -p novacron-server --example limiter_bench
cargo build --release --quiet -p novacron-server --example move_bench
target/release/examples/tiering_eval "$@"
echo "== move limiter (governor buckets: cold-migration copies)"
target/release/examples/limiter_bench
echo "== volume moves (block jobs with QEMU's speed)"
exec target/release/examples/move_bench
