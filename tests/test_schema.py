"""Structured captions (issue 13): a bad schema is a usage error before the model loads; every row of a
schema run is valid JSON with typed columns, or an error row that says why.

All but the last test run without an engine (``get_engine`` replaced by a fake that writes canned JSON);
the last one runs the real vLLM CPU engine on the tiny AF3 checkpoint with constrained decoding.
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from conftest import ENGINE_ARGS, make_audio, read_rows, run_cli

from flamingo_cli.config import load_preset
from flamingo_cli.engine import END, sampling_kwargs
from flamingo_cli.records import AudioItem, Chunk, Result, Sampling
from flamingo_cli.schema import (
    UNENFORCED_KEYWORDS,
    JsonSchema,
    SchemaError,
    flat_fields,
    load_schema,
    parse_schema,
)

TAGS = {
    "type": "object",
    "properties": {
        "genre": {"type": "string"},
        "bpm": {"type": ["integer", "null"], "minimum": 20, "maximum": 300},
        "score": {"type": "number"},
        "vocals": {"type": "boolean"},
        "instruments": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "mood": {"enum": ["calm", "dark"]},
    },
    "required": ["genre", "bpm", "vocals", "instruments"],
    "additionalProperties": False,
}
EXPECTED_TYPES = {
    "caption_json": pa.string(),
    "f_genre": pa.string(),
    "f_bpm": pa.int64(),
    "f_score": pa.float64(),
    "f_vocals": pa.bool_(),
    "f_instruments": pa.list_(pa.string()),
    "f_mood": pa.string(),
}
VALID = {"genre": "jazz", "bpm": 96, "score": 0.5, "vocals": False, "instruments": ["piano", "bass"], "mood": "calm"}


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value) if not isinstance(value, str) else value, encoding="utf-8")
    return path


def result(text: str | None, finish_reason: str = "stop", error: str | None = None) -> Result:
    item = AudioItem(id="a", path="/x/a.wav")
    chunk = Chunk(item=item, index=0, num_chunks=1, start_s=0.0, end_s=1.0, samples=None, duration_s=1.0)
    return Result(chunk=chunk, prompt="p", caption=text, finish_reason=finish_reason, error=error)


# --- checking a schema ---------------------------------------------------------------------------------


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """get_engine records any call: a schema error must come before the model loads."""
    import flamingo_cli.launch

    calls: list[Any] = []
    monkeypatch.setattr(flamingo_cli.launch, "get_engine", lambda config: calls.append(config))
    return calls


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"type": "object", "properties": {', "not JSON: Expecting property name"),
        ("[1, 2]", "a schema must be a JSON object, not list"),
        ({"type": "objekt"}, "not a JSON Schema: at type: 'objekt' is not valid"),
        ({"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}}, "not a JSON Schema"),
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "if": {"required": ["a"]}, "then": {}},
            "at $: if, then cannot be enforced",
        ),
    ],
)
def test_bad_schema_is_a_usage_error_before_the_model_loads(tmp_path, no_engine, content, reason) -> None:
    bad = write_json(tmp_path / "bad.json", content)
    audio = make_audio(tmp_path / "in" / "a.wav", 1.0)
    res = run_cli(["caption", audio.parent, "--out", tmp_path / "out", "--model", "af3", "--schema", bad, "--quiet"])
    assert res.status == 2, res.stderr
    assert str(bad) in res.stderr and reason in res.stderr
    assert no_engine == [] and not (tmp_path / "out").exists()


def test_unconstrainable_schema_is_a_usage_error_naming_where(tmp_path, no_engine) -> None:
    """vLLM's xgrammar backend refuses multipleOf; the error names the subschema (vLLM's does not)."""
    bad = write_json(
        tmp_path / "bad.json",
        {"type": "object", "properties": {"bpm": {"type": "integer", "multipleOf": 2}}, "required": ["bpm"]},
    )
    audio = make_audio(tmp_path / "in" / "a.wav", 1.0)
    res = run_cli(["caption", audio.parent, "--out", tmp_path / "out", "--model", "af3", "--schema", bad, "--quiet"])
    assert res.status == 2, res.stderr
    assert "cannot constrain this schema at $.properties.bpm" in res.stderr
    assert no_engine == []
    with pytest.raises(SchemaError, match=r"cannot constrain this schema: .*Cannot find field \$defs"):
        parse_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "ref.json")


def test_structured_outputs_that_cannot_load_are_a_usage_error(tmp_path, no_engine, monkeypatch) -> None:
    """vLLM imports xgrammar at the first request; a host where it cannot load (a missing or broken
    library) is told so before the model loads, not with one "rejected" row per chunk."""
    import vllm.v1.structured_output.backend_xgrammar as backend

    def broken(params: Any) -> None:
        raise ImportError("libxgrammar_bindings.so: cannot open shared object file")

    monkeypatch.setattr(backend, "validate_xgrammar_grammar", broken)
    schema = write_json(tmp_path / "ok.json", {"type": "object", "properties": {"a": {"type": "string"}}})
    audio = make_audio(tmp_path / "in" / "a.wav", 1.0)
    res = run_cli(["caption", audio.parent, "--out", tmp_path / "out", "--model", "af3", "--schema", schema, "--quiet"])
    assert res.status == 2, res.stderr
    assert "structured outputs are unavailable on this host" in res.stderr and "libxgrammar_bindings" in res.stderr
    assert str(schema) in res.stderr and no_engine == [] and "Traceback" not in res.stderr


def test_a_vllm_missing_a_validator_library_is_told_before_the_model_loads(tmp_path, no_engine, monkeypatch) -> None:
    """vLLM 0.24 imports every structured-output backend to validate each request, xgrammar or not; the
    GPU host of the 2026-12-02 lease lacked lm-format-enforcer and its engine rejected every request.
    flamingo imports the same modules first: exit 2 naming the missing package, no engine."""
    monkeypatch.setitem(sys.modules, "lmformatenforcer", None)  # import lmformatenforcer now fails
    monkeypatch.delitem(sys.modules, "vllm.v1.structured_output.backend_lm_format_enforcer", raising=False)
    schema = write_json(tmp_path / "ok.json", {"type": "object", "properties": {"a": {"type": "string"}}})
    audio = make_audio(tmp_path / "in" / "a.wav", 1.0)
    res = run_cli(["caption", audio.parent, "--out", tmp_path / "out", "--model", "af3", "--schema", schema, "--quiet"])
    assert res.status == 2, res.stderr
    assert "structured outputs are unavailable on this host" in res.stderr
    assert "'lmformatenforcer'" in res.stderr and "backend_lm_format_enforcer" in res.stderr
    assert str(schema) in res.stderr and no_engine == [] and "Traceback" not in res.stderr


def test_the_preflight_imports_what_vllm_imports_to_validate_a_request() -> None:
    """VLLM_VALIDATOR_MODULES is read off the installed vLLM's request validator, not assumed."""
    import inspect
    import re

    from vllm.sampling_params import SamplingParams

    from flamingo_cli.schema import VLLM_VALIDATOR_MODULES

    source = inspect.getsource(SamplingParams._validate_structured_outputs)
    imported = set(re.findall(r"from (vllm\.v1\.structured_output\.\w+) import", source))
    assert imported == set(VLLM_VALIDATOR_MODULES)


