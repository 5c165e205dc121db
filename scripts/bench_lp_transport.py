"""CPU cost per engine step of carrying the sampled tokens' log-probabilities out of vLLM's engine core (issue 25).

With ``logprobs=0`` vLLM 0.24's V1 path, per decode step, slices one ``LogprobsLists`` per running
request in the scheduler (three small numpy arrays each), msgpack-encodes them on the engine core's
output thread (one Python hook call per array, under the GIL the scheduling thread needs), decodes
them in the front-end and appends them to each request's ``FlatLogprobs``. This times each part with
vLLM's own classes (``EngineCoreOutput``, ``MsgpackEncoder``/``MsgpackDecoder``, ``LogprobsProcessor``)
for one step of a batch, with and without log-probabilities, best of ``--repeat``; no GPU, no model:

    python scripts/bench_lp_transport.py [--batch 512] [--repeat 30] [--json results.jsonl]

A decode step of 512 10-s AF3 requests took ~50 ms on an H100 (2026-12-07): 1 ms there is 2 %.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def _one_step(batch: int, logprobs: bool, encoder: Any, decoder: Any) -> dict[str, float]:
    import numpy as np
    from vllm.logprobs import create_sample_logprobs
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsLists

    sampled = LogprobsLists(np.zeros((batch, 1), np.int32), np.zeros((batch, 1), np.float32), np.zeros(batch, np.int32))
    t0 = time.perf_counter()
    outs = [
        EngineCoreOutput(
            request_id=f"r{i}", new_token_ids=[5], new_logprobs=sampled.slice_request(i, 1) if logprobs else None
        )
        for i in range(batch)
    ]
    t1 = time.perf_counter()
    frames = encoder.encode(EngineCoreOutputs(outputs=outs))
    t2 = time.perf_counter()
    decoded = decoder.decode(frames)
    t3 = time.perf_counter()
    if logprobs:
        for out in decoded.outputs:
            # flamingo asks detokenize=False (no tokenizer here) and flat_logprobs=True, as engine.py does
            LogprobsProcessor(None, create_sample_logprobs(True), None, 0.0, 0, None)._update_sample_logprobs(
                out.new_logprobs
            )
    t4 = time.perf_counter()
    return {"scheduler_ms": t1 - t0, "encode_ms": t2 - t1, "decode_ms": t3 - t2, "frontend_append_ms": t4 - t3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512, help="running requests in the step")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", help="append one JSON row per mode here")
    a = ap.parse_args()
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    encoder, decoder = MsgpackEncoder(), MsgpackDecoder(EngineCoreOutputs)  # built once, as vLLM's processes do
    for logprobs in (False, True):
        best: dict[str, float] = {}
        for _ in range(a.repeat):
            for key, s in _one_step(a.batch, logprobs, encoder, decoder).items():
                best[key] = min(best.get(key, float("inf")), s)
        row = {"mode": "lp_transport", "batch": a.batch, "logprobs": logprobs}
        row |= {k: round(v * 1e3, 3) for k, v in best.items()}
        row["engine_core_ms"] = round(row["scheduler_ms"] + row["encode_ms"], 3)
        row["frontend_ms"] = round(row["decode_ms"] + row["frontend_append_ms"], 3)
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
