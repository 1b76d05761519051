#!/usr/bin/env bash
# Runs the chaos fault test (tests/chaos.rs, faults_under_load_keep_the_history_linearizable)
# once per seed, one after another, and prints a table: each seed's result, faults injected,
# operations checked, anomalies and new host-to-host connections a second per host. Each run's
# whole output (the fault timeline) is kept in .novacron/chaos-sweep/seed-N.log. Exits non-zero
# if any seed failed.
#
# Usage: scripts/chaos-sweep.sh [SECONDS] [SEED ...]     (default: 300 s; seeds 1 to 10)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export NOVACRON_DEMO_IMAGE="${NOVACRON_DEMO_IMAGE:-$PWD/.novacron/demo-image}"
seconds=${1:-300}
shift || true
seeds=("$@")
[[ ${#seeds[@]} -gt 0 ]] || seeds=(1 2 3 4 5 6 7 8 9 10)
out=.novacron/chaos-sweep
mkdir -p "$out"
cargo build --quiet -p novacron --tests
failed=0
rows=()
for seed in "${seeds[@]}"; do
  log="$out/seed-$seed.log"
  echo "chaos-sweep: seed $seed, $seconds s (log: $log)"
  start=$(date +%s)
  if NOVACRON_CHAOS_SECONDS=$seconds NOVACRON_CHAOS_SEED=$seed \
      cargo nextest run -p novacron --test chaos --no-fail-fast \
      -E 'test(=faults_under_load_keep_the_history_linearizable)' \
      --success-output final --failure-output final >"$log" 2>&1; then
    result=pass
  else
    result=FAIL
    failed=$((failed + 1))
  fi
  took=$(( $(date +%s) - start ))
  summary=$(grep -o 'chaos summary: .*' "$log" | tail -1 || true)
  faults=$(sed -n 's/.* \([0-9]*\) faults,.*/\1/p' <<<"$summary")
  ops=$(sed -n 's/.* \([0-9]*\) operations checked.*/\1/p' <<<"$summary")
  acked=$(sed -n 's/.*(\([0-9]*\) acknowledged writes.*/\1/p' <<<"$summary")
  conns=$(sed -n 's/.*anomalies, \([0-9.]*\) new host-to-host.*/\1/p' <<<"$summary")
  anomalies=0
  [[ $result == pass ]] || anomalies="see log"
  why=""
  [[ $result == pass ]] || why=$(grep -m1 -oE "panicked at .*|not linearizable.*|no leader with a quorum|had two leaders.*|disagree about.*" "$log" || true)
  rows+=("$(printf '%6s  %-5s %6ss  %6s  %10s  %8s  %10s  %9s  %s' "$seed" "$result" "$took" "${faults:--}" "${ops:--}" "${acked:--}" "$anomalies" "${conns:--}" "$why")")
  echo "${rows[-1]}"
done
echo
printf '%6s  %-5s %7s  %6s  %10s  %8s  %10s  %9s\n' seed result time faults operations acked anomalies "conns/s/h"
printf '%s\n' "${rows[@]}"
echo "chaos-sweep: ${#seeds[@]} seeds x ${seconds} s, $failed failed"
[[ $failed -eq 0 ]]
