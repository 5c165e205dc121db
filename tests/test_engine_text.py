"""flamingo's text for a finished request equals vLLM's: ``engine.final_text`` (the ids decoded once)
against vLLM's own incremental detokenizer fed step by step, as the engine would with
``detokenize=True``. Random ids from the tiny checkpoints' byte-level BPE (special tokens, bytes that
split UTF-8 characters across tokens), after the real chat-template prompt."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")


def _vllm_text(tokenizer, prompt_ids: list[int], ids: list[int], eos_stop: bool, rng: random.Random) -> str:
    from vllm import SamplingParams
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer, IncrementalDetokenizer

    request = SimpleNamespace(
        request_id="r", prompt_token_ids=prompt_ids, prompt_embeds=None, sampling_params=SamplingParams(max_tokens=64)
    )
    detok = IncrementalDetokenizer.from_new_request(tokenizer, request)
    assert isinstance(detok, FastIncrementalDetokenizer), type(detok)
    pos = 0
    while pos < len(ids):  # the engine reports one or a few tokens a step
        step = ids[pos : pos + rng.choice((1, 1, 1, 2, 3))]
        pos += len(step)
        detok.update(step, stop_terminated=eos_stop and pos >= len(ids))
    return detok.get_next_output_text(finished=True, delta=False)


@pytest.mark.parametrize("kind", ["af3", "mf"])
def test_final_text_equals_vllms_incremental_detokenizer(kind, tiny_af3, tiny_mf) -> None:
    from transformers import AutoTokenizer

    from flamingo_cli.engine import final_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_af3 if kind == "af3" else tiny_mf)
    backend = tokenizer._tokenizer
    vocab = backend.get_vocab_size()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe the audio."}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    rng = random.Random(7)
    held_back = 0
    for case in range(1500):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(0, 48))]
        eos_stop = bool(ids) and case % 3 == 0
        if eos_stop:
            ids[-1] = eos
        want = _vllm_text(tokenizer, list(prompt_ids), ids, eos_stop, rng)
        finish = "stop" if eos_stop else "length"
        got = final_text(backend.decode, ids, finish, None)
        assert got == want, (case, ids)
        held_back += backend.decode(ids, skip_special_tokens=True).endswith("\ufffd")
    # The cases include texts that end inside a UTF-8 character (the stream holds those bytes back).
    assert held_back > 20
