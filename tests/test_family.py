"""The Audio Flamingo family read from checkpoints (no engine): facts, errors, caps, think output, presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_audio, run_cli

from flamingo_cli.chunking import chunk_spans
from flamingo_cli.models import (
    AF3,
    AF3_SYSTEM_PROMPT,
    AFNEXT,
    AFNEXT_SYSTEM_PROMPT,
    FAMILIES,
    MF,
    MF_SYSTEM_PROMPT,
    CheckpointError,
    family_for,
    read_checkpoint,
)
from flamingo_cli.reasoning import ENDED_IN_THINK, TRUNCATED_IN_THINK, split_reasoning, with_reasoning
from flamingo_cli.records import AudioItem, Chunk, Result

# kind → (alias name, family, cap s, think, system prompt, generation max_new_tokens)
EXPECTED = {
    "af3": ("af3", "af3", 600, False, AF3_SYSTEM_PROMPT, None),
    "mf": ("mf", "mf", 1200, False, MF_SYSTEM_PROMPT, 2048),
    "mf-think": ("mf-think", "mf", 1200, True, MF_SYSTEM_PROMPT, 2048),
    "af-next": ("afnext", "afnext", 1800, False, AFNEXT_SYSTEM_PROMPT, 2048),
    "af-next-think": ("afnext-think", "afnext", 1800, True, AFNEXT_SYSTEM_PROMPT, 2048),
    "af-next-captioner": ("afnext-captioner", "afnext", 1800, False, AFNEXT_SYSTEM_PROMPT, 2048),
}
FIXTURE = {
    "af3": "tiny_af3",
    "mf": "tiny_mf",
    "mf-think": "tiny_mf_think",
    "af-next": "tiny_afnext",
    "af-next-think": "tiny_afnext_think",
    "af-next-captioner": "tiny_afnext_captioner",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_each_tiny_kind_reads_back_the_facts_its_files_declare(kind, request):
    ckpt = request.getfixturevalue(FIXTURE[kind])
    fam = family_for(str(ckpt))
    name, family, cap, think, system, max_new = EXPECTED[kind]
    assert (fam.name, fam.family, fam.max_audio_s, fam.think) == (name, family, cap, think)
    assert fam.system_prompt == system and fam.max_new_tokens == max_new
    assert (fam.window_s, fam.tokens_per_window, fam.max_windows) == (30, 750, cap // 30)
    assert fam.source == f"checkpoint {ckpt}"
    assert (fam.sound_bos, fam.sound_eos) == ((None, None) if kind == "af3" else ("<|sound_bos|>", "<|sound_eos|>"))
    config = json.loads((Path(ckpt) / "config.json").read_text())
    assert config["architectures"] == [fam.architecture] and config["model_type"] == fam.model_type
    if family == "afnext":  # what the AF-Next conversion script writes (docs/model-family.md)
        assert config["rope_parameters"]["rope_theta"] == 1800
        assert json.loads((Path(ckpt) / "processor_config.json").read_text())["max_audio_len"] == 1800


@pytest.mark.parametrize("kind", ["mf-think", "af-next-think", "af-next"])
def test_think_tags_are_tokens_that_survive_decoding_only_in_think_tokenizers(kind, request):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(request.getfixturevalue(FIXTURE[kind])))
    ids = tok.encode("<think> a </think> b", add_special_tokens=False)
    text = tok.decode(ids, skip_special_tokens=True)
    if kind.endswith("think"):
        assert tok.convert_tokens_to_ids("<think>") in ids and text == "<think> a </think> b"
    else:
        assert "<think>" not in tok.get_vocab()


def _write(folder: Path, files: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


MF_FILES = {
    "config.json": {"architectures": ["MusicFlamingoForConditionalGeneration"], "model_type": "musicflamingo"},
    "processor_config.json": {
        "processor_class": "MusicFlamingoProcessor",
        "max_audio_len": 1800,
        "feature_extractor": {"chunk_length": 30, "hop_length": 160, "sampling_rate": 16000},
    },
    "chat_template.jinja": "<|im_start|>system\nYou are Audio Flamingo-Next, hi.<|im_end|>\n",
}


def test_a_hand_written_af_next_layout_and_what_each_missing_file_costs(tmp_path):
    fam = read_checkpoint(_write(tmp_path / "ok", MF_FILES))
    assert (fam.family, fam.max_audio_s, fam.system_prompt, fam.max_new_tokens) == (
        "afnext",
        1800,
        "You are Audio Flamingo-Next, hi.",
        None,
    )

    with pytest.raises(CheckpointError, match=r"no config\.json"):
        read_checkpoint(_write(tmp_path / "empty", {}))
    with pytest.raises(CheckpointError, match=r"LlamaForCausalLM.*not an Audio Flamingo checkpoint"):
        read_checkpoint(_write(tmp_path / "llama", {"config.json": {"architectures": ["LlamaForCausalLM"]}}))
    with pytest.raises(CheckpointError, match="AudioFlamingoNextForConditionalGeneration"):
        arch = {"architectures": ["AudioFlamingoNextForConditionalGeneration"], "model_type": "audioflamingonext"}
        read_checkpoint(_write(tmp_path / "next", {**MF_FILES, "config.json": arch}))
    no_proc = {k: v for k, v in MF_FILES.items() if k != "processor_config.json"}
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json"):
        read_checkpoint(_write(tmp_path / "noproc", no_proc))
    no_tpl = {k: v for k, v in MF_FILES.items() if k != "chat_template.jinja"}
    with pytest.raises(CheckpointError, match="no chat template") as err:
        read_checkpoint(_write(tmp_path / "notpl", no_tpl))
    assert str(tmp_path / "notpl") in str(err.value)
    other_window = json.loads(json.dumps(MF_FILES["processor_config.json"]))
    other_window["feature_extractor"]["chunk_length"] = 20
    with pytest.raises(CheckpointError, match="chunk_length=20"):
        read_checkpoint(_write(tmp_path / "win", {**MF_FILES, "processor_config.json": other_window}))
    # An MF checkpoint without max_audio_len gets transformers' processor default, 1200 s: MF, not AF-Next.
    mf_proc = {k: v for k, v in MF_FILES["processor_config.json"].items() if k != "max_audio_len"}
    mf = read_checkpoint(
        _write(tmp_path / "mf", {**MF_FILES, "processor_config.json": mf_proc, "chat_template.jinja": "x"})
    )
    assert (mf.family, mf.max_audio_s, mf.system_prompt) == ("mf", 1200, "")


def _cache_snapshot(cache: Path, repo: str, files: Path) -> Path:
    """``files`` as ``repo``'s main snapshot in an HF hub cache laid out as huggingface_hub writes it."""
    rev = "0" * 40
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in files.iterdir():
        (snap / f.name).symlink_to(f)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(rev)
    return snap


