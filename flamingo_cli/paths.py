"""Paths are data: any byte string a filesystem allows flows through flamingo and out, losslessly.

Python keeps the bytes of a file name that are not UTF-8 as surrogateescape code points (os.fsdecode);
open() takes them, UTF-8 writers (Parquet, JSON, terminals) refuse them. Internally flamingo keeps that
str (``AudioItem.path``); what it writes or prints goes through ``escape_path``, and the sink stores the
raw bytes in the ``path_bytes`` column. No heavy imports: env.py prints through it.
"""

from __future__ import annotations

import os
import re

# A file name is bytes; Python keeps the ones that are not UTF-8 as surrogateescape code points
# (os.fsdecode), which open() accepts but UTF-8 writers (Parquet, JSON, terminals) refuse.
_NEEDS_ESCAPE = re.compile("[\ud800-\udfff]")


def escape_path(text: str) -> str:
    """A valid-UTF-8 form of a path or id; unchanged unless it holds bytes that are not UTF-8.

    Then each such byte becomes ``\\xHH`` (lower-case hex) and each backslash ``\\\\``, so the escape is
    unambiguous: ``caf\\xe9.wav`` is the Latin-1 name ``caf<0xE9>.wav``. Other characters, newlines
    and leading dashes included, are valid UTF-8 and stay as they are. The sink keeps the raw bytes in
    ``path_bytes`` exactly when the path was escaped.
    """
    if not _NEEDS_ESCAPE.search(text):
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:  # a lone surrogate from elsewhere (surrogatepass)
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def path_bytes(path: str) -> bytes | None:
    """The raw file-name bytes when escape_path changes the path (None when it is kept as is)."""
    if not _NEEDS_ESCAPE.search(path):
        return None
    return os.fsencode(path)
