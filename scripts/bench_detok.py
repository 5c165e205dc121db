"""CPU cost per generated token of turning tokens into text on the thread that feeds the GPU (issue 25).

vLLM's front-end runs its output processing on the thread that also feeds the engine: per step, per
running request, its incremental detokenizer and, with log-probabilities, a ``tokenizer.decode([id])``
of the sampled token. flamingo asks for token ids only (``detokenize=False``) and decodes each
finished request once (``engine.final_text``). This times the two ways with vLLM's own classes
(``IncrementalDetokenizer``, ``LogprobsProcessor``) on the full-size AF3 tokenizer (151,672 ids, the
real special tokens), one token per step as in decode, no GPU:

    python scripts/bench_detok.py [--requests 256 --tokens 128] [--json results.jsonl]

It prints microseconds per token for each way; at the CLI's 52 windows/s and 128 tokens a window
(H100, 2026-12-07) the front-end handles ~6,700 tokens a second, so 10 us a token is ~7 % of its time.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from types import SimpleNamespace

import numpy as np


def _run(tokenizer, backend, ids: list[list[int]], prompt: list[int], detokenize: bool, logprobs: bool) -> float:
    from vllm import SamplingParams
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsLists

    from flamingo_cli.engine import final_text

    kwargs = {"logprobs": 0, "flat_logprobs": True} if logprobs else {}
    params = SamplingParams(max_tokens=len(ids[0]), detokenize=detokenize, **kwargs)
    tok = tokenizer if detokenize else None
    states = []
    for i in range(len(ids)):
        request = SimpleNamespace(
            request_id=str(i), prompt_token_ids=prompt, prompt_embeds=None, sampling_params=params
        )
        lp = LogprobsProcessor.from_new_request(tok, request) if logprobs else None
        states.append((IncrementalDetokenizer.from_new_request(tok, request), lp))
    steps = len(ids[0])
    t0 = time.perf_counter()
    for step in range(steps):  # one engine step: every running request got one token
        for (detok, lp), seq in zip(states, ids, strict=True):
            token = seq[step]
            detok.update([token], stop_terminated=False)
            if lp is not None:
                lists = LogprobsLists(np.array([[token]]), np.array([[-0.5]], dtype=np.float32), np.array([1]), None)
                lp._update_sample_logprobs(lists)
    texts = [
        detok.get_next_output_text(finished=True, delta=False)
        if detokenize
        else final_text(backend.decode, seq, "length", None)
        for (detok, _), seq in zip(states, ids, strict=True)
    ]
    elapsed = time.perf_counter() - t0
    assert all(isinstance(t, str) for t in texts)
    return elapsed / (len(ids) * steps) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="append one JSON row to this file")
    a = ap.parse_args()

    from flamingo_cli.checkpoints import REAL_VOCAB_SIZE, build_tokenizer

    tokenizer = build_tokenizer(REAL_VOCAB_SIZE)
    backend = tokenizer._tokenizer
    rng = random.Random(0)
    # text-like ids: the trained BPE's merges (the filler ids above them decode to placeholder words)
    text_ids = [i for i in range(600) if not tokenizer.convert_ids_to_tokens(i).startswith("<")]
    ids = [[rng.choice(text_ids) for _ in range(a.tokens)] for _ in range(a.requests)]
    prompt = tokenizer.encode("<|im_start|>user\nDescribe.<|im_end|>\n<|im_start|>assistant\n")
    ways = {
        "vllm_text": (True, False),
        "vllm_text_logprobs": (True, True),
        "ids_final_text": (False, False),
        "ids_final_text_logprobs": (False, True),
    }
    row: dict[str, float | int | str] = {"requests": a.requests, "tokens": a.tokens}
    for name, (detokenize, logprobs) in ways.items():
        best = min(_run(tokenizer, backend, ids, prompt, detokenize, logprobs) for _ in range(a.repeat))
        row[f"{name}_us_per_token"] = round(best, 2)
        print(f"{name:26s} {best:7.2f} us/token")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
