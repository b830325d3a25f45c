"""List files -> `InputVideo` records: .txt (one path a line), .csv, .jsonl and .parquet lists with a `path` (or
`url`) column, captions, clip bounds and any other columns; `videos.txt` with `prompts.txt` beside it
(`paired_lists`).

Malformed content is a `ConfigError` naming the file and row; a row naming a file that is not there is left to
become a failure record when it is probed."""

from __future__ import annotations

import ast
import csv
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentcache.encode.chunk_plan import InputVideo
from latentcache.encode.inputs.captions import MAX_CAPTION_BYTES, local_caption
from latentcache.encode.inputs.paired_lists import paired_rows, prompts_beside
from latentcache.errors import ConfigError, MissingDependency
from latentcache.format import strictjson
from latentcache.storage import location, sources, trust

log = logging.getLogger(__name__)


LIST_SUFFIXES = {".txt", ".csv", ".jsonl", ".parquet"}


# How deep a list row (or a cell's JSON) may nest: the inputs lines and sample JSON made from it nest it a level or
# two deeper, and are read back under strictjson.MAX_DEPTH.
MAX_ROW_DEPTH = 32


# The longest CSV cell read (the csv module's default, 131,072 characters, is below what a detailed caption or a
# span table's caption list can hold). Past it, a ConfigError naming the line.
MAX_CSV_CELL = MAX_CAPTION_BYTES


def _list_rows(list_file: Path) -> Iterator[dict[str, Any]]:
    """The list's rows, streamed: a list of millions of videos is never held whole. Lists are UTF-8 text (a
    byte-order mark is allowed); anything else is a ConfigError naming the first byte that is not UTF-8."""
    suffix = list_file.suffix.lower()
    prompts = prompts_beside(list_file)
    if prompts is not None:
        try:
            yield from paired_rows(list_file, prompts)
        except UnicodeDecodeError:
            raise ConfigError(f"{list_file} or {prompts}: not UTF-8 text") from None
        return
    if suffix == ".parquet":
        yield from _parquet_rows(list_file)
        return
    # utf-8-sig: spreadsheets save CSVs with a byte-order mark, which would otherwise become part of "path".
    # newline="": lines end only at \n, \r or \r\n, never at U+2028, NEL or form feeds inside captions.
    try:
        with open(list_file, encoding="utf-8-sig", newline="") as f:
            if suffix == ".csv":
                yield from _csv_rows(list_file, f)
                return
            for n, line in enumerate(f, 1):
                if suffix != ".jsonl":
                    if line.strip() and not line.startswith("#"):
                        yield {"path": line.strip()}
                    continue
                if not line.strip():
                    continue
                try:
                    # Non-finite numbers kept as floats here: a NaN time is refused as "not a time", a NaN in any
                    # other column becomes null (`_jsonable`).
                    row = strictjson.loads(line, keep_nonfinite=True, max_depth=MAX_ROW_DEPTH)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{list_file}: line {n} is not JSON ({e.msg}); expected one object per line "
                                      'such as {"path": "a.mp4", "caption": "..."}') from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{list_file}: line {n} is a {type(row).__name__}, expected an object with "
                                      "'path'")
                yield row
    except UnicodeDecodeError:
        raise ConfigError(_not_utf8(list_file)) from None


def _csv_rows(list_file: Path, f: Any) -> Iterator[dict[str, Any]]:
    # The csv module's own line handling: a quoted caption may hold newlines.
    if csv.field_size_limit() < MAX_CSV_CELL:
        csv.field_size_limit(MAX_CSV_CELL)  # process-wide, but only ever raised
    reader = csv.DictReader(f)
    try:
        if reader.fieldnames is None or not {"path", "url"} & set(reader.fieldnames):
            raise ConfigError(f"{list_file}: a CSV list needs a 'path' column (or 'url'; optionally "
                              "'caption', 'start'/'end' or 'timestamp'); "
                              f"found columns: {', '.join(reader.fieldnames or []) or 'none'}")
        for row in reader:
            yield {k: v if k in READ_COLUMNS else _json_cell(v) for k, v in row.items()}
    except csv.Error as e:
        why = f"a cell is longer than {MAX_CSV_CELL} characters" if "field limit" in str(e) else str(e)
        # reader.reader: DictReader copies line_num only after a row is read whole.
        raise ConfigError(f"{list_file}: line {reader.reader.line_num}: {why}; not a CSV list latentcache reads") \
            from None


