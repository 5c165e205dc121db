"""Passthrough column typing: the column, Arrow type and cell value each manifest extra gets.

A run's passthrough columns (``AudioItem.extra``) are fixed before its first part: read back from
the first part, declared (``manifests.declared_columns`` gives {key: string|int64|float64|bool}), or
inferred from the first part's rows (str -> string, bool -> bool, int -> int64, ints with floats ->
float64, any other mix or value -> string, JSON for non-strings). ``RunColumns`` holds that decision
and turns a part's extras into typed cells; a value that does not fit is stored null and named in
the row's ``warnings``. Nothing here reads or writes files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

# Passthrough column types a run may declare (manifests.declared_columns gives these names).
COLUMN_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}


def value_kind(value: Any) -> str | None:
    """The column type one passthrough value asks for: string, int64, float64, bool; json for the rest."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if -(2**63) <= value < 2**63 else "json"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy scalars
        return value_kind(value.item())
    return "json"


def merge_kinds(kinds: Iterable[str | None]) -> str | None:
    """One column type for a set of value kinds: ints with floats are float64, any other mix is string."""
    found = {k for k in kinds if k is not None}
    if not found:
        return None
    if len(found) == 1 and "json" not in found:
        return found.pop()
    if found <= {"int64", "float64"}:
        return "float64"
    return "string"


def arrow_kind(typ: pa.DataType) -> str:
    """The column type an Arrow type (a Parquet manifest's column) declares."""
    if pa.types.is_boolean(typ):
        return "bool"
    if pa.types.is_integer(typ) and not (pa.types.is_uint64(typ)):
        return "int64"
    if pa.types.is_floating(typ):
        return "float64"
    return "string"


def json_default(obj: Any) -> Any:
    """``json.dumps``'s fallback for numpy arrays, dates and anything else (its ``str``)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return str(obj)


def to_json(value: Any) -> str:
    """A non-string value as the JSON text a string column stores."""
    if isinstance(value, np.generic):
        value = value.item()
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=json_default)
    except TypeError:  # dict keys of mixed types cannot be sorted
        return json.dumps(value, ensure_ascii=False, default=json_default)


def stringify(table: pa.Table, names: set[str]) -> pa.Table:
    """The columns ``names`` of ``table`` as strings (JSON text for non-strings), for runs that type them apart."""
    for name in names & set(table.column_names):
        i = table.column_names.index(name)
        values = [None if v is None else (v if isinstance(v, str) else to_json(v)) for v in table[name].to_pylist()]
        table = table.set_column(i, pa.field(name, pa.string()), pa.array(values, pa.string()))
    return table


def passthrough_names(keys: list[str], reserved: frozenset[str]) -> dict[str, str]:
    """Map manifest keys to column names; a key named like a core column becomes ``extra_<key>``."""
    mapping = {k: k for k in keys if k not in reserved}
    used = set(reserved) | set(keys)
    for k in keys:
        if k in reserved:
            name = f"extra_{k}"
            while name in used:
                name = f"extra_{name}"
            mapping[k] = name
            used.add(name)
    return mapping


def key_of(name: str, reserved: frozenset[str]) -> str:
    """The manifest key a column name most likely came from, for parts written before the mapping was
    recorded in their metadata (``extra_id`` -> ``id``; ambiguous when a manifest had both)."""
    key = name
    while key.startswith("extra_"):
        key = key[len("extra_") :]
        if key in reserved:
            return key
    return name


def infer_type(values: list[Any]) -> pa.DataType:
    """The column type the values ask for (see ``merge_kinds``); all-null is string."""
    return COLUMN_TYPES[merge_kinds(value_kind(v) for v in values) or "string"]


def fit(value: Any, typ: pa.DataType) -> tuple[Any, bool]:
    """``value`` as a cell of a ``typ`` column, and whether it fits (False: stored null, warned)."""
    if value is None:
        return None, True
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None, True
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return (value if isinstance(value, str) else to_json(value)), True
    kind = value_kind(value)
    if pa.types.is_boolean(typ):
        return (bool(value), True) if kind == "bool" else (None, False)
    if pa.types.is_integer(typ):
        return (int(value), True) if kind == "int64" else (None, False)
    if pa.types.is_floating(typ):
        return (float(value), True) if kind in ("int64", "float64") else (None, False)
    try:  # a type only a legacy first part has (timestamp, ...): whatever Arrow converts
        pa.array([value], type=typ)
    except (pa.ArrowException, TypeError, ValueError):
        return None, False
    return value, True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RunColumns:
    """One run's passthrough columns: manifest key -> (column name, Arrow type); ``fields`` is None
    until decided (``from_part``, ``declare`` or, at the first part, ``cells``).

    ``reserved`` are the names a passthrough column may not take (the core columns, ``run`` and the
    run's own extra columns); ``own`` are the run's own extra columns, skipped when reading a part back.
    """

    def __init__(self, reserved: frozenset[str], own: frozenset[str] = frozenset()) -> None:
        self.reserved = reserved
        self.own = own
        self.fields: dict[str, tuple[str, pa.DataType]] | None = None

    def from_part(self, schema: pa.Schema, core: Sequence[str], recorded: Any) -> None:
        """Take the columns of a run's first part (``recorded``: its {column: manifest key} metadata)."""
        keys = {name: str(key) for name, key in recorded.items()} if isinstance(recorded, dict) else {}
        self.fields = {
            keys.get(f.name) or key_of(f.name, self.reserved - self.own): (f.name, f.type)
            for f in schema
            if f.name not in core and f.name not in self.own
        }

    def declare(self, declared: Mapping[str, str]) -> None:
        """Take declared columns {manifest key: string|int64|float64|bool}."""
        names = passthrough_names(list(declared), self.reserved)
        self.fields = {k: (names[k], COLUMN_TYPES[t]) for k, t in declared.items()}

    def mapping(self) -> dict[str, str] | None:
        """{column name: manifest key}, for the parts' metadata (a resume reads it back); None until decided."""
        if self.fields is None:
            return None
        return {name: key for key, (name, _) in self.fields.items()}

    def types(self) -> dict[str, str] | None:
        """{column name: Arrow type name}; None until decided."""
        if self.fields is None:
            return None
        return {name: str(typ) for name, typ in self.fields.values()}

    def cells(self, extras: list[dict[str, Any]]) -> tuple[list[pa.Field], list[pa.Array], list[list[str]]]:
        """One part's passthrough fields, their arrays and each row's warnings (deciding the columns if
        still open, from these rows)."""
        if self.fields is None:
            keys: dict[str, None] = {}
            for extra in extras:
                keys.update(dict.fromkeys(extra))
            names = passthrough_names(list(keys), self.reserved)
            self.fields = {k: (names[k], infer_type([e.get(k) for e in extras])) for k in keys}
        fields = self.fields
        warnings: list[list[str]] = [[] for _ in extras]
        columns: dict[str, list[Any]] = {k: [] for k in fields}
        for row_warnings, extra in zip(warnings, extras, strict=True):
            for k, (_, typ) in fields.items():
                value, ok = fit(extra.get(k), typ)
                if not ok:
                    row_warnings.append(f"{k}: {_short(extra[k])} is not {typ}; stored null")
                columns[k].append(value)
            for k in extra:
                if k not in fields and extra[k] is not None:
                    row_warnings.append(f"{k}: not a column of this run (fixed by its first part); dropped")
        schema = [pa.field(name, typ) for name, typ in fields.values()]
        arrays = [pa.array(columns[k], type=typ) for k, (_, typ) in fields.items()]
        return schema, arrays, warnings
