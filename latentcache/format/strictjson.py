"""JSON read from files latentcache did not write, or may not have (lists, tar sidecars, plans, manifests).

`json.loads` is not strict enough for data from strangers: it accepts `NaN`, `Infinity` and `-Infinity` (not JSON),
turns `1e999` into an infinity (which would then be written back as `Infinity`, which strict readers reject), raises
RecursionError on deep nesting and a plain ValueError on an integer of more than 4300 digits. `loads` turns every
one of those into a `json.JSONDecodeError` (so the callers' existing `except json.JSONDecodeError` reports it as
the file's problem), maps non-finite numbers to None (null) and refuses nesting deeper than MAX_DEPTH, so what it
returns can always be written again with `json.dumps(..., allow_nan=False)`.
"""

from __future__ import annotations

import json
import math
from typing import Any

# No list, manifest, plan or sidecar latentcache reads nests deeper than a few levels; this keeps every recursive
# walk over a parsed value (and json.dumps of it) far from Python's recursion limit.
MAX_DEPTH = 64


def _finite_or_none(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


# One decoder each: building a JSONDecoder per call costs more than decoding a short line.
_TO_NULL = json.JSONDecoder(parse_constant=lambda _name: None, parse_float=_finite_or_none)
_KEEP = json.JSONDecoder()


def loads(data: str | bytes | bytearray, *, keep_nonfinite: bool = False, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text; raises json.JSONDecodeError for anything that is not JSON latentcache can hold.

    NaN, +-Infinity and numbers too large for a float become None, unless `keep_nonfinite` (list rows: their time
    cells must still be refused as "not a time", and their other cells are mapped to null by the caller).
    `max_depth`: a user's list rows are held to less than MAX_DEPTH, as the files latentcache writes from them
    (inputs lines, sample JSON) nest them a level or two deeper."""
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode(json.detect_encoding(data))
        except UnicodeDecodeError as e:
            raise json.JSONDecodeError(f"not UTF-8 text (byte {e.start})", "", 0) from None
    try:
        value = (_KEEP if keep_nonfinite else _TO_NULL).decode(data)
    except json.JSONDecodeError:
        raise  # (a ValueError too: reported as it is)
    except RecursionError:
        raise json.JSONDecodeError(f"nested more than {max_depth} levels deep", "", 0) from None
    except ValueError as e:  # an integer longer than Python converts (4300 digits)
        raise json.JSONDecodeError(str(e), "", 0) from None
    # Counting brackets is C-fast; the walk runs only where there are enough of them to nest that deep.
    if data.count("[") + data.count("{") > max_depth and _too_deep(value, max_depth):
        raise json.JSONDecodeError(f"nested more than {max_depth} levels deep", "", 0)
    # "\ud800" unpaired is valid JSON but no UTF-8 text: it would fail later, when the value is written.
    if ("\\ud" in data or "\\uD" in data) and not is_utf8_text(value):
        raise json.JSONDecodeError("holds an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not text", "", 0)
    return value


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [*node, *node.values()]
    return node if isinstance(node, list) else []


def _too_deep(value: Any, max_depth: int) -> bool:
    """Whether containers nest more than `max_depth` deep (iterative: the value may be deep)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > max_depth:
                return True
            stack.extend((child, depth + 1) for child in _children(node))
    return False


def is_utf8_text(value: Any) -> bool:
    """Whether every string in the value (keys too) can be written as UTF-8 (no unpaired surrogate)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return False
        else:
            stack.extend(_children(node))
    return True


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps that can never write NaN or Infinity (ValueError instead): every file latentcache writes is JSON."""
    return json.dumps(obj, allow_nan=False, **kwargs)