def test_a_host_without_jsonschema_is_told_before_the_model_loads(tmp_path, no_engine, monkeypatch) -> None:
    """jsonschema is a dependency, but a hand-assembled host can lack it (the GPU lease of 2026-12-02
    did): exit 2 naming the package and the schema, no traceback, no engine."""
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema now raises ImportError
    schema = write_json(tmp_path / "ok.json", {"type": "object", "properties": {"a": {"type": "string"}}})
    audio = make_audio(tmp_path / "in" / "a.wav", 1.0)
    res = run_cli(["caption", audio.parent, "--out", tmp_path / "out", "--model", "af3", "--schema", schema, "--quiet"])
    assert res.status == 2, res.stderr
    assert "needs the jsonschema package" in res.stderr and str(schema) in res.stderr
    assert no_engine == [] and "Traceback" not in res.stderr
    res = run_cli(["caption", audio.parent, "--out", tmp_path / "out2", "--model", "af3", "--task", "audio-tags"])
    assert res.status == 2 and "needs the jsonschema package" in res.stderr and no_engine == []


def test_describe_music_checks_the_schema_first(tmp_path, no_engine) -> None:
    bad = write_json(tmp_path / "bad.json", "{")
    track = make_audio(tmp_path / "t.wav", 1.0)
    res = run_cli(["describe-music", track, "--schema", bad])
    assert res.status == 2 and "not JSON" in res.stderr and no_engine == []


