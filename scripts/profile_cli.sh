#!/usr/bin/env bash
# Where every Python process of a real `flamingo caption` run spends its main thread between two moments
# (seconds after the log's "engine ready" line, so inside generation however long the start took), with
# scripts/stacksample.
#   usage: profile_cli.sh TAG CKPT CLIPS_DIR OUT_DIR FROM_S TO_S [more flamingo caption options]
# Writes OUT_DIR/stacks-TAG/<pid>.json (bench.py's stack format) and OUT_DIR/cli-TAG.log.
set -u
tag=$1 ckpt=$2 clips=$3 outdir=$4 from=$5 to=$6
shift 6
stacks=$outdir/stacks-$tag
rm -rf "$stacks" "$outdir/cli-$tag"
mkdir -p "$stacks"
here=$(cd "$(dirname "$0")" && pwd)
FLAMINGO_STACK_SAMPLE=$stacks PYTHONPATH=$here/stacksample:${PYTHONPATH:-} ${PY:-python} -m flamingo_cli caption \
  "$clips" --out "$outdir/cli-$tag" --model "$ckpt" --temperature 0 --max-tokens "${TOK:-128}" \
  --summary-json "$outdir/cli-$tag.json" --verbose "$@" >"$outdir/cli-$tag.log" 2>&1 &
pid=$!
for _ in $(seq 600); do # the engine start (at most 5 min)
  grep -q "engine ready" "$outdir/cli-$tag.log" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
sleep "$from"
touch "$stacks/on"
sleep "$((to - from))"
rm -f "$stacks/on"
sleep 1
wait "$pid"
echo "rc=$? $(cat "$outdir/cli-$tag.json" 2>/dev/null | head -c 600)"
ls "$stacks"
