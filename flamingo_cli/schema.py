"""Structured captions: a JSON Schema in, generation constrained to it, validated JSON and typed columns out.

A schema comes from ``--schema FILE.json`` or a preset's ``schema`` and is checked once, before any model
loads (``SchemaError`` → exit 2): it must be JSON, a valid JSON Schema (the ``jsonschema`` library's
meta-schema check) and one that vLLM 0.24's structured outputs can enforce with the xgrammar backend
(vLLM's own request validator, plus the keywords xgrammar accepts but silently does not enforce).

Its canonical text (compact, key order kept: xgrammar emits properties in schema order) travels in
``records.Sampling.json_schema``, so the schema joins the run key. A flat schema (an object of scalars
and string arrays) also gets one typed, nullable Parquet column per property, ``f_<property>``, declared
up front; any other schema gets only ``caption_json``.

Every generated text is checked again after decoding (``JsonSchema.check``): constrained decoding still
stops at ``max_tokens`` mid-object, and a few keywords are only checked here. A row is either valid or an
error row whose ``error`` says why; nothing invalid is written as a success.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from flamingo_cli.errors import UsageError
from flamingo_cli.records import Result, Sampling, text_hash

CAPTION_JSON = "caption_json"
COLUMN_PREFIX = "f_"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Keywords xgrammar 0.2 compiles without error but does not enforce (the grammar is the same with or
# without them; tests/test_schema.py checks this against the installed xgrammar). A schema using them
# would let the model write JSON that breaks them, so it is refused up front.
UNENFORCED_KEYWORDS = ("if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies")

# String length bounds: xgrammar 0.2.3 cannot precompute such a string's token masks (bench.py grammar).
STRING_BOUNDS = ("maxLength", "minLength")

# Where subschemas sit inside a schema (JSON Schema 2020-12 and draft 7), for walking it.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = (
    "items",
    "additionalItems",
    "additionalProperties",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
)
_XGRAMMAR_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")
_KINDS = {"string": "string", "integer": "int64", "number": "float64", "boolean": "bool"}


class SchemaError(UsageError):
    """A schema that cannot be used (not JSON, not a JSON Schema, not enforceable): names it and why.
    A usage error (exit 2), raised before any model loads."""


@dataclass(frozen=True)
class Field:
    """One typed column of a flat schema: the JSON property, its column and its Arrow type."""

    name: str
    column: str
    kind: str  # string | int64 | float64 | bool | list<string>


@dataclass(frozen=True)
class Parsed:
    """One generated text checked against the schema: the object and typed values, or why not."""

    value: Any = None
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # column -> typed value
    error: str | None = None


@dataclass(frozen=True, eq=False)
class JsonSchema:
    """A checked schema: its canonical text (what the engine and the run key see) and typed fields."""

    text: str
    source: str = ""

    @cached_property
    def value(self) -> Any:
        return json.loads(self.text)

    @cached_property
    def hash(self) -> str:
        """12 hex of the canonical text's sha256: short enough for logs, part of the run identity."""
        return text_hash(self.text)

    @cached_property
    def bounded_strings(self) -> tuple[str, ...]:
        """Where the schema bounds a string's length (maxLength/minLength): xgrammar 0.2.3 cannot serve
        such a string's token masks from its precomputed ones (they depend on the characters left), so
        each costs CPU time the GPU waits for (BENCHMARKS.md: 1.16 vs 0.004 ms a mask)."""
        return tuple(path for path, node in subschemas(self.value) if any(k in node for k in STRING_BOUNDS))

    def cost_warning(self) -> str | None:
        """What a user should hear before a costly schema runs (None when it is not costly)."""
        where = self.bounded_strings
        if not where:
            return None
        shown = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        return (
            f"{self.source}: maxLength/minLength at {shown}: xgrammar builds these strings' token masks on "
            "the CPU at ~300x the cost of unbounded ones (an H200 ran such a schema at 0.44x free text, "
            "BENCHMARKS.md); bound the values through the prompt instead"
        )

    @cached_property
    def fields(self) -> tuple[Field, ...]:
        """The typed columns of a flat schema; () for any other schema (only ``caption_json`` then)."""
        return flat_fields(self.value, self.source)

    @cached_property
    def _validator(self) -> Any:
        import jsonschema

        cls = jsonschema.validators.validator_for(self.value, default=jsonschema.Draft202012Validator)
        return cls(self.value, format_checker=cls.FORMAT_CHECKER)

    def arrow_fields(self) -> list[Any]:
        """The columns this schema adds to the sink's schema: ``caption_json`` then ``f_*`` (all nullable)."""
        import pyarrow as pa

        types = {
            "string": pa.string(),
            "int64": pa.int64(),
            "float64": pa.float64(),
            "bool": pa.bool_(),
            "list<string>": pa.list_(pa.string()),
        }
        return [pa.field(CAPTION_JSON, pa.string()), *(pa.field(f.column, types[f.kind]) for f in self.fields)]

    def check(self, text: str | None, finish_reason: str | None = None) -> Parsed:
        """Parse and validate one generated text; ``error`` says why it is not a valid row."""
        if text is None:
            return Parsed(error="no output")
        try:
            # strict=False: raw control characters inside strings are accepted. xgrammar (0.2.3, vLLM
            # 0.24's default backend) constrains a string with maxLength/minLength to [^"\\\r\n], so a
            # tab or \x01 can be generated inside one (the presets bounded theirs then); on the H200
            # strict parsing made 480 of a random-weight run's 600 constrained rows "not JSON".
            # caption_json is re-serialised with escapes, so readers still get strict JSON.
            value = json.loads(text, strict=False)
        except json.JSONDecodeError as exc:
            if finish_reason == "length":
                return Parsed(error="truncated JSON at max tokens (raise --max-tokens)")
            return Parsed(error=f"not JSON: {exc.msg} at char {exc.pos}: {_clip(text, 60)!r}")
        import jsonschema

        problem = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
        if problem is not None:
            return Parsed(error=f"schema violation: {problem.json_path}: {_clip(problem.message, 200)}")
        values: dict[str, Any] = {}
        for f in self.fields:
            raw = value.get(f.name) if isinstance(value, dict) else None
            typed, error = _typed(raw, f.kind)
            if error is not None:
                return Parsed(error=f"schema violation: $.{f.name}: {error}")
            values[f.column] = typed
        return Parsed(value=value, values=values)

    def apply(self, result: Result) -> Result:
        """The result as the sink should see it: unchanged if valid, else with ``error`` set to the reason."""
        if result.error is not None or result.chunk.error is not None:
            return result
        parsed = self.check(result.caption, result.finish_reason)
        return result if parsed.error is None else dataclasses.replace(result, error=parsed.error)

    def row_values(self, result: Result) -> dict[str, Any]:
        """``caption_json`` and the ``f_*`` values of one row (all null on error rows)."""
        empty = {CAPTION_JSON: None, **{f.column: None for f in self.fields}}
        if result.error is not None or result.chunk.error is not None:
            return empty
        parsed = self.check(result.caption, result.finish_reason)
        if parsed.error is not None:
            return empty
        compact = json.dumps(parsed.value, ensure_ascii=False, separators=(",", ":"))
        return {CAPTION_JSON: compact, **parsed.values}

    def describe(self) -> dict[str, Any]:
        """What the run metadata records: the schema, its hash and its typed columns."""
        return {
            "hash": self.hash,
            "source": self.source,
            "schema": self.value,
            "fields": {f.column: f.kind for f in self.fields},
        }


