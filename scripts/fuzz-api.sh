#!/usr/bin/env bash
# Fuzzes the REST API with schemathesis (pinned in scripts/fuzz/requirements.txt) against a
# real node: a fixed seed, a few thousand generated requests over every operation of
# docs/openapi.json, then the stateful phase. Passes when no answer is a 5xx, every error
# answer has the JSON error shape (scripts/fuzz/hooks.py), and documented bodies match the
# document. The fuzzer acts as an operator (admin-only routes name host paths; they are
# tested for 403); the node has room for a few small VMs at most.
#
# Usage: scripts/fuzz-api.sh [MAX_EXAMPLES_PER_OPERATION]   (default 50)
# Uses target/debug/novacron (NOVACRON_BIN to override); `scripts/test.sh` builds it first.
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-50}
bin=${NOVACRON_BIN:-target/debug/novacron}
[[ -x "$bin" ]] || { echo "fuzz-api: $bin is missing; build it first (cargo build)" >&2; exit 1; }

venv=.novacron/fuzz-venv
want=$(sed -n 's/^schemathesis==//p' scripts/fuzz/requirements.txt)
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$want"; then
  echo "fuzz-api: installing schemathesis $want into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/fuzz/requirements.txt
fi

tmp=$(mktemp -d /tmp/novacron-fuzz.XXXXXX)
serve_pid=""
cleanup() {
  [[ -n "$serve_pid" ]] && kill -INT "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null || true
  # Whatever the node started (QEMU guests, the fencing watchdog) names the temp dir.
  pkill -KILL -f "$tmp" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
total_mib=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
password="fuzz-admin-password"
NOVACRON_ADMIN_PASSWORD=$password "$bin" serve --data-dir "$tmp/data" --listen "127.0.0.1:$port" \
  --accel tcg --demo-image "${NOVACRON_DEMO_IMAGE:-.novacron/demo-image}" \
  --reserved-memory-mib $((total_mib - 512)) --shutdown-timeout 5 \
  >"$tmp/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 300); do
  curl -sf "$url/readyz" >/dev/null && break
  kill -0 "$serve_pid" 2>/dev/null || { cat "$tmp/serve.log" >&2; exit 1; }
  sleep 0.2
done
curl -sf "$url/readyz" >/dev/null || { echo "fuzz-api: the node never got ready" >&2; cat "$tmp/serve.log" >&2; exit 1; }

login() {
  curl -sf "$url/api/v1/auth/login" -H 'content-type: application/json' \
    -d "{\"username\": \"$1\", \"password\": \"$2\"}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])'
}
post() {
  curl -sf "$url$2" -H "authorization: Bearer $1" -H 'content-type: application/json' -d "$3" >/dev/null
}
admin=$(login admin "$password")
post "$admin" /api/v1/users '{"username": "fuzz", "password": "fuzz-operator-password", "role": "operator"}'
token=$(login fuzz fuzz-operator-password)
# Resources the path parameters name (schemathesis.toml), so actions reach real work.
post "$token" /api/v1/vms '{"name": "fuzz", "image": "demo", "vcpus": 1, "memory_mib": 64}'
post "$token" /api/v1/volumes '{"name": "fuzz-vol", "size_mib": 16}'
cat >"$tmp/schemathesis.toml" <<TOML
[parameters]
vm = "fuzz"
volume = "fuzz-vol"
image = "demo"
TOML

hooks_dir=$PWD/scripts/fuzz
st=$PWD/$venv/bin/st
run() {
  # From the temp dir: schemathesis keeps caches in the working directory.
  (cd "$tmp" && SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$hooks_dir" \
    "$st" --config-file "$tmp/schemathesis.toml" run "$url/api/v1/openapi.json" \
    -H "Authorization: Bearer $token" \
    -c not_a_server_error,response_schema_conformance,error_shape \
    -n "$examples" --seed 1 -w 1 --no-color --request-timeout 60 \
    --phases coverage,fuzzing,stateful --generation-database none "$@")
}
status=0
# Deletes last, so the named VM and volume live through the other operations.
echo "fuzz-api: every operation but DELETE"
run --exclude-method DELETE || status=$?
echo "fuzz-api: DELETE"
run --include-method DELETE || status=$?

if ! curl -sf "$url/readyz" >/dev/null; then
  echo "fuzz-api: the node is no longer ready after the fuzzing" >&2
  status=1
fi
if grep -E ' ERROR |panicked' "$tmp/serve.log" >&2; then
  echo "fuzz-api: the node logged errors (above)" >&2
  status=1
fi
[[ $status -eq 0 ]] && echo "fuzz-api: passed"
exit $status
