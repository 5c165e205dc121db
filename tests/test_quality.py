"""What is flagged and what is not (flamingo_cli/quality.py): real-world caption texts, one table."""

from __future__ import annotations

import json
import time

import pytest

from flamingo_cli.quality import (
    EMPTY,
    LOW_CONFIDENCE,
    REPETITION,
    SILENCE_HALLUCINATION,
    TRUNCATED,
    QualityRules,
    caption_flags,
    compression_ratio,
    flags_for,
    mean_logprob,
    parse_flags,
    tandem_repeat,
    words,
)
from flamingo_cli.records import AudioItem, Chunk, Result

HONEST_LONG = (
    "This is a pop song with a female vocalist singing over a steady drum beat, a bass line and bright "
    "synthesizer chords. The tempo is moderate, around 110 beats per minute, and the key is A minor. The song "
    "opens with a short instrumental introduction in which the synthesizer plays a repeating arpeggio, then the "
    "vocals enter with a gentle, breathy delivery. In the chorus the energy rises: the drums become louder, "
    "backing vocals join in harmony and a distorted guitar adds texture. The production is polished and modern, "
    "with reverb on the vocals and side-chain compression on the synthesizers. The song ends with a fade-out."
)
EVENTS = json.dumps({"events": [{"start": 5 * i, "end": 5 * i + 5, "label": "speech"} for i in range(20)]})

# (caption, finish_reason, avg_logprob, expected flags)
CASES = [
    # loops: one word, a short sentence, a long sentence, CJK, a JSON list, a looping JSON field
    ("key key key key key key key", "stop", -0.1, [REPETITION]),
    ("A man is speaking. " * 6, "stop", -0.2, [REPETITION]),
    (
        "The music is a calm piano piece with soft strings in the background and a slow tempo. " * 3,
        "length",
        -0.1,
        [REPETITION, TRUNCATED],
    ),
    ("音乐音乐音乐音乐音乐音乐音乐音乐", "stop", -0.3, [REPETITION]),
    ("la la la la la la la la", "stop", -0.3, [REPETITION]),
    ('{"instruments":["guitar","guitar","guitar","guitar","guitar","guitar"]}', "stop", -0.2, [REPETITION]),
    ('{"description":"' + "a loud drum, " * 8 + '","mood":"dark"}', "stop", -0.2, [REPETITION]),
    # a loop with no exact repeat, caught by Whisper's compression test
    (
        "The beat goes on and on, " + "on and on and on and on, " * 2 + "the beat goes on and on and on. " * 2,
        "stop",
        -0.2,
        [REPETITION],
    ),
    # honest repetition and lists
    ("Drums, drums and more drums.", "stop", -0.4, []),
    (
        "The instruments are guitar, bass, drums, piano, violin, cello, trumpet, saxophone and synthesizer.",
        "stop",
        -0.5,
        [],
    ),
    ("The song follows a verse, chorus, verse, chorus structure with a bridge.", "stop", -0.5, []),
    ("Very very very loud.", "stop", -0.5, []),
    ("Bye bye bye.", "stop", -0.5, []),
    (HONEST_LONG, "stop", -0.6, []),
    # multilingual
    ("这是一首流行歌曲，由女歌手演唱，伴有鼓、贝斯和合成器。节奏适中，情绪欢快。", "stop", -0.7, []),
    ("静かなピアノ曲で、弦楽器が背景で柔らかく演奏されています。", "stop", -0.7, []),
    ("Ein ruhiges Klavierstück mit sanften Streichern im Hintergrund und langsamem Tempo.", "stop", -0.7, []),
    ("哈哈哈", "stop", -0.7, []),
    # very short captions
    ("Silence.", "stop", -0.2, []),
    ("Rain.", "stop", -0.2, []),
    # JSON outputs of schema runs: keys and lists of objects repeat by design
    ('{"genre":"rock","mood":"energetic","instruments":["guitar","bass","drums"],"tempo":120}', "stop", -0.3, []),
    (EVENTS, "stop", -0.3, []),
    # empty, truncated, low confidence
    ("", "stop", None, [EMPTY]),
    ("   \n", "stop", -0.1, [EMPTY]),
    ("A long description that was cut off at the token limit, mid", "length", -0.4, [TRUNCATED]),
    ("A dog barks.", "stop", -1.7, [LOW_CONFIDENCE]),
    ("A dog barks.", "stop", -0.99, []),
    ("A dog barks.", "stop", None, []),  # no log-probabilities: not judged
]