# --- loading and checking ----------------------------------------------------------------------------


def canonical(value: Any) -> str:
    """Compact JSON with the author's key order (it is the order the model writes properties in)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def load_schema(path: str | Path, *, check_engine: bool = True) -> JsonSchema:
    """Read and check a JSON Schema file (``--schema FILE.json``)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SchemaError(f"{path}: schema file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{path}: cannot read the schema file ({exc})") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    return parse_schema(value, str(path), check_engine=check_engine)


def parse_schema(value: Any, source: str, *, check_engine: bool = True) -> JsonSchema:
    """Check a schema already parsed from JSON or TOML; ``source`` names it in errors."""
    try:
        import jsonschema
    except ImportError as exc:
        # A declared dependency, but hand-assembled hosts lack it (the GPU lease of 2026-12-02 did):
        # a usage error before the model loads, not a traceback.
        raise SchemaError(
            f"{source}: checking a schema needs the jsonschema package, which this Python cannot import "
            f"({exc}); install flamingo's dependencies (pip install 'jsonschema>=4.23')"
        ) from exc

    if not isinstance(value, dict):
        raise SchemaError(f"{source}: a schema must be a JSON object, not {type(value).__name__}")
    cls = jsonschema.validators.validator_for(value, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(value)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise SchemaError(f"{source}: not a JSON Schema: at {where}: {_clip(exc.message, 200)}") from exc
    for path, node in subschemas(value):
        used = [k for k in UNENFORCED_KEYWORDS if k in node]
        if used:
            raise SchemaError(
                f"{source}: at {path}: {', '.join(used)} cannot be enforced by vLLM's structured outputs "
                "(xgrammar ignores it); express the rule with properties, required, enum or anyOf"
            )
    schema = JsonSchema(canonical(value), source)
    flat_fields(value, source)  # column name clashes are a schema error too
    if check_engine:
        check_constrainable(value, source)
    return schema


def subschemas(node: Any, path: str = "$") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema of ``node`` with a JSON-path-like location (property names are not keywords)."""
    if not isinstance(node, dict):
        return
    yield path, node
    for key, child in node.items():
        if key in _SCHEMA_MAPS and isinstance(child, dict):
            for name, sub in child.items():
                yield from subschemas(sub, f"{path}.{key}.{name}")
        elif key in _SCHEMA_LISTS and isinstance(child, list):
            for i, sub in enumerate(child):
                yield from subschemas(sub, f"{path}.{key}[{i}]")
        elif key in _SCHEMA_VALUES:
            if isinstance(child, list):  # draft 7 tuple "items"
                for i, sub in enumerate(child):
                    yield from subschemas(sub, f"{path}.{key}[{i}]")
            else:
                yield from subschemas(child, f"{path}.{key}")


# What vLLM 0.24 imports to validate every structured-output request, whichever backend runs it
# (SamplingParams._validate_structured_outputs): a host missing one of their libraries refuses every
# request of a --schema run. lm-format-enforcer is the one that loads at import (the GPU host of the
# 2026-12-02 lease lacked it; the engine then rejected each request with "No module named
# 'lmformatenforcer'").
VLLM_VALIDATOR_MODULES = (
    "vllm.v1.structured_output.backend_guidance",
    "vllm.v1.structured_output.backend_lm_format_enforcer",
    "vllm.v1.structured_output.backend_outlines",
    "vllm.v1.structured_output.backend_xgrammar",
)


def check_constrainable(value: dict[str, Any], source: str) -> None:
    """Raise SchemaError if vLLM 0.24's xgrammar backend would refuse the schema at request time.

    Runs vLLM's own request validator (``validate_xgrammar_grammar``: its list of unsupported keywords,
    then xgrammar's compiler), on CPU, without an engine, after importing what vLLM imports to validate
    a request. Without vLLM (a Ray driver that only submits work) it compiles with xgrammar alone;
    without either it returns and the engine decides.
    """
    import importlib
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        _compile_with_xgrammar(value, source)
        return
    for name in VLLM_VALIDATOR_MODULES:
        try:
            importlib.import_module(name)
        except (ImportError, OSError) as exc:
            missing = getattr(exc, "name", None)
            raise SchemaError(
                f"{source}: vLLM's structured outputs are unavailable on this host: vLLM validates every "
                f"schema request with {name}, which cannot be imported ({type(exc).__name__}: "
                f"{_first_line(str(exc))}); install vLLM's own dependencies"
                + (f" (the package that provides {missing!r})" if missing else "")
            ) from exc
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams
    from vllm.v1.structured_output.backend_xgrammar import (
        has_xgrammar_unsupported_json_features,
        validate_xgrammar_grammar,
    )

    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=canonical(value)))
    try:
        validate_xgrammar_grammar(params)
    except (ImportError, OSError) as exc:
        # vLLM loads xgrammar lazily, at the first request: a host where it cannot load would otherwise
        # refuse every request of the run, one error row each.
        raise SchemaError(
            f"{source}: vLLM's structured outputs are unavailable on this host: xgrammar cannot be loaded "
            f"({type(exc).__name__}: {_first_line(str(exc))})"
        ) from exc
    except ValueError as exc:
        # vLLM says only "features not supported"; name the deepest subschema that has one.
        where = [p for p, node in subschemas(value) if has_xgrammar_unsupported_json_features(node)]
        at = f" at {where[-1]}" if where else ""
        raise SchemaError(
            f"{source}: vLLM's structured outputs (xgrammar) cannot constrain this schema{at}: {_first_line(str(exc))}"
        ) from exc


def _compile_with_xgrammar(value: dict[str, Any], source: str) -> None:
    try:
        import xgrammar
    except ImportError:
        return
    try:
        xgrammar.Grammar.from_json_schema(canonical(value))
    except Exception as exc:
        raise SchemaError(f"{source}: xgrammar cannot compile this schema: {_first_line(str(exc))}") from exc


def flat_fields(value: Any, source: str = "") -> tuple[Field, ...]:
    """Typed fields of an object schema whose properties are all scalars or string arrays, else ()."""
    if not isinstance(value, dict) or _type_of(value) not in ("object", None):
        return ()
    props = value.get("properties")
    if not isinstance(props, dict) or not props:
        return ()
    if any(k in value for k in ("$ref", "allOf", "anyOf", "oneOf", "patternProperties")):
        return ()
    if value.get("additionalProperties") not in (None, False):
        return ()
    fields: list[Field] = []
    by_column: dict[str, str] = {}
    for name, sub in props.items():
        kind = _kind(sub)
        if kind is None:
            return ()
        column = COLUMN_PREFIX + re.sub(r"[^0-9A-Za-z_]", "_", name)
        if column in by_column:
            raise SchemaError(
                f"{source}: properties {by_column[column]!r} and {name!r} both become column {column}; rename one"
            )
        by_column[column] = name
        fields.append(Field(name, column, kind))
    return tuple(fields)


def _type_of(node: dict[str, Any]) -> str | None:
    """The one non-null JSON type of a subschema ("string" for ["string", "null"]); None if not one."""
    t = node.get("type")
    if isinstance(t, list):
        rest = [x for x in t if x != "null"]
        return rest[0] if len(rest) == 1 else None
    return t if isinstance(t, str) else None


def _kind(node: Any) -> str | None:
    if not isinstance(node, dict) or any(k in node for k in ("$ref", "allOf", "anyOf", "oneOf")):
        return None
    t = _type_of(node)
    if t is None and "type" not in node:
        values = node.get("enum", [node["const"]] if "const" in node else None)
        if values:
            kinds = {_value_kind(v) for v in values if v is not None}
            return kinds.pop() if len(kinds) == 1 else None
        return None
    if t in _KINDS:
        return _KINDS[t]
    if t == "array":
        items = node.get("items")
        return "list<string>" if isinstance(items, dict) and _kind(items) == "string" else None
    return None


def _value_kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int64"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, str):
        return "string"
    return None


def _typed(raw: Any, kind: str) -> tuple[Any, str | None]:
    """A validated JSON value as its column's type; an error for what the column cannot hold."""
    if raw is None:
        return None, None
    if kind == "int64":
        as_int = int(raw) if isinstance(raw, float) and raw.is_integer() else raw
        if not isinstance(as_int, int) or isinstance(as_int, bool):
            return None, f"{raw!r} is not an integer"
        if not INT64_MIN <= as_int <= INT64_MAX:
            return None, f"{raw} is outside the int64 range"
        return as_int, None
    if kind == "float64":
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return None, f"{raw!r} is not a number"
        return float(raw), None
    if kind == "list<string>":
        return [str(x) for x in raw], None
    return raw, None


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _first_line(text: str) -> str:
    """The first line of an error, without xgrammar's "[hh:mm:ss] /project/cpp/x.cc:123: " prefix."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return _XGRAMMAR_PREFIX.sub("", lines[0] if lines else text)


def output_check(sampling: Sampling) -> Callable[[Result], Result] | None:
    """What an executor applies to each engine Result of a schema run (None: free text)."""
    return None if sampling.json_schema is None else from_text(sampling.json_schema).apply


@lru_cache(maxsize=16)
def from_text(text: str) -> JsonSchema:
    """The JsonSchema of a canonical text already checked (e.g. ``Sampling.json_schema``), cached."""
    return JsonSchema(text)
