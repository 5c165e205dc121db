"""End to end on the CPU vLLM engine with tiny MF-think and AF-Next (instruct/think/captioner) checkpoints.

vLLM 0.24's MusicFlamingo class serves the AF-Next layout (cap 1800 s, RoTE theta 1800) as it is; the
think checkpoints are wired so greedy decoding writes ``<think> listen carefully</think> music``
(checkpoints.THINK_CHAIN), which must land in the reasoning and caption columns apart. Every test uses
the CLI tests' engine options (conftest.ENGINE_ARGS), so each checkpoint starts one engine.
"""

from __future__ import annotations

import queue

import pytest
from conftest import ENGINE_ARGS, make_audio, read_rows, run_cli

from flamingo_cli.reasoning import TRUNCATED_IN_THINK

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    make_audio(root / "a.wav", 3.0, seed=1)
    make_audio(root / "b.flac", 31.0, sr=44100, channels=2, seed=2)
    return root


@pytest.mark.parametrize("fixture", ["tiny_mf_think", "tiny_afnext_think"])
def test_think_rows_carry_reasoning_and_caption_apart(fixture, clips, tmp_path, request):
    ckpt = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    res = run_cli(["caption", clips, "--out", out, "--model", ckpt, "--task", "reason", *ENGINE_ARGS])
    assert res.status == 0, res.stderr
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == ["a.wav", "b.flac"]
    for r in rows:
        assert (r["reasoning"], r["caption"], r["error"]) == ("listen carefully", "music", None), r
        assert r["finish_reason"] == "stop"


@pytest.mark.parametrize("fixture", ["tiny_mf_think", "tiny_afnext_think"])
def test_a_think_block_cut_by_max_tokens_is_an_error_row_not_a_caption(fixture, clips, tmp_path, request):
    """The engine of the CLI test above (same spec, same plan-sized config); three tokens end inside <think>."""
    from flamingo_cli.audio import decode
    from flamingo_cli.chunking import chunk_audio
    from flamingo_cli.engine import END
    from flamingo_cli.launch import get_engine
    from flamingo_cli.prompts import PromptBuilder, load_chat_template
    from flamingo_cli.records import AudioItem, Sampling
    from flamingo_cli.spec import CaptionSpec

    ckpt = str(request.getfixturevalue(fixture))
    spec = CaptionSpec.build([clips], tmp_path / "out", model=ckpt, task="reason", temperature=0.0, max_tokens=8)
    family = spec.family
    engine = get_engine(spec.engine_config(longest_chunk_s=31.0))  # b.flac, the clips' longest
    builder = PromptBuilder(family, load_chat_template(ckpt))
    (chunk,) = chunk_audio(decode(AudioItem(id="a", path=str(clips / "a.wav"))), family.max_audio_s)
    feed: queue.Queue = queue.Queue()
    feed.put(builder.request(chunk, "Describe the audio."))
    feed.put(END)
    (result,) = list(engine.run(feed, Sampling(temperature=0.0, max_tokens=3)))
    assert result.finish_reason == "length" and result.output_tokens == 3
    assert (result.caption, result.error, result.reasoning) == (None, TRUNCATED_IN_THINK, "listen carefully")


def test_af_next_captions_a_25_minute_file_in_one_prompt(tiny_afnext, clips, tmp_path):
    make_audio(tmp_path / "in" / "long_25min.flac", 1500.0, sr=16000, seed=3)
    make_audio(tmp_path / "in" / "short.wav", 3.0, seed=4)
    out = tmp_path / "out"
    res = run_cli(["caption", tmp_path / "in", "--out", out, "--model", tiny_afnext, *ENGINE_ARGS])
    assert res.status == 0, res.stderr
    rows = {r["id"]: r for r in read_rows(out)}
    long = rows["long_25min.flac"]
    assert (long["num_chunks"], long["start_s"], long["end_s"]) == (1, 0.0, 1500.0)
    # 50 windows of 750 tokens + <|sound_bos|>/<|sound_eos|> + the chat turn around them
    assert long["prompt_tokens"] > 50 * 750 + 2 and long["error"] is None
    # Random weights may stop at once (an empty caption); what matters is a finished, error-free row.
    assert long["caption"] is not None and long["output_tokens"] >= 1 and long["reasoning"] is None
    assert rows["short.wav"]["caption"] is not None and rows["short.wav"]["error"] is None


def test_af_next_captioner_runs_its_preset(tiny_afnext_captioner, clips, tmp_path):
    out = tmp_path / "out"
    args = ["caption", clips, "--out", out, "--model", tiny_afnext_captioner, "--task", "scene-breakdown"]
    res = run_cli([*args, *ENGINE_ARGS])
    assert res.status == 0, res.stderr
    rows = read_rows(out)
    # Random weights may stop at once (an empty caption): a finished, error-free, think-free row each.
    assert len(rows) == 2
    assert all(r["caption"] is not None and r["error"] is None and r["reasoning"] is None for r in rows)
    assert {r["task"] for r in rows} == {"scene-breakdown"}