def test_missing_schema_file(tmp_path) -> None:
    with pytest.raises(SchemaError, match="schema file not found"):
        load_schema(tmp_path / "nope.json")


def test_unenforced_keywords_really_are_ignored_by_xgrammar() -> None:
    """Why UNENFORCED_KEYWORDS is refused: xgrammar builds the same grammar with or without each."""
    xgrammar = pytest.importorskip("xgrammar")
    base = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
        "required": ["a"],
    }

    def grammar(schema: dict) -> str:
        return str(xgrammar.Grammar.from_json_schema(json.dumps(schema)))

    additions = {
        "if": {"required": ["b"]},
        "then": {"required": ["b"]},
        "else": {"required": ["b"]},
        "dependentRequired": {"a": ["b"]},
        "dependentSchemas": {"a": {"required": ["b"]}},
        "dependencies": {"a": ["b"]},
    }
    assert set(additions) == set(UNENFORCED_KEYWORDS)
    for keyword, value in additions.items():
        assert grammar({**base, keyword: value}) == grammar(base), keyword
    assert grammar({**base, "required": ["a", "b"]}) != grammar(base)  # the comparison does see a change


def test_property_named_like_a_keyword_is_not_a_keyword() -> None:
    schema = parse_schema({"type": "object", "properties": {"if": {"type": "string"}}}, "x", check_engine=False)
    assert [f.column for f in schema.fields] == ["f_if"]


# --- typed fields and output checks --------------------------------------------------------------------


def test_flat_fields_and_nested_schemas() -> None:
    schema = parse_schema(TAGS, "tags.json", check_engine=False)
    assert {f.name: f.type for f in schema.arrow_fields()} == EXPECTED_TYPES
    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}
    assert flat_fields(nested) == ()
    assert flat_fields({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}) == ()
    assert [f.name for f in parse_schema(nested, "n", check_engine=False).arrow_fields()] == ["caption_json"]
    with pytest.raises(SchemaError, match="both become column f_a_b"):
        parse_schema(
            {"type": "object", "properties": {"a-b": {"type": "string"}, "a b": {"type": "string"}}},
            "clash.json",
            check_engine=False,
        )


def test_schema_text_keeps_key_order_and_joins_the_run_identity() -> None:
    schema = parse_schema(TAGS, "tags.json", check_engine=False)
    assert list(json.loads(schema.text)["properties"]) == list(TAGS["properties"])  # generation order
    plain = Sampling(max_tokens=64)
    assert "json_schema" not in plain.identity()  # runs without a schema keep their keys
    assert Sampling(max_tokens=64, json_schema=schema.text).identity()["json_schema"] == schema.hash
    assert "structured_outputs" not in sampling_kwargs(plain)
    assert sampling_kwargs(Sampling(json_schema=schema.text))["structured_outputs"] == {"json": schema.text}


@pytest.mark.parametrize(
    ("text", "finish", "error"),
    [
        (json.dumps(VALID), "stop", None),
        (json.dumps({**VALID, "bpm": None}), "stop", None),
        ('{"genre": "jazz", "bpm": 9', "length", "truncated JSON at max tokens"),
        ("jazz, 96 bpm", "stop", "not JSON: Expecting value at char 0"),
        (json.dumps({**VALID, "bpm": "fast"}), "stop", "schema violation: $.bpm: 'fast' is not of type"),
        (json.dumps({**VALID, "bpm": 1000}), "stop", "schema violation: $.bpm: 1000 is greater than the maximum"),
        (json.dumps({k: v for k, v in VALID.items() if k != "vocals"}), "stop", "schema violation: $: 'vocals'"),
        (json.dumps({**VALID, "bpm": 2**70}), "stop", "schema violation: $.bpm: 1180591620717411303424 is greater"),
    ],
)
def test_every_output_is_valid_or_an_error_with_a_reason(text, finish, error) -> None:
    schema = parse_schema(TAGS, "tags.json", check_engine=False)
    checked = schema.apply(result(text, finish))
    if error is None:
        assert checked.error is None
        values = schema.row_values(checked)
        assert json.loads(values["caption_json"]) == json.loads(text)
        assert values["f_instruments"] == ["piano", "bass"] and values["f_vocals"] is False
    else:
        assert checked.error is not None and checked.error.startswith(error), checked.error
        assert set(schema.row_values(checked).values()) == {None}


