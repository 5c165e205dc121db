#!/usr/bin/env bash
# One H200 lease for issues 12, 13 and 14: every step writes JSON under $OUT, has its own time limit,
# and may fail without stopping the rest; steps run in order of importance and a step that would
# overrun the lease's budget is skipped (recorded as such).
#
#   Device setup: `bash scripts/lease_prepare.sh` here (../shared/device/prepare.sh with the wheels the
#   host lacks: compressed-tensors for any quantization, loguru, jsonschema and its four dependencies for
#   --schema, and lm-format-enforcer, interegular, outlines_core, llguidance, because vLLM 0.24 imports
#   every structured-output backend to validate a request; it also checks that each call stays within
#   the 64 MiB a call may carry).
#   What to run: PLAN (step names in order) and CKPTS (checkpoints built in setup). The defaults are
#   what the 2026-12-02 leases left to measure (issues 13, 14); Music Flamingo's table:
#   CKPTS="af3 mf" PLAN="mf-raw mf-flamingo mf-fp8"; AF-Next parity: CKPTS="af3 af-next"
#   PLAN="parity-af-next …".
#   The whole lease runs in the background on the GPU host, so no step waits on a call boundary:
#     call 1 (carry .whl1):  mkdir -p /tmp/up && cp .whl1/* /tmp/up/
#     call 1b (carry .whl3: outlines_core and openai, which vLLM imports):  mkdir -p /tmp/up && cp .whl3/* /tmp/up/
#     call 2 (carry .whl2 .deps):  bash .deps/install.sh && python3 -m pip install -q --no-index \
#         --no-deps --upgrade --target /tmp/site /tmp/up/*.whl && export PYTHONPATH=/tmp/site:$PWD \
#         VLLM_USE_FLASHINFER_SAMPLER=0 && \   (no VLLM_WORKER_MULTIPROC_METHOD: vLLM forks or spawns as it
#         would for a user; since 2026-12-07 neither flamingo nor bench.py touches CUDA before LLM())
#         (OUT=/tmp/lease-out BUDGET_S=1520 setsid nohup bash scripts/gpu_lease.sh >/tmp/lease-runner.log 2>&1 </dev/null &) && \
#         bash scripts/lease_poll.sh 520
#     calls 3…: bash scripts/lease_poll.sh 540      (each copies what is there to its $OUT every 20 s)
#   Send each poll the moment the previous call returns, deciding nothing in between: the machine is
#   given back 30 s after a call, and a poll that reaches a fresh machine finds no runner and spends the
#   budget (the fourth lease lost its last three steps so). A machine may also be taken back during a
#   call (the fifth lease's first was): what the polls copied before is all that returns. Decide the polls' lengths before the first
#   call: the last one gets budget_left_s - 100 (a call cut by the budget returns no files), then give
#   the machine back.
#   CPU smoke test with tiny checkpoints:  SMOKE=1 OUT=/tmp/lease-smoke bash scripts/gpu_lease.sh
#
# $OUT/results.jsonl  one JSON row per (variant, workload), per quality comparison, per schema pass
# $OUT/steps.jsonl    one row per step: name, exit status (124 = hit its limit), seconds, skipped
# $OUT/report.md      the table for BENCHMARKS.md (bench.py report); $OUT/logs/<step>.log each step's log
# $OUT/parity-*.json  scripts/parity.py's reports;  $OUT/done  written last
set -u
ROOT=${LEASE_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
if [[ -z ${LEASE_ROOT:-} ]]; then
  # bash reads a script while it runs, and each device call re-sends the working tree: run a private
  # copy, so an edited tree cannot shift the lines under a lease in progress.
  copy=$(mktemp /tmp/gpu_lease.XXXXXX)
  cp "$0" "$copy"
  LEASE_ROOT=$ROOT exec bash "$copy" "$@"
fi
cd "$ROOT"
OUT=${OUT:-/tmp/lease-out}
SMOKE=${SMOKE:-0}
BUDGET_S=${BUDGET_S:-560}    # this command, setup included (a device command may run 600 s)
STEP_S=${STEP_S:-530}        # no command longer than ~9 min
mkdir -p "$OUT/logs"
export VLLM_USE_FLASHINFER_SAMPLER=0
PY=${PY:-python}
if [[ $SMOKE == 1 ]]; then
  PY=${PY_SMOKE:-/work/main/.venv/bin/python}
  export PYTHONPATH=$PWD
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
  SITE=$(mktemp -d)   # the entry point below, kept away from the shared venv
  export PYTHONPATH=$SITE:$PYTHONPATH
  N10=10; N30=6; N5=3; NMF=6; NMF10=6; SIZE=tiny; AF3=/tmp/lease-smoke-af3; MF=/tmp/lease-smoke-mf; DATA=/tmp/lease-smoke-data
  NEXT=/tmp/lease-smoke-af-next; PDT=float32; PDEV=cpu; PN=2; PLONG=1; PTOK=4
  QN=4; QTOK=8; WARM=2; MFTOK=16; TOK=8; REPEAT=2; KEEP=/tmp/lease-smoke-keep
else
  SITE=/tmp/site
  export PYTHONPATH=$SITE:$PWD
  N10=1264; N30=964; N5=100; NMF=384; NMF10=544; SIZE=full; AF3=/tmp/af3-sharp-full; MF=/tmp/mf-full; DATA=/tmp
  NEXT=/tmp/af-next-full; PDT=bfloat16; PDEV=cuda; PN=64; PLONG=16; PTOK=32
  QN=32; QTOK=64; WARM=64; MFTOK=512; TOK=128; REPEAT=2; KEEP=/tmp/lease-keep
fi
# a short lease (what is left of a session's budget) may shrink the 10-s workload: e.g. N10=664 REPEAT=1
N10=${LEASE_N10:-$N10}; N30=${LEASE_N30:-$N30}; REPEAT=${LEASE_REPEAT:-$REPEAT}
CKPTS=${CKPTS:-af3} # built in setup, in parallel (af3 always); at most two full-size ones
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
B="$PY scripts/bench.py"
mkdir -p "$KEEP"
RES=$KEEP/results.jsonl # cumulative over the commands of one lease; copied to $OUT at the end

# step NAME EXPECTED_S CMD...: skipped when EXPECTED_S no longer fits the budget; killed (with every
# process it started, its own process group) at STEP_S.
step() {
  local name=$1 expect=$2
  shift 2
  local now t0 rc
  now=$(date +%s)
  if ((now + expect > DEADLINE)); then
    echo "{\"step\": \"$name\", \"skipped\": true, \"left_s\": $((DEADLINE - now))}" >>"$OUT/steps.jsonl"
    echo "== $name: skipped (needs ~${expect}s, $((DEADLINE - now))s left)"
    return 0
  fi
  echo "== $name (expect ~${expect}s, limit ${STEP_S}s)"
  t0=$(date +%s)
  setsid timeout -k 15 "$STEP_S" "$@" >"$OUT/logs/$name.log" 2>&1 &
  local pid=$!
  wait "$pid"
  rc=$?
  kill -KILL -- -"$pid" 2>/dev/null # leftover engine processes never hold the GPU for the next step
  sleep 2
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >>"$OUT/steps.jsonl"
  echo "   rc=$rc in $(($(date +%s) - t0))s; last lines:"
  grep -v "^RESULT" "$OUT/logs/$name.log" | tail -n 3 | cut -c1-200
}

# vLLM finds flamingo's plugin through an installed entry point; flamingo runs from its source tree
# here, so give that tree one (a dist-info beside the carried packages).
mkdir -p "$SITE/flamingo_plugin-0.dist-info"
printf 'Metadata-Version: 2.1\nName: flamingo-plugin\nVersion: 0\n' >"$SITE/flamingo_plugin-0.dist-info/METADATA"
printf '[vllm.general_plugins]\nflamingo = flamingo_cli.vllm_plugin:register\n' \
  >"$SITE/flamingo_plugin-0.dist-info/entry_points.txt"
$PY - <<'EOF' >"$OUT/env.json" || echo '{"plugin": "MISSING"}' >"$OUT/env.json"
import json, importlib.metadata as md
eps = [e.value for e in md.entry_points(group="vllm.general_plugins")]
assert "flamingo_cli.vllm_plugin:register" in eps, eps
v = {}
for n in ("vllm", "vllm-cpu", "torch", "transformers"):
    try:
        v[n] = md.version(n)
    except md.PackageNotFoundError:
        pass
print(json.dumps({"plugin": eps, **v}))
EOF
cat "$OUT/env.json"

W="10s=$DATA/bench-10s,30s=$DATA/bench-30s,5min=$DATA/bench-5min"
S="$B suite --ckpt $AF3 --workloads $W --out-tokens $TOK --warmup $WARM --repeat $REPEAT --results $RES --out-dir $KEEP/bench-out"
Q="--quality-dir $KEEP/quality --quality-n $QN --quality-tokens $QTOK"
# 10-s clips: every process's main-thread stacks sampled in the timed passes (what the engine core does
# while the GPU waits; scripts/stacksample), the same for every variant
S10="$B suite --ckpt $AF3 --workloads 10s=$DATA/bench-10s --out-tokens $TOK --warmup $WARM --repeat $REPEAT --results $RES --out-dir $KEEP/bench-out --stack-sample $KEEP/stacks"
MFS="$B suite --ckpt $MF --workloads mf10s=$DATA/bench-mf10,mf30s=$DATA/bench-mf --out-tokens $MFTOK --warmup $WARM --repeat $REPEAT --results $RES --out-dir $KEEP/bench-out"
SCH="$B schema --ckpt $AF3 --dir $DATA/bench-10s --max-tokens $TOK --warmup $WARM --results $RES --out-dir $KEEP/schema-out"

# --- the steps: name -> expected seconds, command; PLAN says which run, in which order ---------------
declare -A EXPECT CMD
add() { EXPECT[$1]=$2; CMD[$1]=$3; }
# issue 13: schema vs free text (audio-tags preset, 10-s clips, one engine, both passes)
add schema 150 "$SCH"
# ... and, only when the schema pass failed, once more with the log-mel on the CPU (the one GPU-only
# difference in flamingo's engine arguments besides the batching budget); the traceback is in the log.
add schema-cpumel 150 "$SCH --mel-device cpu"
# ... and the fourth lease's bounded preset (maxLength on its strings: 0.44x free text there; the
# presets dropped the bounds after bench.py grammar measured their mask cost)
add schema-bounded 150 "$SCH --schema-file benchmarks/2026-12-02-h200-c/audio-tags-bounded.schema.json"
# issue 12: AF-Next at HF parity on the GPU (short grid and 20-30 min audio, one engine)
add parity-af-next 330 "$PY scripts/parity.py --kind af-next --ckpt $NEXT --size $SIZE --dtype $PDT --n $PN \
  --min-s 30 --max-s 120 --long-n $PLONG --long-min-s 1200 --long-max-s 1800 --max-new-tokens $PTOK \
  --batch-size 8 --long-batch-size 2 --device $PDEV --out $OUT/parity-af-next-$PDT.json"
# issue 14: AF3, 128 tokens: raw vLLM, flamingo's defaults, fp8 weights, the bf16 noise floor, FP8 KV
add af3-raw 170 "$S --variant raw"
add af3-flamingo 200 "$S --variant flamingo $Q"
add af3-fp8 230 "$S --variant fp8 $Q"
add af3-bf16-floor 200 "$S --variant flamingo $Q --quality-recheck"
add af3-fp8kv 200 "$S10 --variant fp8kv $Q"
add af3-untrimmed 200 "$S --variant untrimmed"
add af3-cpumel 200 "$S --variant cpumel"
# issue 14: AF3 on 10-s clips only (where the GPU waited most in the 2026-12-02 lease: 61 % busy), one
# engine each; the flamingo step writes the bf16 quality reference the fp8 and floor steps score against
add af3-flamingo10 180 "$S10 --variant flamingo $Q"
add af3-raw10 170 "$S10 --variant raw"
add af3-raw10b 170 "$S10 --variant raw"  # the same, a second time in one lease (its own log)
add af3-raw10c 170 "$S10 --variant raw"  # a third time: the plain script's spread decides every ratio
# the features sent whole (1.5 MB fp32 -> 768 KB bf16 per window) vs compact (flamingo's default since
# 2026-12-02: the frames the trimmed encoder reads, 256 KB for a 10-s clip), same engine otherwise
add af3-fullfeat10 170 "$S10 --variant fullfeat"
add af3-fp8-10 200 "$S10 --variant fp8 $Q"
add af3-bf16-floor10 180 "$S10 --variant flamingo $Q --quality-recheck"
# the log-mel on the CPU vs flamingo's default (GPU) in same-sized engines with a warm-up: the second
# 2026-12-02 lease's schema steps (free-text passes, 600-s engines, no warm-up) had GPU 40.85 vs CPU
# 37.02 windows/s, the first lease GPU 48.74 vs CPU 35.17 in differently sized engines
add af3-cpumel10 180 "$S10 --variant cpumel"
# issue 14: two engine replicas sharing the GPU on 10-s clips (two front-ends and schedulers; they start
# one after the other)
add af3-replica2 320 "$S10 --variant replica2"
# issue 14: Music Flamingo, 512 tokens (decode-heavy), 10-s and 30-s clips on one 30-s engine
add mf-raw 200 "$MFS --variant raw"
add mf-flamingo 200 "$MFS --variant flamingo"
add mf-fp8 220 "$MFS --variant fp8"
# issue 14: vLLM's front-end per request on the GPU host (cProfile; log-mel on the GPU)
add frontend 150 "$B frontend --ckpt $AF3 --dir $DATA/bench-10s --warmup $WARM --out-tokens $TOK --results $RES"

# issue 28: the real CLI as a user runs it, 10-s clips, --summary-json and vLLM's log (engine start's
# phases): first on a fresh machine (empty compile cache), then again (warm); a raw vLLM step between
# them gives the plain script's start and speed in the same lease
CLI="env TOK=$TOK PY=$PY bash scripts/bench_cli.sh"
add cli-cold 300 "$CLI cold $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-warm 200 "$CLI warm $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-replicas2 300 "$CLI replicas2 $AF3 $DATA/bench-10s $RES $KEEP/cli-out --replicas 2"
# ... a second warm CLI beside a second raw step (two pairs), and the 30-s clips' pair
add cli-warm2 200 "$CLI warm2 $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add af3-raw30 200 "$B suite --ckpt $AF3 --workloads 30s=$DATA/bench-30s --out-tokens $TOK --warmup $WARM --repeat $REPEAT --results $RES --out-dir $KEEP/bench-out --variant raw"
add cli-30s 220 "$CLI 30s $AF3 $DATA/bench-30s $RES $KEEP/cli-out"
# issue 25: the cost of the sampled tokens' log-probabilities (off by default since 2026-12-07; cli-warm
# and cli-warm2 run without them, before and after this step)
add cli-nologprobs 200 "$CLI nologprobs $AF3 $DATA/bench-10s $RES $KEEP/cli-out --no-logprobs"
add cli-logprobs 200 "$CLI logprobs $AF3 $DATA/bench-10s $RES $KEEP/cli-out --logprobs"
# issue 28: without torch.compile (decode still in full CUDA graphs): first on a fresh machine (put it
# first in PLAN: nothing compiled, the page cache empty), then warm; throughput against cli-warm
# (cli-cold-nc as a user runs it: no VLLM_WORKER_MULTIPROC_METHOD, so flamingo and vLLM choose fork or spawn)
add cli-cold-nc 130 "env -u VLLM_WORKER_MULTIPROC_METHOD $CLI cold-nc $AF3 $DATA/bench-10s $RES $KEEP/cli-out --no-compile"
add cli-nc 200 "$CLI nc $AF3 $DATA/bench-10s $RES $KEEP/cli-out --no-compile"
add cli-nc2 200 "$CLI nc2 $AF3 $DATA/bench-10s $RES $KEEP/cli-out --no-compile"  # the second pair's CLI run
# a short lease's issue 25/26 pairs in the no-compile engine (each against cli-cold-nc / cli-nc)
add cli-nc-logprobs 100 "$CLI nc-logprobs $AF3 $DATA/bench-10s $RES $KEEP/cli-out --no-compile --logprobs"
add cli-nc-task2 100 "$CLI nc-task2 $AF3 $DATA/bench-10s $RES $KEEP/cli-out --no-compile --task transcribe"
add cli-nc-two-tasks 120 "$CLI nc-two-tasks $AF3 $DATA/bench-10s $RES $KEEP/cli-out --no-compile --task caption --task transcribe"
# issue 28: --no-compile on 30-s clips (against af3-raw30 and cli-30s: does prefill-heavy audio lose
# without torch.compile?). The next lease's plan (after the log-mel device moved per request, so vLLM
# forks its engine process; two 10-s pairs, both clip lengths with and without torch.compile):
#   PLAN="cli-cold-nc af3-raw10 cli-nc cli-nc-logprobs af3-raw30 cli-nc-30s af3-raw10b cli-nc2 cli-30s cli-warm"
# (that lease ran it: benchmarks/2026-12-07-h100-cli-c). The CLI's default is no compile on a GPU since.
add cli-nc-30s 150 "$CLI nc-30s $AF3 $DATA/bench-30s $RES $KEEP/cli-out --no-compile"
# issue 28: the audio masks kept on the CPU in the engine core (FLAMINGO_HOST_MASKS=1, opt-in until
# measured: no GPU wait to read the windows' lengths) against the same CLI without, on both clip
# lengths, each pair back to back; then the plain script for the ratios. The next lease's plan:
#   PLAN="cli-cold cli-hm af3-raw10 cli-nohm cli-hm2 cli-30s-hm af3-raw30 cli-30s-nohm cli-nc-logprobs"
add cli-hm 100 "env FLAMINGO_HOST_MASKS=1 $CLI hm $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-hm2 100 "env FLAMINGO_HOST_MASKS=1 $CLI hm2 $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-nohm 100 "$CLI nohm $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-30s-hm 110 "env FLAMINGO_HOST_MASKS=1 $CLI 30s-hm $AF3 $DATA/bench-30s $RES $KEEP/cli-out"
add cli-30s-nohm 110 "$CLI 30s-nohm $AF3 $DATA/bench-30s $RES $KEEP/cli-out"
# issue 28 (2026-12-07, second lease of the day): vLLM 0.24's Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1;
# vLLM makes it the default only for a few text architectures, not AF3): persistent GPU-side request state,
# penalties and the sampled tokens' log-probabilities on the GPU (the V1 runner builds every step's
# penalty inputs on the engine core's thread, which limits the CLI: 99 % busy). Against V1, host masks
# on (FLAMINGO_HOST_MASKS=1) in both; in-flight requests follow vLLM's batch cap since 2026-12-07 (was
# 512 fixed). First on a fresh machine (the cold start, Triton's cache empty). The plan:
#   PLAN="cli-v2-cold af3-raw10 cli-v1 cli-v2 cli-v1-seqs512 cli-v1-nohm cmp-v1-v2 cmp-v1-v1 af3-raw30 cli-v2-30s cli-v1-30s cli-v2-lp af3-raw10b cli-v2b cli-v1-lp prof-v2"
V2="env VLLM_USE_V2_MODEL_RUNNER=1 FLAMINGO_HOST_MASKS=1"
V1="env VLLM_USE_V2_MODEL_RUNNER=0 FLAMINGO_HOST_MASKS=1"
add cli-v2-cold 150 "$V2 $CLI v2-cold $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-v2 100 "$V2 $CLI v2 $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-v2b 100 "$V2 $CLI v2b $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-v1 100 "$V1 $CLI v1 $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
# the old in-flight cap's batch (512) with the new surplus: what the in-flight change alone gives (cli-v1 against it)
add cli-v1-seqs512 100 "$V1 $CLI v1-seqs512 $AF3 $DATA/bench-10s $RES $KEEP/cli-out --max-num-seqs 512"
add cli-v1-nohm 100 "env VLLM_USE_V2_MODEL_RUNNER=0 FLAMINGO_HOST_MASKS=0 $CLI v1-nohm $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-v2-30s 110 "$V2 $CLI v2-30s $AF3 $DATA/bench-30s $RES $KEEP/cli-out"
add cli-v1-30s 110 "$V1 $CLI v1-30s $AF3 $DATA/bench-30s $RES $KEEP/cli-out"
add cli-v2-lp 100 "$V2 $CLI v2-lp $AF3 $DATA/bench-10s $RES $KEEP/cli-out --logprobs"
add cli-v1-lp 100 "$V1 $CLI v1-lp $AF3 $DATA/bench-10s $RES $KEEP/cli-out --logprobs"
# do V2's captions match V1's? (greedy, the same clips; two V1 runs are the noise floor: bf16 near-ties
# flip with another batch)
add cmp-v1-v2 30 "$PY scripts/compare_runs.py $KEEP/cli-out/cli-v1 $KEEP/cli-out/cli-v2 $RES"
add cmp-v1-v1 30 "$PY scripts/compare_runs.py $KEEP/cli-out/cli-v1 $KEEP/cli-out/cli-v1-nohm $RES"
# where the engine core's thread goes with V2 (stack samples 1-9 s after "engine ready": inside generation)
add prof-v2 100 "$V2 env TOK=$TOK PY=$PY bash scripts/profile_cli.sh v2 $AF3 $DATA/bench-10s $OUT/prof ${PROF_FROM:-1} ${PROF_TO:-9}"
# issue 28/25 (after the 2026-12-07 evening lease): flamingo's defaults as a user gets them (V1, the batch at
# vLLM's largest CUDA graph: max_num_seqs 512, no host masks), against V2 at the same batch, with and
# without log-probabilities, in pairs beside the plain script (now without flamingo's plugin). The plan:
#   PLAN="cli-def-cold af3-raw10 cli-def cli-v2 cli-def-lp cli-v2-lp af3-raw10b cli-def2 cli-v2b af3-raw10c cli-def-1024 af3-raw30 cli-def-30s prof-def"
#   (short of budget: drop af3-raw30 cli-def-30s prof-def and cli-def-1024 first)
add cli-def-cold 150 "$CLI def-cold $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-def 100 "$CLI def $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-def2 100 "$CLI def2 $AF3 $DATA/bench-10s $RES $KEEP/cli-out"
add cli-def-lp 100 "$CLI def-lp $AF3 $DATA/bench-10s $RES $KEEP/cli-out --logprobs"
add cli-def-1024 100 "$CLI def-1024 $AF3 $DATA/bench-10s $RES $KEEP/cli-out --max-num-seqs 1024"
add cli-def-30s 110 "$CLI def-30s $AF3 $DATA/bench-30s $RES $KEEP/cli-out"
# log-probabilities on 30-s clips: the GPU busier (83-92 %) than on 10-s (50-67 %), so the per-step CPU
# cost of carrying them (bench_lp_transport.py: ~3 ms on the engine core's thread) may hide behind it
add cli-def-30s-lp 110 "$CLI def-30s-lp $AF3 $DATA/bench-30s $RES $KEEP/cli-out --logprobs"
# A short lease (~560 s for the runner, 2026-12-08):
#   PLAN="cli-def-cold af3-raw10 cli-def cli-def-lp cli-def-30s cli-def-30s-lp cli-v2-lp af3-raw10b cli-def2 cli-v2"
add prof-def 100 "env TOK=$TOK PY=$PY bash scripts/profile_cli.sh def $AF3 $DATA/bench-10s $OUT/prof ${PROF_FROM:-1} ${PROF_TO:-9}"
# issue 25: a corpus of 30 % silence and 10 % duplicates (scripts/make_gate_corpus.py), gates on (the
# default) vs every chunk sent (--keep-silence --no-dedupe-audio); GPU time = the summary's generation_s
add cli-gates 200 "$CLI gates $AF3 $DATA/gate-corpus $RES $KEEP/cli-out"
add cli-nogates 200 "$CLI nogates $AF3 $DATA/gate-corpus $RES $KEEP/cli-out --keep-silence --no-dedupe-audio"
# issue 26: two tasks in one pass (each clip decoded once, each chunk asked both back to back: vLLM's
# processor cache and prefix cache reuse the audio work) vs each task alone; cli-warm is the first task
# alone (caption, the default). The second task's cost in the pass = cli-two-tasks's generation_s minus
# cli-warm's; the issue wants it ≤ 0.7× cli-task2's generation_s. Run: PLAN="cli-warm cli-task2 cli-two-tasks"
add cli-task2 200 "$CLI task2 $AF3 $DATA/bench-10s $RES $KEEP/cli-out --task transcribe"
add cli-two-tasks 260 "$CLI two-tasks $AF3 $DATA/bench-10s $RES $KEEP/cli-out --task caption --task transcribe"

# The default: what the four 2026-12-02 leases left (the fourth ran schema, raw10, flamingo10, fp8-10,
# replica2 and the bf16 floor; its fp8kv, cpumel10 and frontend were lost) and the compact features'
# A/B, most needed first; the flamingo step writes the bf16 reference that fp8kv's quality and the
# floor (a second identical flamingo engine, late in the lease: the 18 % spread) are scored against;
# the budget cuts the tail.
PLAN=${PLAN:-af3-flamingo10 af3-fullfeat10 af3-raw10 af3-fp8kv af3-replica2 af3-bf16-floor10 schema schema-bounded af3-cpumel10}

# --- setup (host CPU, in parallel): audio, the AF3 and AF-Next random-weight checkpoints -----------
# AF3 with a sharpened output layer (logit spread ~6, not flat): the same checkpoint times every
# variant and measures fp8's quality deltas. Speed does not depend on the output layer's values.
# AF-Next as PARITY.md's other rows (make_tiny_checkpoint's full size, the real config).
# Two full-size checkpoints at a time at most (16.5 GB each, 64 GB disk).
# Clip counts: a warm-up of WARM clips, then REPEAT timed passes (schema: its two passes) on disjoint
# clips, so no pass is served from vLLM's prefix cache. Only the folders the plan uses are written.
PLANNED=$(for name in $PLAN; do echo "${CMD[$name]:-}"; done)
[[ $PLANNED == *"$DATA/bench-30s"* ]] && NEED_30=1 || NEED_30=0 # the 30-s clips
[[ $PLANNED == *"$DATA/bench-5min"* ]] && NEED_LONG=1 || NEED_LONG=0 # the S steps' 5-min clips
[[ $PLANNED == *"$DATA/bench-mf"* ]] && NEED_MF=1 || NEED_MF=0
[[ $PLANNED == *"$DATA/gate-corpus"* ]] && NEED_GATES=1 || NEED_GATES=0
[[ -f $KEEP/setup.ok ]] || step setup 150 bash -c "set -e
  $B clips --dir $DATA/bench-10s --seconds 10 --count $N10 &
  $B ckpt --kind af3 --size $SIZE --out $AF3 --lm-head-std 0.1 &
  # what pip does at install time (the lease's install unpacks with --no-compile): a first CLI run that
  # wrote the bytecode of torch, vLLM and transformers would time pyc writes, not the engine start
  [[ $SMOKE == 1 ]] || $PY -m compileall -q -j 8 $SITE/torch $SITE/vllm $SITE/transformers >/dev/null 2>&1 &
  [[ \" $CKPTS \" != *' af-next '* ]] || $PY scripts/make_tiny_checkpoint.py --kind af-next --size $SIZE --dtype $PDT --out $NEXT &
  [[ \" $CKPTS \" != *' mf '* ]] || $B ckpt --kind mf --size $SIZE --out $MF &
  wait
  [[ $NEED_30 == 0 ]] || $B clips --dir $DATA/bench-30s --seconds 30 --count $N30 &
  [[ $NEED_GATES == 0 ]] || $PY scripts/make_gate_corpus.py --out $DATA/gate-corpus --count ${LEASE_NGATES:-600} &
  wait
  [[ $NEED_LONG == 0 ]] || $B clips --dir $DATA/bench-5min --seconds 300 --count $N5
  [[ $NEED_MF == 0 ]] || $B clips --dir $DATA/bench-mf --seconds 30 --count $NMF
  [[ $NEED_MF == 0 ]] || $B clips --dir $DATA/bench-mf10 --seconds 10 --count $NMF10
  test -f $AF3/config.json && touch $KEEP/setup.ok"


for name in $PLAN; do
  [[ -n ${CMD[$name]:-} ]] || { echo "unknown step $name" >&2; continue; }
  if [[ $name == mf-* && ! -f $MF/config.json ]]; then
    rm -rf "$NEXT" # two full-size checkpoints on the disk at most
    step ckpt-mf 110 $B ckpt --kind mf --size $SIZE --out $MF
  fi
  # shellcheck disable=SC2086  # the command strings split into words (no path here has a space)
  step "$name" "${EXPECT[$name]}" ${CMD[$name]}
  if [[ $name == schema ]] && grep -q '"mode": "schema:schema", "failed"' "$RES" 2>/dev/null; then
    step schema-cpumel "${EXPECT[schema-cpumel]}" ${CMD[schema-cpumel]}
  fi
  [[ $name == parity-af-next ]] && rm -rf "$NEXT"
done

cp "$RES" "$OUT/results.jsonl" 2>/dev/null
cp -r "$KEEP/quality" "$OUT/" 2>/dev/null
$PY scripts/bench.py report --results "$RES" >"$OUT/report.md" 2>"$OUT/logs/report.log" || true
cat "$OUT/report.md"
echo "total $(($(date +%s) - START))s"
touch "$OUT/done"