@pytest.mark.parametrize(("caption", "finish", "logprob", "expected"), CASES)
def test_flags_table(caption: str, finish: str, logprob: float | None, expected: list[str]) -> None:
    assert caption_flags(caption, finish, logprob) == expected


def test_the_thresholds_are_tunable() -> None:
    text = "The beat goes on and on, " + "on and on and on and on, " * 2 + "the beat goes on and on and on. " * 2
    ratio = compression_ratio(text)
    assert ratio is not None and 2.4 < ratio < 4
    assert caption_flags(text, rules=QualityRules(compression_ratio=4.0)) == []  # tandem-free: only the ratio
    assert caption_flags("A dog barks.", "stop", -1.7, rules=QualityRules(min_logprob=-2.0)) == []
    assert caption_flags("A dog barks.", "stop", -0.5, rules=QualityRules(min_logprob=-0.4)) == [LOW_CONFIDENCE]


def test_compression_ratio_is_whispers() -> None:
    import zlib

    text = "héllo wörld " * 10
    assert compression_ratio(text) == len(text.encode()) / len(zlib.compress(text.encode()))
    assert compression_ratio("") == 0.0 and compression_ratio(None) is None


def test_tandem_repeat_reports_period_and_copies() -> None:
    assert tandem_repeat(words("key key key key key key key")) == (1, 7.0)
    assert tandem_repeat(words("a b a b a b a b")) == (2, 4.0)
    assert tandem_repeat(words("a b a b a b")) is None  # two words three times: a pattern, not a loop
    assert tandem_repeat(words("one two three one two three one two three")) == (3, 3.0)
    assert words("Drums, DRUMS!  音乐") == ["drums", "drums", "音", "乐"]


def test_repetition_check_is_fast_on_long_captions() -> None:
    import random

    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    text = " ".join(rng.choice(vocab) for _ in range(2000))  # 2000 words, each seen ~5 times, no loop
    start = time.perf_counter()
    assert caption_flags(text) == []
    assert time.perf_counter() - start < 0.5


def _result(caption: str | None, error: str | None = None, chunk_error: str | None = None) -> Result:
    item = AudioItem(id="a", path="/a.wav")
    chunk = Chunk(item=item, index=0, num_chunks=1, start_s=0, end_s=10, samples=None, duration_s=10,
                  error=chunk_error)  # fmt: skip
    return Result(chunk=chunk, prompt="p", caption=caption, finish_reason="stop", error=error, avg_logprob=-0.2)


def test_silence_hallucination_needs_measures_and_a_caption_that_describes_content() -> None:
    quiet = {"rms_dbfs": -75.0, "peak_dbfs": -62.0, "active_ratio": 0.0}
    loud = {"rms_dbfs": -18.0, "peak_dbfs": -1.0, "active_ratio": 0.9}
    talk = _result("A man speaks about the weather while cars pass by.")
    assert flags_for(talk) == []  # no measures: not checked
    assert flags_for(talk, loud) == []
    assert flags_for(talk, quiet) == [SILENCE_HALLUCINATION]
    assert flags_for(_result("Silence."), quiet) == []
    assert flags_for(_result("The recording is nearly silent, with faint hiss."), quiet) == []
    assert flags_for(talk, {"active_ratio": 0.001}) == [SILENCE_HALLUCINATION]

    class Measures:  # an object with the gate's attributes works too
        rms_dbfs, peak_dbfs, active_ratio = -80.0, -70.0, None

    assert flags_for(talk, Measures()) == [SILENCE_HALLUCINATION]


def test_error_rows_have_no_flags() -> None:
    assert flags_for(_result(None, error="rejected by the engine: x")) is None
    assert flags_for(_result(None, chunk_error="too short")) is None


def test_mean_logprob_counts_a_think_models_answer_only() -> None:
    assert mean_logprob([]) is None and mean_logprob(None) is None
    assert mean_logprob([-1.0, -3.0]) == -2.0
    # reasoning tokens 1..3, </think> = (7, 8), answer 4, 5
    ids = [1, 2, 3, 7, 8, 4, 5]
    lps = [-5.0, -5.0, -5.0, -0.1, -0.1, -0.5, -1.5]
    assert mean_logprob(lps, ids, after=(7, 8)) == -1.0
    assert mean_logprob(lps, ids, after=(9,)) == pytest.approx(sum(lps) / len(lps))  # no tag: every token


def test_parse_flags_names_the_option() -> None:
    assert parse_flags("repetition, empty", "--fallback-on") == {REPETITION, EMPTY}
    with pytest.raises(ValueError, match="--fallback-on 'loops'"):
        parse_flags("repetition,loops", "--fallback-on")