def test_raw_control_characters_that_the_grammar_lets_through_are_valid_rows() -> None:
    r"""xgrammar constrains a string with maxLength to [^"\\\r\n] (a user's schema may bound its strings; the
    presets no longer do), so a tab or \x01 can be generated raw inside one; such a row meets the schema
    and is kept, and caption_json carries it escaped, as strict JSON."""
    bounded = {
        "type": "object",
        "properties": {
            "events": {"type": "array", "items": {"type": "string", "maxLength": 40}},
            "place": {"type": "string", "maxLength": 60},
        },
        "required": ["events", "place"],
        "additionalProperties": False,
    }
    schema = parse_schema(bounded, "bounded.json", check_engine=False)
    value = {"events": ["dog\tbark"], "place": "park\x01"}
    text = json.dumps(value).replace("\\t", "\t").replace("\\u0001", "\x01")  # the raw characters
    assert "\t" in text and "\x01" in text
    with pytest.raises(json.JSONDecodeError, match="Invalid control character"):
        json.loads(text)  # what a strict parser says of it
    xgrammar = pytest.importorskip("xgrammar")
    assert xgrammar.testing._is_grammar_accept_string(xgrammar.Grammar.from_json_schema(schema.text), text)
    checked = schema.apply(result(text, "stop"))
    assert checked.error is None
    values = schema.row_values(checked)
    assert json.loads(values["caption_json"]) == value  # strict JSON, the characters kept
    assert values["f_events"] == ["dog\tbark"] and values["f_place"] == "park\x01"


def test_the_presets_leave_strings_unbounded_so_the_grammar_keeps_them_clean() -> None:
    """Why the presets carry no maxLength: without it xgrammar's string rule excludes every control
    character, so raw ones cannot be generated (and its token masks cost far less, BENCHMARKS.md)."""
    xgrammar = pytest.importorskip("xgrammar")
    for name in ("audio-tags", "music-tags"):
        assert parse_schema(load_preset(name).schema, name, check_engine=False).bounded_strings == ()
    grammar = xgrammar.Grammar.from_json_schema(json.dumps(load_preset("audio-tags").schema))
    value = {
        "sound_events": ["dog bark"],
        "speech_present": False,
        "speakers": 0,
        "language": "none",
        "environment": "park",
        "description": "A dog barks.",
    }
    assert xgrammar.testing._is_grammar_accept_string(grammar, json.dumps(value))
    raw_tab = json.dumps({**value, "environment": "pa\trk"}).replace("\\t", "\t")
    assert not xgrammar.testing._is_grammar_accept_string(grammar, raw_tab)


def test_int64_overflow_is_an_error_not_a_crash() -> None:
    schema = parse_schema({"type": "object", "properties": {"n": {"type": "integer"}}}, "n", check_engine=False)
    checked = schema.apply(result(json.dumps({"n": 2**70})))
    assert checked.error == "schema violation: $.n: 1180591620717411303424 is outside the int64 range"


def test_error_results_pass_through_untouched() -> None:
    schema = JsonSchema(json.dumps(TAGS))
    failed = result(None, error="rejected by the engine: boom")
    assert schema.apply(failed) is failed


# --- presets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["music-tags", "audio-tags"])
def test_schema_presets_are_valid_flat_and_match_their_prompts(name) -> None:
    from flamingo_cli.config import load_preset

    preset = load_preset(name)
    schema = parse_schema(preset.schema, preset.schema_source)  # with vLLM's xgrammar check
    props = list(preset.schema["properties"])
    assert [f.name for f in schema.fields] == props  # every field gets a typed column
    for prop in props:
        assert f'"{prop}"' in preset.prompt, f"{name}: the prompt does not ask for {prop!r}"
    assert "JSON" in preset.prompt


