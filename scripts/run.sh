#!/usr/bin/env bash
# Sets up and runs a single-node NovaCron with its data in .novacron/data.
#   NOVACRON_LISTEN (default 127.0.0.1:8080), NOVACRON_ADMIN_PASSWORD (default: generated, printed
#   once on the first start).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "run: building novacron (release)"
cargo build --release --quiet --bin novacron
listen=${NOVACRON_LISTEN:-127.0.0.1:8080}
cat <<MSG

NovaCron API: http://$listen
Log in with:  export NOVACRON_SERVER=http://$listen
              target/release/novacron login            (user admin; password below on first start)
Then:         target/release/novacron vm create demo1 --start
              target/release/novacron vm console demo1 --follow
Stop with Ctrl-C (VMs keep running and are re-adopted on the next start).

MSG
exec target/release/novacron serve --data-dir .novacron/data --listen "$listen" \
  --demo-image .novacron/demo-image --accel "${NOVACRON_ACCEL:-auto}"
