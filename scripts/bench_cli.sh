#!/usr/bin/env bash
# The real CLI, timed as a user runs it (issue 28): `flamingo caption` over a folder of clips into a
# fresh output, its --summary-json kept, vLLM's own log lines (--verbose) in this step's log so the
# engine start's phases (weights, torch.compile, profile run, KV cache, CUDA graphs) can be read off it.
# One JSON row appended to RESULTS: the summary's fields plus the whole process's seconds.
#   usage: bench_cli.sh TAG CKPT CLIPS_DIR RESULTS OUT_DIR [more flamingo caption options]
# (e.g. --no-logprobs: the same run without vLLM's log-probabilities, issue 25b; --task caption --task
# transcribe: two tasks in one pass, issue 26; the row's "options" says which, "tasks" gives each task's
# run key and rows, rows_flagged/flags what the quality flags found)
set -u
tag=$1 ckpt=$2 clips=$3 results=$4 outdir=$5
shift 5
out=$outdir/cli-$tag
rm -rf "$out"
mkdir -p "$outdir"
t0=$(date +%s.%N)
${PY:-python} -m flamingo_cli caption "$clips" --out "$out" --model "$ckpt" --temperature 0 \
  --max-tokens "${TOK:-128}" --summary-json "$outdir/cli-$tag.json" --verbose "$@"
rc=$?
t1=$(date +%s.%N)
${PY:-python} - "$tag" "$rc" "$t0" "$t1" "$outdir/cli-$tag.json" "$results" "$*" <<'PY'
import json, sys
tag, rc, t0, t1, summary, results, extra = sys.argv[1:]
try:
    doc = json.load(open(summary))
except OSError:
    doc = {}
row = {"mode": "cli", "tag": tag, "rc": int(rc), "process_s": round(float(t1) - float(t0), 2), "options": extra,
       **{k: doc.get(k) for k in ("engine_start_s", "time_to_first_row_s", "generation_s", "processing_s",
          "wall_s", "rows_written", "windows_per_s", "windows_per_generation_s", "rows_per_generation_s",
          "audio_s_per_generation_s", "audio_hours_per_gpu_hour", "gpus", "x_realtime", "output_tokens",
          "rows_flagged", "flags", "requests_sent", "chunks_silent", "chunks_duplicate", "chunks_done", "task",
          "tasks")}}
with open(results, "a") as f:
    f.write(json.dumps(row) + "\n")
print("RESULT", json.dumps(row))
PY
exit "$rc"