def test_preset_schema_file_errors(tmp_path) -> None:
    from flamingo_cli.config import ConfigError, load_preset

    toml = tmp_path / "t.toml"
    toml.write_text('[task]\nmodel = "af3"\nprompt = "p"\nschema = "s.json"\n')
    with pytest.raises(ConfigError, match="cannot read its schema"):
        load_preset(str(toml))
    (tmp_path / "s.json").write_text("{nope")
    with pytest.raises(ConfigError, match="is not JSON"):
        load_preset(str(toml))
    (tmp_path / "s.json").write_text(json.dumps(TAGS))
    assert load_preset(str(toml)).schema == TAGS


# --- a whole run with a fake engine: typed columns as pandas, polars and DuckDB read them ----------------


class JsonEngine:
    """Answers by file name: valid JSON, a schema violation, truncated JSON, or free text."""

    def __init__(self) -> None:
        self.versions = {"vllm": "fake"}
        self.schemas: list[str | None] = []

    def effective_sampling(self, sampling: Any) -> dict[str, Any]:
        return sampling.identity()

    def run(self, feed: queue.Queue, sampling: Sampling, on_step: Any = None):
        self.schemas.append(sampling.json_schema)
        while (request := feed.get()) is not END:
            kind = request.chunk.item.id.split("-")[0]
            text, finish = {
                "valid": (json.dumps(VALID), "stop"),
                "partial": (
                    json.dumps({"genre": "jazz", "bpm": None, "vocals": False, "instruments": ["piano", "bass"]}),
                    "stop",
                ),
                "violation": (json.dumps({**VALID, "vocals": "yes"}), "stop"),
                "truncated": (json.dumps(VALID)[:20], "length"),
                "text": ("a calm jazz tune", "stop"),
            }[kind]
            yield Result(
                chunk=request.chunk,
                prompt=request.prompt,
                caption=text,
                finish_reason=finish,
                prompt_tokens=5,
                output_tokens=7,
            )

    def abort_all(self) -> None:
        pass

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