def test_hub_ids_use_the_cached_checkpoint_else_a_builtin_default_else_an_error(tmp_path, monkeypatch, tiny_afnext):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for alias in FAMILIES:
        fam = family_for(alias)
        assert fam.source == "built-in default" and fam.hub_id == FAMILIES[alias].hub_id
    assert (FAMILIES["afnext-think"].think, FAMILIES["mf-think"].think, FAMILIES["afnext"].think) == (True, True, False)
    assert family_for("nvidia/audio-flamingo-next-captioner-hf").max_audio_s == 1800

    # The same hub id, cached: facts come from its files (a changed cap shows), the variant from the id.
    _cache_snapshot(cache, "nvidia/audio-flamingo-next-think-hf", Path(tiny_afnext))
    fam = family_for("afnext-think")
    assert fam.source.startswith("checkpoint ") and fam.name == "afnext-think" and fam.think
    assert fam.hub_id == "nvidia/audio-flamingo-next-think-hf" and fam.max_audio_s == 1800

    with pytest.raises(CheckpointError, match="not in the HF cache"):
        family_for("acme/some-other-model")
    with pytest.raises(CheckpointError, match="no such folder"):
        family_for(str(tmp_path / "missing-folder"))


def test_chat_template_comes_from_the_folder_the_cache_never_an_offline_hub(tmp_path, monkeypatch, tiny_af3):
    """``load_chat_template``: a local folder or the HF-cache snapshot; the hub only when online (the
    hub client retried 130 s per run without network before this)."""
    import transformers

    from flamingo_cli.prompts import load_chat_template

    real = transformers.AutoProcessor.from_pretrained
    asked: list[str] = []

    def spy(where, *args, **kwargs):
        asked.append(str(where))
        return real(where, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", spy)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = real(str(tiny_af3)).chat_template
    assert load_chat_template(str(tiny_af3)) == expected and asked == [str(tiny_af3)]
    asked.clear()
    assert load_chat_template("nvidia/audio-flamingo-3-hf") is None and asked == []  # offline, not cached

    snap = _cache_snapshot(cache, "nvidia/audio-flamingo-3-hf", Path(tiny_af3))
    assert load_chat_template("nvidia/audio-flamingo-3-hf") == expected and asked == [str(snap)]


def test_a_25_minute_file_is_one_chunk_with_af_next_two_with_mf_three_with_af3():
    assert chunk_spans(1500.0, AFNEXT.max_audio_s).num_chunks == 1
    assert chunk_spans(1500.0, MF.max_audio_s).num_chunks == 2
    assert chunk_spans(1500.0, AF3.max_audio_s).num_chunks == 3
    assert chunk_spans(1800.0, AFNEXT.max_audio_s).num_chunks == 1
    assert chunk_spans(1801.0, AFNEXT.max_audio_s).spans == [(0.0, 930.0), (930.0, 1801.0)]


def test_dry_run_knows_the_af_next_cap(tmp_path):
    make_audio(tmp_path / "a" / "long.flac", 1500.0, sr=8000)
    chunks = {}
    for model in ("afnext-captioner", "mf", "af3"):
        res = run_cli(["caption", tmp_path / "a", "--out", tmp_path / "o", "--model", model, "--dry-run", "--json"])
        assert res.status == 0, res.stderr
        doc = json.loads(res.stdout)
        chunks[model] = (doc["family"], doc["max_chunk_s"], doc["chunks"], doc["windows"])
        assert doc["gpu_s"] > 0
    assert chunks == {
        "afnext-captioner": ("afnext-captioner", 1800.0, 1, 50),
        "mf": ("mf", 1200.0, 2, 50),
        "af3": ("af3", 600.0, 3, 50),  # 510 + 510 + 480 s
    }


def _result(text: str | None, finish: str = "stop", error: str | None = None) -> Result:
    item = AudioItem(id="x", path="x.wav")
    chunk = Chunk(item=item, index=0, num_chunks=1, start_s=0.0, end_s=1.0, samples=None, duration_s=1.0)
    return Result(chunk=chunk, prompt="p", caption=text, finish_reason=finish, error=error)


def test_split_reasoning_cases():
    assert split_reasoning("<think> a\nb </think>\n\nThe answer.") == ("a\nb", "The answer.", False)
    assert split_reasoning("  <think>half a thought") == ("half a thought", "", True)
    assert split_reasoning("plain caption") == (None, "plain caption", False)
    # A template that opens the block in the prompt: only the closing tag is generated.
    assert split_reasoning("reasoning </think> answer", think=True) == ("reasoning", "answer", False)
    assert split_reasoning("a caption quoting </think> stays whole", think=False)[0] is None


def test_think_results_keep_reasoning_apart_and_never_pass_a_cut_block_off_as_a_caption():
    done = with_reasoning(_result("<think> listen </think> music"), think=True)
    assert (done.reasoning, done.caption, done.error) == ("listen", "music", None)
    cut = with_reasoning(_result("<think> listen carefully", finish="length"), think=True)
    assert (cut.reasoning, cut.caption, cut.error) == ("listen carefully", None, TRUNCATED_IN_THINK)
    assert TRUNCATED_IN_THINK == "truncated in <think> at max tokens"
    ended = with_reasoning(_result("<think> listen", finish="stop"), think=True)
    assert (ended.caption, ended.error) == (None, ENDED_IN_THINK)
    plain = _result("just a caption")
    assert with_reasoning(plain, think=False) is plain
    failed = _result(None, error="rejected by the engine: x")
    assert with_reasoning(failed, think=True) is failed


def test_max_tokens_default_comes_from_the_checkpoint_unless_preset_or_flag_set_it(tmp_path, monkeypatch):
    from flamingo_cli.spec import CaptionSpec

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # built-in defaults, whatever is cached

    def max_tokens(**options) -> int:
        return CaptionSpec.build([str(tmp_path)], tmp_path / "out", **options).sampling.max_tokens

    assert max_tokens(task="reason") == 2048  # no max_tokens in the preset: AF-Next-Think's max_new_tokens
    assert max_tokens(task="reason", model="af3") == 512  # AF3's generation config sets none
    assert max_tokens(task="caption", model="afnext") == 512  # the preset's
    assert max_tokens(task="reason", max_tokens=77) == 77  # the flag's


def test_presets_pick_a_model_of_the_right_variant():
    from flamingo_cli.config import load_preset

    want = {
        "caption": ("af3", False),
        "describe-music": ("mf", False),
        "long-caption": ("afnext-captioner", False),
        "scene-breakdown": ("afnext-captioner", False),
        "reason": ("afnext-think", True),
        "describe-music-think": ("mf-think", True),
    }
    for task, (model, think) in want.items():
        preset = load_preset(task)
        assert preset.model == model and FAMILIES[preset.model].think is think, task
