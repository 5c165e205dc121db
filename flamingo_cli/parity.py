"""Parity between flamingo's vLLM path and transformers' reference (processor + ``generate``).

Both sides get the same audio and prompt. flamingo chunks the audio (so nothing is truncated) and
runs each chunk through its vLLM engine; the reference runs the same chunk through the transformers
processor and model, greedy. Per sequence we report whether the prompt token ids are equal, the first
generated step where the tokens differ, and the reference's logit margins there: top-1 minus top-2,
and top-1 minus the logit of the token vLLM chose. A mismatch at a near-tie is rounding; one at a
wide margin is a bug.
"""

from __future__ import annotations

import queue
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flamingo_cli.chunking import chunk_audio
from flamingo_cli.models import family_for
from flamingo_cli.records import SAMPLE_RATE, AudioItem, Chunk, DecodedAudio


@dataclass
class Case:
    """One test input: an audio signal (made from a seed) and an instruction."""

    name: str
    seconds: float
    prompt: str
    seed: int = 0
    source_rate: int = SAMPLE_RATE
    channels: int = 1

    def samples(self) -> np.ndarray:
        """Deterministic audio: tones + noise at the source rate, resampled to 16 kHz mono like audio.decode."""
        rng = np.random.default_rng(self.seed)
        n = round(self.seconds * self.source_rate)
        t = np.arange(n, dtype=np.float64) / self.source_rate
        freq = 110.0 * (1 + self.seed % 7)
        x = 0.3 * np.sin(2 * np.pi * freq * t * (1 + 0.01 * np.sin(t))) + 0.05 * rng.standard_normal(n)
        if self.channels > 1:
            x = np.stack([x * (1 - 0.2 * c) for c in range(self.channels)], axis=1).mean(axis=1)
        x = x.astype(np.float32)
        if self.source_rate != SAMPLE_RATE:
            import soxr

            x = soxr.resample(x, self.source_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
        return np.ascontiguousarray(x)


@dataclass
class SeqResult:
    case: str
    chunk_index: int
    num_chunks: int
    chunk_seconds: float
    prompt_ids_equal: bool | None = None
    prompt_len: int = 0
    first_mismatch: int | None = None  # step index, None = all generated tokens equal
    margin_top2: float | None = None  # reference logit top-1 minus top-2 at the mismatch
    margin_chosen: float | None = None  # reference logit top-1 minus the token vLLM chose
    vllm_tokens: list[int] = field(default_factory=list)
    ref_tokens: list[int] = field(default_factory=list)
    error: str | None = None


def make_chunks(cases: list[Case], max_chunk_s: float) -> list[tuple[Case, Chunk]]:
    out = []
    for case in cases:
        item = AudioItem(id=case.name, path=case.name)
        for chunk in chunk_audio(DecodedAudio(item, case.samples()), max_chunk_s):
            out.append((case, chunk))
    return out


def run_vllm(engine, builder, pairs: list[tuple[Case, Chunk]], max_new_tokens: int) -> dict[tuple[str, int], Any]:
    """All chunks in one continuous batch through flamingo's engine; greedy, no repetition penalty."""
    from flamingo_cli.engine import END, Sampling

    feed: queue.Queue = queue.Queue()
    for case, chunk in pairs:
        if chunk.error is None:
            feed.put(builder.request(chunk, case.prompt))
    feed.put(END)
    sampling = Sampling(temperature=0.0, repetition_penalty=1.0, max_tokens=max_new_tokens, ignore_eos=True)
    results = {}
    for r in engine.run(feed, sampling):
        results[r.chunk.key] = r
    return results


def load_reference(model_path: str, dtype: str = "float32", device: str = "cpu"):
    import torch
    from transformers import (
        AudioFlamingo3ForConditionalGeneration,
        AutoConfig,
        AutoProcessor,
        MusicFlamingoForConditionalGeneration,
    )

    config = AutoConfig.from_pretrained(model_path)
    cls = (
        MusicFlamingoForConditionalGeneration
        if config.model_type == "musicflamingo"
        else AudioFlamingo3ForConditionalGeneration
    )
    model = cls.from_pretrained(model_path, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like ignore_eos
    processor = AutoProcessor.from_pretrained(model_path)
    return model, processor


def run_reference(model, processor, builder, pairs, max_new_tokens: int, batch_size: int = 1):
    """transformers greedy generate per chunk; returns {key: (prompt_ids, tokens, logits[steps, vocab])}."""
    import torch

    out = {}
    todo = [(c, ch) for c, ch in pairs if ch.error is None]
    for i in range(0, len(todo), batch_size):
        batch = todo[i : i + batch_size]
        texts = [builder.text(c.prompt) for c, _ in batch]
        audios = [ch.samples for _, ch in batch]
        inputs = processor(text=texts, audio=audios, return_tensors="pt").to(model.device)
        for k, v in inputs.items():
            if torch.is_floating_point(v):
                inputs[k] = v.to(model.dtype)
        try:
            gen = _generate(model, inputs, max_new_tokens)
        except Exception as exc:
            for _, ch in batch:
                out[ch.key] = f"reference failed: {type(exc).__name__}: {exc}"
            continue
        logits = torch.stack(gen.logits, dim=1).float().cpu()  # [batch, steps, vocab]
        width = inputs["input_ids"].shape[1]
        for j, (_, ch) in enumerate(batch):
            mask = inputs["attention_mask"][j].bool().cpu()
            prompt_ids = inputs["input_ids"][j].cpu()[mask].tolist()
            tokens = gen.sequences[j, width:].tolist()
            out[ch.key] = (prompt_ids, tokens, logits[j])
    return out


def _generate(model, inputs, max_new_tokens: int):
    import torch

    with torch.inference_mode():
        return model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=1.0,
            temperature=None,
            top_p=None,
            top_k=None,
            output_logits=True,
            return_dict_in_generate=True,
        )


def compare(pairs, got, ref) -> list[SeqResult]:
    rows = []
    for case, ch in pairs:
        row = SeqResult(case.name, ch.index, ch.num_chunks, round(ch.end_s - ch.start_s, 3))
        if ch.error is not None:
            row.error = ch.error
            rows.append(row)
            continue
        r = got.get(ch.key)
        if r is None or r.error:
            row.error = r.error if r is not None else "no vLLM result"
            rows.append(row)
            continue
        if isinstance(ref.get(ch.key), str) or ch.key not in ref:
            row.error = ref.get(ch.key, "no reference result")
            row.vllm_tokens = list(r.token_ids or [])
            rows.append(row)
            continue
        prompt_ids, ref_tokens, logits = ref[ch.key]
        row.prompt_ids_equal = list(r.prompt_token_ids or []) == prompt_ids
        row.prompt_len = len(prompt_ids)
        row.ref_tokens = ref_tokens
        row.vllm_tokens = list(r.token_ids)
        for step, (a, b) in enumerate(zip(row.vllm_tokens, ref_tokens, strict=False)):
            if a != b:
                top = logits[step].topk(2)
                row.first_mismatch = step
                row.margin_top2 = float(top.values[0] - top.values[1])
                row.margin_chosen = float(top.values[0] - logits[step][a])
                break
        rows.append(row)
    return rows


def summarize(rows: list[SeqResult]) -> dict[str, Any]:
    ok = [r for r in rows if r.error is None]
    mism = [r for r in ok if r.first_mismatch is not None]
    return {
        "sequences": len(ok),
        "errors": len(rows) - len(ok),
        "prompt_ids_equal": sum(bool(r.prompt_ids_equal) for r in ok),
        "all_tokens_equal": len(ok) - len(mism),
        "mismatch_margins_chosen": sorted(round(r.margin_chosen, 4) for r in mism),
        "max_mismatch_margin_chosen": max((r.margin_chosen for r in mism), default=None),
    }


def as_dicts(rows: list[SeqResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def family_cap(model_path: str) -> float:
    return float(family_for(model_path).max_audio_s)