def test_bounded_strings_are_warned_about_before_the_run(tmp_path, monkeypatch, use_engine) -> None:
    """maxLength/minLength make xgrammar's masks ~300x costlier (BENCHMARKS.md): the run says where,
    before the model loads, and goes on (a warning, not an error; exit 0, rows written)."""
    import flamingo_cli.prompts

    use_engine(JsonEngine())
    monkeypatch.setattr(flamingo_cli.prompts, "load_chat_template", lambda model: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_audio(tmp_path / "in" / "valid-1.wav", 1.0)
    bounded = {**TAGS, "properties": {**TAGS["properties"], "genre": {"type": "string", "maxLength": 40}}}
    bounded["properties"]["instruments"] = {"type": "array", "items": {"type": "string", "minLength": 1}}
    schema_file = write_json(tmp_path / "bounded.json", bounded)
    assert parse_schema(bounded, "b", check_engine=False).bounded_strings == (
        "$.properties.genre",
        "$.properties.instruments.items",
    )
    out = tmp_path / "out"
    res = run_cli(["caption", tmp_path / "in", "--out", out, "--model", "af3", "--schema", schema_file, "--quiet"])
    assert res.status == 0, res.stderr
    assert f"warning: {schema_file}: maxLength/minLength at $.properties.genre, $.properties.instruments.items" in (
        " ".join(res.stderr.split())
    )
    (row,) = read_rows(out)
    assert row["error"] is None and row["f_genre"] == "jazz"


def test_schema_run_writes_typed_columns_readable_by_pandas_polars_duckdb(tmp_path, monkeypatch, use_engine) -> None:
    import flamingo_cli.prompts

    engine = use_engine(JsonEngine())
    monkeypatch.setattr(flamingo_cli.prompts, "load_chat_template", lambda model: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = ["valid-1", "valid-2", "partial-1", "violation-1", "truncated-1", "text-1"]
    for i, name in enumerate(names):
        make_audio(tmp_path / "in" / f"{name}.wav", 1.0, seed=i)
    schema_file = write_json(tmp_path / "tags.json", TAGS)
    out = tmp_path / "out"
    args = ["caption", tmp_path / "in", "--out", out, "--model", "af3", "--schema", schema_file, "--quiet"]
    res = run_cli(args)
    assert res.status == 1, res.stderr  # some rows failed: exit 1, the rest written
    assert engine.schemas == [parse_schema(TAGS, "x", check_engine=False).text]
    assert "maxLength" not in res.stderr  # no bounded strings, no cost warning

    rows = {r["id"].removesuffix(".wav"): r for r in read_rows(out)}
    assert set(rows) == set(names)
    for name, row in rows.items():
        if name.startswith(("valid", "partial")):
            assert row["error"] is None and json.loads(row["caption_json"])["genre"] == "jazz"
        else:
            assert row["error"] and row["caption_json"] is None and row["f_genre"] is None
    assert rows["violation-1"]["error"].startswith("schema violation: $.vocals: 'yes' is not of type 'boolean'")
    assert rows["truncated-1"]["error"] == "truncated JSON at max tokens (raise --max-tokens)"
    assert rows["text-1"]["error"].startswith("not JSON: ")
    assert rows["partial-1"]["f_bpm"] is None and rows["partial-1"]["f_genre"] == "jazz"

    part_schema = ds.dataset(out, partitioning="hive", format="parquet").schema
    for column, expected in EXPECTED_TYPES.items():
        assert part_schema.field(column).type == expected, column

    import duckdb
    import pandas as pd
    import polars as pl

    # pandas' numpy default turns a nullable int64 into float64; its nullable backends keep the types.
    assert str(pd.read_parquet(out, dtype_backend="pyarrow")["f_bpm"].dtype) == "int64[pyarrow]"
    frame = pd.read_parquet(out, dtype_backend="numpy_nullable")
    assert {c: str(frame[c].dtype) for c in ("f_bpm", "f_score", "f_vocals")} == {
        "f_bpm": "Int64",
        "f_score": "Float64",
        "f_vocals": "boolean",
    }
    ok = frame[frame["error"].isna()].sort_values("id")
    assert ok["f_bpm"].tolist()[1:] == [96, 96] and pd.isna(ok["f_bpm"].tolist()[0])
    assert ok["f_vocals"].tolist() == [False, False, False]
    assert list(ok["f_instruments"].iloc[1]) == ["piano", "bass"]

    lazy = pl.scan_parquet(str(out / "**" / "*.parquet"), hive_partitioning=True)
    polars_schema = lazy.collect_schema()
    assert polars_schema["f_bpm"] == pl.Int64 and polars_schema["f_score"] == pl.Float64
    assert polars_schema["f_vocals"] == pl.Boolean and polars_schema["f_genre"] == pl.String
    assert polars_schema["f_instruments"] == pl.List(pl.String)
    assert lazy.filter(pl.col("error").is_null()).select(pl.col("f_bpm").sum()).collect().item() == 192

    con = duckdb.connect()
    glob = str(out / "**" / "*.parquet")
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{glob}')").fetchall())
    assert types["f_bpm"] == "BIGINT" and types["f_score"] == "DOUBLE" and types["f_vocals"] == "BOOLEAN"
    assert types["f_genre"] == "VARCHAR" and types["f_instruments"] == "VARCHAR[]"
    genres = con.execute(f"SELECT f_genre, count(*) FROM '{glob}' WHERE error IS NULL GROUP BY 1").fetchall()
    assert genres == [("jazz", 3)]

    # flamingo inspect: fill rates and value counts per field
    res = run_cli(["inspect", out, "--json"])
    assert res.status == 0, res.stderr
    (run,) = json.loads(res.stdout)["run_details"]
    fields = run["fields"]
    assert fields["f_genre"]["fill_rate"] == 1.0 and fields["f_genre"]["top"] == [["jazz", 3]]
    assert fields["f_bpm"]["filled"] == 2 and fields["f_bpm"]["min"] == 96
    assert fields["f_instruments"]["top"] == [["piano", 3], ["bass", 3]]
    assert fields["f_vocals"]["top"] == [[False, 3]]
    assert run["schema"]["hash"] == parse_schema(TAGS, "x", check_engine=False).hash
    text = run_cli(["inspect", out])
    assert "f_genre" in text.stdout and "jazz ×3" in text.stdout

    # the same schema resumes the same run (a new file: a new part with the same columns, not taken for
    # passthrough columns); another schema is another run
    assert run_cli(args).status == 0 and len(read_rows(out)) == len(names)  # nothing left to do
    make_audio(tmp_path / "in" / "valid-3.wav", 1.0, seed=9)
    assert run_cli(args).status == 0 and len(read_rows(out)) == len(names) + 1
    import pyarrow.parquet as pq

    schemas = {str(pq.read_schema(p).remove_metadata()) for p in out.glob("run=*/part-*.parquet")}
    assert len(schemas) == 1 and len(list(out.glob("run=*/part-*.parquet"))) == 2
    other = write_json(tmp_path / "other.json", {**TAGS, "required": ["genre"]})
    run_cli([*args[:-3], "--schema", other, "--quiet"])
    assert len(list(out.glob("run=*"))) == 2


# --- the real engine: constrained decoding on the tiny AF3 checkpoint ---------------------------------


@pytest.mark.engine
def test_schema_run_on_tiny_af3_rows_validate_or_say_why(tmp_path, tiny_af3) -> None:
    import jsonschema
    from vllm.sampling_params import StructuredOutputsParams

    from flamingo_cli.config import load_preset
    from flamingo_cli.ray_data import sampling_dict

    for i in range(3):
        make_audio(tmp_path / "in" / f"clip{i}.wav", 2.0 + i, seed=i)
    preset = load_preset("audio-tags")
    schema_file = write_json(tmp_path / "tags.json", preset.schema)
    out = tmp_path / "out"
    # The engine options of the other engine tests (one shared engine) but room for a whole object.
    args = [*ENGINE_ARGS[:3], "64", *ENGINE_ARGS[4:]]
    res = run_cli(["caption", tmp_path / "in", "--out", out, "--model", tiny_af3, "--schema", schema_file, *args])
    assert res.status in (0, 1), res.stderr
    rows = read_rows(out)
    assert len(rows) == 3
    validator = jsonschema.Draft202012Validator(preset.schema)
    for row in rows:
        if row["error"] is None:
            value = json.loads(row["caption_json"])
            validator.validate(value)
            assert row["f_speech_present"] == value["speech_present"]
            assert row["f_sound_events"] == value["sound_events"]
        else:
            assert row["error"].startswith(("truncated JSON at max tokens", "schema violation: ")), row["error"]
            assert row["caption_json"] is None
        # Constrained decoding: whatever the random weights chose, the text is a prefix of valid JSON.
        assert row["caption"].startswith("{"), row["caption"]
    # A schema whose every object fits in the budget: decoding must end in a valid object, every time.
    small = {
        "type": "object",
        "properties": {
            "speech_present": {"type": "boolean"},
            "speakers": {"type": "integer", "minimum": 0, "maximum": 9},
            "environment": {"enum": ["street", "studio", "home"]},
        },
        "required": ["speech_present", "speakers", "environment"],
        "additionalProperties": False,
    }
    small_file = write_json(tmp_path / "small.json", small)
    out2 = tmp_path / "out2"
    res = run_cli(["caption", tmp_path / "in", "--out", out2, "--model", tiny_af3, "--schema", small_file, *args])
    assert res.status == 0, res.stderr
    rows = read_rows(out2)
    assert len(rows) == 3
    for row in rows:
        value = json.loads(row["caption_json"])
        jsonschema.validate(value, small)
        assert row["error"] is None and row["finish_reason"] == "stop"
        assert (row["f_speech_present"], row["f_speakers"], row["f_environment"]) == (
            value["speech_present"],
            value["speakers"],
            value["environment"],
        )
    (run,) = json.loads(run_cli(["inspect", out2, "--json"]).stdout)["run_details"]
    assert run["fields"]["f_environment"]["fill_rate"] == 1.0 and run["fields"]["f_speakers"]["filled"] == 3
    # The Ray path asks for the same constraint (ray.data.llm builds StructuredOutputsParams from it).
    text = parse_schema(preset.schema, "x", check_engine=False).text
    structured = sampling_dict(str(tiny_af3), Sampling(max_tokens=8, json_schema=text))["structured_outputs"]
    assert StructuredOutputsParams(**structured).json == text
