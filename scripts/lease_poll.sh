#!/usr/bin/env bash
# Wait up to $1 seconds for the background lease runner (scripts/gpu_lease.sh) to finish, copying what it
# has written to this call's $OUT every 20 s (a call cut short still returns the latest copy).
LIMIT=${1:-560}
SRC=${SRC:-/tmp/lease-out}
KEEP=${KEEP:-/tmp/lease-keep}
t0=$(date +%s)
if [[ ! -d $SRC ]] && ! pgrep -f gpu_lease >/dev/null; then
  # A fresh machine (the last one was given back 30 s after the previous call): waiting would only spend
  # the budget.
  echo "NO RUNNER on this machine: $SRC is missing and no gpu_lease.sh runs (a fresh machine?)"
  exit 3
fi
copy() {
  mkdir -p "$OUT"
  cp -r "$SRC/." "$OUT/" 2>/dev/null
  cp "$KEEP/results.jsonl" "$OUT/results.jsonl" 2>/dev/null
  cp /tmp/lease-runner.log "$OUT/runner.log" 2>/dev/null
}
while [[ ! -f $SRC/done ]] && (($(date +%s) - t0 < LIMIT)); do
  copy
  sleep 20
done
copy
[[ -f $SRC/done ]] && echo "RUNNER DONE" || echo "runner still going after ${LIMIT}s"
cat "$SRC/steps.jsonl" 2>/dev/null
grep -h "^RESULT" "$SRC"/logs/*.log 2>/dev/null | cut -c1-400 | tail -n 30
tail -n 15 /tmp/lease-runner.log 2>/dev/null | cut -c1-300
