#!/usr/bin/env bash
# Prepare the GPU host's packages for scripts/gpu_lease.sh (run HERE, from the project root; ~70 s):
# ../shared/device/prepare.sh with the wheels flamingo needs beyond vLLM's, then placed so that each of
# the two device calls carries at most 64 MiB (the working tree travels with every call):
#   call 1 carries .whl1, call 2 .whl3 (outlines_core and openai, which fit beside neither), call 3 .whl2 and .deps.
# On 2026-12-02 (fourth lease) .whl2 + .deps + the tree came to 67.6 MB and the call was refused; in
# the fifth, .whl1 + outlines_core + the tree, 44 KB under 64 MiB by this count, was refused too: the
# check keeps a 1 MiB margin.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
EXTRA="librosa==0.11.0 soundfile==0.13.1 soxr==1.0.0 audioread==3.0.1 pooch==1.8.2 platformdirs==4.3.8 \
decorator==5.2.1 cffi==2.1.1 pycparser==3.12 compressed-tensors==0.17.0 loguru==0.7.3 jsonschema==4.26.0 \
attrs==26.1.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
lm-format-enforcer==0.11.3 interegular==0.3.3 outlines_core==0.2.14" bash ../shared/device/prepare.sh
# outlines_core and openai (the tree grew past what .whl2 + .deps could carry on 2026-12-07) travel in
# call 2 and are installed from /tmp/up with the rest.
mkdir -p .whl3 && mv .deps/outlines_core-*.whl .deps/openai-*.whl .whl3/
sed -i 's|\.deps/\*\.whl 2>&1|.deps/*.whl /tmp/up/*.whl 2>\&1|' .deps/install.sh
grep -q '/tmp/up/\*\.whl' .deps/install.sh || { echo "install.sh no longer installs /tmp/up/*.whl" >&2; exit 1; }
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
limit=$((63 * 1024 * 1024))
# prepare.sh cuts vLLM into 60 MB pieces; on 2026-12-07 the tree (3.2 MB) pushed .whl1 past the limit.
# Re-cut it so the second piece fills what .deps leaves of its call and the first takes the rest.
deps=$(du -scb .deps | tail -1 | cut -f1)
cat .whl1/core.part.* .whl2/core.part.* > /tmp/vllm-core.tar.xz
second=$((limit - tree - deps - 65536))
first=$(($(stat -c %s /tmp/vllm-core.tar.xz) - second))
rm -f .whl1/core.part.* .whl2/core.part.*
head -c "$first" /tmp/vllm-core.tar.xz > .whl1/core.part.0
tail -c +"$((first + 1))" /tmp/vllm-core.tar.xz > .whl2/core.part.1
rm -f /tmp/vllm-core.tar.xz
for carry in ".whl1" ".whl3" ".whl2 .deps"; do
  # shellcheck disable=SC2086
  size=$((tree + $(du -scb $carry | tail -1 | cut -f1)))
  echo "call carrying [$carry]: $((size / 1024 / 1024)) MiB of 63 (64 less a margin)"
  ((size <= limit)) || { echo "too large for one call: move a wheel between the folders" >&2; exit 1; }
done