def _json_cell(value: Any) -> Any:
    """A CSV cell holding a JSON list or object (Panda-70M's per-span `matching_score`, `[0.43, 0.41]`) as that
    list or object, so it can be indexed as in a JSONL or Parquet list; any other cell stays the text it is."""
    if not isinstance(value, str) or value.lstrip()[:1] not in ("[", "{"):
        return value
    try:
        return strictjson.loads(value, max_depth=MAX_ROW_DEPTH)
    except ValueError:  # not JSON after all ("[draft]"), or deeper than a row may be: kept as its text
        return value


def _not_utf8(list_file: Path) -> str:
    """The message for a list that is not UTF-8: where its first bad byte is (found again, in binary)."""
    import codecs

    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(list_file, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                offset += e.start
                line += chunk[: e.start].count(b"\n")
                break
            offset += len(chunk)
            line += chunk.count(b"\n")
    return (f"{list_file}: the byte at offset {offset} (line {line}) is not UTF-8; a list must be UTF-8 text "
            "(re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8)")


def _parquet_rows(list_file: Path) -> Iterator[dict[str, Any]]:
    """A Parquet list with a `path` column and optionally `caption`, read a record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency(f"{list_file}: Parquet lists need pyarrow: "
                                "pip install 'latentcache[parquet]'") from None
    import pyarrow as pa

    try:
        table = pq.ParquetFile(list_file)
        names = table.schema_arrow.names
        if not {"path", "url"} & set(names):
            raise ConfigError(f"{list_file}: a Parquet list needs a 'path' column (or 'url'; optionally 'caption', "
                              f"'start'/'end' or 'timestamp'); found columns: {', '.join(names) or 'none'}")
        # Every column: the ones latentcache does not read are carried into the samples' JSON.
        for batch in table.iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{list_file}: not a Parquet file latentcache can read ({e})") from None


# Columns a list row is read from; any other column is carried into the samples' JSON as "row".
SPAN_COLUMNS = ("timestamp", "spans")


READ_COLUMNS = {"path", "url", "caption", "start", "end", *SPAN_COLUMNS}


_BOUND_COLUMNS = ("start", "end", *SPAN_COLUMNS)


TIME_FORMS = ("seconds (12.5)", "H:MM:SS.mmm ('0:01:02.500')", "MM:SS.mmm")


_CLOCK = re.compile(r"(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d*)?)")


def from_list(list_file: Path) -> Iterator[InputVideo]:
    """A text file with one path per line, or a CSV/JSONL/Parquet list with a `path` (or `url`) column, an optional
    `caption`, optional clip bounds (`start`/`end`, or a list of [start, end] spans in `timestamp` or `spans`) and
    any other columns (carried into the samples' JSON).

    Relative paths are relative to the list's folder. A listed file that does not exist is not an error here: it
    becomes a failure record when it is probed, so one stale line does not stop a million-video run; so does a span
    that cannot fit (end before start, past the video's end). A cell that is not a time at all is a ConfigError
    naming the row. A row listed twice is kept once, from its first copy; a repeat with another caption is
    reported, never silently chosen.
    """
    # Captions from prompts.txt can change while videos.txt does not: flagged like .txt sidecars, so that a rerun
    # reads the lists again (`rerun_inputs`).
    paired = prompts_beside(list_file) is not None
    # Plain string operations, not Path objects: this runs once per input, millions of times.
    base = os.path.abspath(list_file.parent)
    prefix = base.rstrip(os.sep) + os.sep
    for n, row in enumerate(_list_rows(list_file), 1):
        raw = row.get("path") or row.get("url")
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(f"{list_file}: row {n} has no 'path' (found: {str(row)[:300]}); every row needs the "
                              "video's path")
        raw = raw.strip()
        if "\x00" in raw:
            # No file has such a name: refused before anything is planned, so a fixed list can be run again.
            raise ConfigError(f"{list_file}: row {n}: the path {raw[:200]!r} holds a NUL byte, which no file name "
                              "can; fix the list")
        rel = location.url_name(raw)
        if rel is not None:
            # An object store or web address: opened by `sources`, keyed by what follows the scheme.
            p = raw
        else:
            # Keys come from the path relative to the list, not through symlinks: the same list gives the same keys
            # wherever it is mounted.
            p = os.path.normpath(os.path.join(base, os.path.expanduser(raw)))
            rel = p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, base)
            rel = rel.replace(os.sep, "/").replace(trust.TAR_SEP, "/")  # a tar member: keyed like a folder's file
        where = f"{list_file.name} row {n}"
        # Rows of a plain path + caption list (the common case at millions of rows) skip the span and extra work.
        plain = READ_COLUMNS.issuperset(row) and not any(row.get(c) not in (None, "") for c in _BOUND_COLUMNS)
        spans = None if plain else _row_spans(row, where)
        caption = _row_caption(row.get("caption"), spans is not None)
        from_sidecar = False
        if caption is None:
            local = sources.local_source(p)
            caption = local_caption(local) if local is not None else None
            from_sidecar = caption is not None
        extra = None if plain else {str(k): _jsonable(v) for k, v in row.items()
                                    if k is not None and k not in READ_COLUMNS}
        if "url" in row and row.get("path"):
            extra = {**(extra or {}), "url": _jsonable(row["url"])}
        yield InputVideo(p, rel, caption, spans, extra or None, where if spans is not None else None,
                         from_sidecar or paired)


def _row_caption(value: Any, per_span: bool) -> str | tuple[str | None, ...] | None:
    """A caption cell: a string, or with spans a list of one caption per span (a list, or its JSON/Python text
    as Panda-70M's CSVs hold it)."""
    if value is None or value == "":
        return None
    if per_span and isinstance(value, str) and value.lstrip().startswith("["):
        parsed = _literal(value)
        if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
            value = parsed
    if per_span and isinstance(value, list | tuple):
        return tuple(str(c).strip() or None if c is not None else None for c in value)
    return str(value).strip() or None


def _literal(text: str) -> Any:
    """JSON, else a Python literal ("[['0:00:00.000', '0:00:05.005']]"); None when it is neither."""
    try:
        return strictjson.loads(text, keep_nonfinite=True, max_depth=MAX_ROW_DEPTH)
    except json.JSONDecodeError:
        pass
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    # A Python string literal can spell an unpaired surrogate ('\ud800'), which no UTF-8 file can then hold.
    return value if strictjson.is_utf8_text(value) else None


def _row_spans(row: dict[str, Any], where: str) -> tuple[tuple[float, float | None], ...] | None:
    """The row's clip bounds: `timestamp`/`spans` (a list of [start, end]), or `start` and/or `end`; None: none."""
    for column in SPAN_COLUMNS:
        value = row.get(column)
        if value is None or value == "":
            continue
        if isinstance(value, str):
            parsed = _literal(value)
            if parsed is None:
                raise ConfigError(f"{where}: {column} {value[:200]!r} is not a list of [start, end] spans (JSON or "
                                  "Python text such as [['0:00:00.000', '0:00:05.005'], [5.0, 9.5]])")
            value = parsed
        if isinstance(value, list | tuple) and len(value) == 2 and not any(isinstance(t, list | tuple | dict)
                                                                            for t in value):
            value = [value]  # one [start, end] pair
        if not isinstance(value, list | tuple) or not all(isinstance(s, list | tuple) and len(s) == 2
                                                           for s in value):
            raise ConfigError(f"{where}: {column} {str(value)[:200]} is not a list of [start, end] spans")
        return tuple((_seconds(s, where, column), _seconds(e, where, column, optional=True)) for s, e in value)
    start, end = row.get("start"), row.get("end")
    if start in (None, "") and end in (None, ""):
        return None
    return ((_seconds(start, where, "start", optional=True) or 0.0, _seconds(end, where, "end", optional=True)),)


def _seconds(value: Any, where: str, column: str, *, optional: bool = False) -> float | None:
    """A time cell -> seconds: a number, or text as seconds, H:MM:SS.mmm or MM:SS.mmm. ConfigError otherwise."""
    t: float | None = None
    try:
        if value is None or value == "":
            if optional:
                return None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            t = float(value)
        elif isinstance(value, str):
            text = value.strip()
            clock = _CLOCK.fullmatch(text)
            if clock:
                hours, minutes, secs = clock.groups()
                t = int(hours or 0) * 3600 + int(minutes) * 60 + float(secs)
            else:
                t = float(text)
    except (ValueError, OverflowError):  # not a number; or one past a float (10**400, 1000...0:00:00)
        t = None
    if t is not None and math.isfinite(t):
        return t
    raise ConfigError(f"{where}: {column} {repr(value)[:200]} is not a time; expected {', '.join(TIME_FORMS)}")


def _jsonable(value: Any) -> Any:
    """A cell as JSON can hold it: containers kept, anything else (dates, decimals, bytes) as its text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
