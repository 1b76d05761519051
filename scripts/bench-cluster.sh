#!/usr/bin/env bash
# The cluster benchmark: a 3-member NovaCron cluster against a 3-member etcd cluster on loopback
# (see crates/novacron/examples/cluster_bench.rs). Installs etcd from Debian if it is missing.
# Extra arguments go to the benchmark: --seconds S --kills K --clients 1,16,64.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v etcd >/dev/null; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y --no-install-recommends etcd-server etcd-client
fi
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet --bin novacron --example cluster_bench
exec target/release/examples/cluster_bench --novacron target/release/novacron "$@"
