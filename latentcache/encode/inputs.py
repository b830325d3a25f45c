"""Inputs -> `InputVideo` records: files, directories, list files (.txt/.csv/.jsonl/.parquet), webdataset tars of
videos, object-store urls and glob/brace patterns of any of them.

Every reader turns malformed content into a `ConfigError` naming the file and row (or a failure record for a row
naming a file that is not there); nothing here probes a video."""

from __future__ import annotations

import ast
import csv
import glob
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from latentcache.encode.captions import MAX_CAPTION_BYTES, local_caption, object_caption
from latentcache.encode.image import IMAGE_SUFFIXES
from latentcache.encode.paired_lists import paired_rows, prompts_beside
from latentcache.encode.plan import OUTPUT_MARKER, InputVideo, input_id
from latentcache.errors import ConfigError, MissingDependency
from latentcache.format import strictjson
from latentcache.storage import sources, store

log = logging.getLogger(__name__)


LIST_SUFFIXES = {".txt", ".csv", ".jsonl", ".parquet"}


NOT_VIDEO_SUFFIXES = {".txt", ".json", ".jsonl", ".csv", ".md", ".srt", ".vtt", ".jpg", ".jpeg", ".png", ".webp",
                      ".parquet"}


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


def _from_list(list_file: Path) -> Iterator[InputVideo]:
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
        if "://" in raw:
            # An object store or web address: opened by `sources`, keyed by what follows the scheme.
            p, rel = raw, raw.split("://", 1)[1]
        else:
            # Keys come from the path relative to the list, not through symlinks: the same list gives the same keys
            # wherever it is mounted.
            p = os.path.normpath(os.path.join(base, os.path.expanduser(raw)))
            rel = p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, base)
            rel = rel.replace(os.sep, "/").replace(sources.TAR_SEP, "/")  # a tar member: keyed like a folder's file
        where = f"{list_file.name} row {n}"
        # Rows of a plain path + caption list (the common case at millions of rows) skip the span and extra work.
        plain = READ_COLUMNS.issuperset(row) and not any(row.get(c) not in (None, "") for c in _BOUND_COLUMNS)
        spans = None if plain else _row_spans(row, where)
        caption = _row_caption(row.get("caption"), spans is not None)
        from_sidecar = False
        if caption is None:
            caption = local_caption(Path(p)) if sources.is_local(p) else None
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


def _walk(root: Path, exclude: frozenset[Path] = frozenset(), images: bool = False) -> Iterator[Path]:
    """Files under `root`, sorted, without hidden files and folders (.git, .cache, editors' temporaries) and without
    latentcache output directories (holding OUTPUT_MARKER, or in `exclude`): an --out inside the input directory
    must not have its own shards discovered as new inputs on the rerun. Image files only with `images` (--images)."""
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not _is_output(here / d, exclude)]
        found.extend(here / f for f in files if not f.startswith("."))
    left_images = 0
    for f in sorted(found):
        if not f.is_file():
            continue
        if f.suffix.lower() in NOT_VIDEO_SUFFIXES and not (images and f.suffix.lower() in IMAGE_SUFFIXES):
            # Caption sidecars, lists, thumbnails: never videos. Anything else is probed, whatever its extension.
            log.debug("not a video by its extension, not probed: %s", f)
            left_images += f.suffix.lower() in IMAGE_SUFFIXES
            continue
        yield f
    if left_images:  # said, not silent: the dry run's input count would otherwise just be smaller than the folder's
        log.warning("%s: %d image file(s) not taken (pass --images to encode still images as 1-frame samples)",
                    root, left_images)


def _from_url(url: str, exclude: set[str], images: bool) -> Iterator[InputVideo]:
    """Inputs under an object-storage prefix (`s3://bucket/videos/`), or one object; keys come from the path
    relative to the prefix, as for a local directory, so the same videos give the same keys in S3 and on disk.
    Hidden names, latentcache outputs (a folder holding OUTPUT_MARKER) and non-videos are skipped as in `_walk`;
    `NAME.txt` next to a video is its caption."""
    root = url.rstrip("/")
    try:
        found = store.list_files(root)
    except FileNotFoundError:
        found = []
    except store.UnsupportedUrl as e:  # http://, a '::' chain: typed by the user, so a usage error (exit 2)
        raise ConfigError(str(e)) from None
    if found == [root]:  # one object, not a prefix
        yield InputVideo(root, root.rsplit("/", 1)[-1], None)
        return
    rels = [f[len(root) + 1:] for f in found]
    outputs = {r.rsplit("/", 1)[0] for r in rels if r.rsplit("/", 1)[-1] == OUTPUT_MARKER}
    outputs |= {e[len(root) + 1:] for e in exclude if e.startswith(root + "/")}
    names = set(rels)
    given = 0
    for rel in rels:
        parts = rel.split("/")
        suffix = os.path.splitext(rel)[1].lower()
        if any(p.startswith(".") for p in parts) or any("/".join(parts[:i]) in outputs for i in range(1, len(parts))):
            continue
        if suffix in NOT_VIDEO_SUFFIXES and not (images and suffix in IMAGE_SUFFIXES):
            continue
        caption_rel = os.path.splitext(rel)[0] + ".txt"
        caption = None
        if caption_rel in names:
            caption = object_caption(store.join(root, caption_rel))
        given += 1
        yield InputVideo(store.join(root, rel), rel, caption)
    if not given:
        raise ConfigError(f"input {url!r} holds no objects to encode (hidden files, captions, lists, images without "
                          "--images and latentcache outputs are not inputs); is the bucket and prefix right, and are "
                          "AWS credentials and AWS_ENDPOINT_URL set?")


def _is_output(folder: Path, exclude: frozenset[Path]) -> bool:
    if (folder / OUTPUT_MARKER).is_file() or folder.resolve() in exclude:
        log.info("%s is a latentcache output directory: not searched for inputs", folder)
        return True
    return False


def iter_inputs(paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = (), *,
                images: bool = False) -> Iterator[InputVideo]:
    """Files, directories (recursive), list files, webdataset tars of videos and glob/brace patterns of any of them
    (`shards/{00000..00009}.tar`) -> input videos, streamed in the order given (not deduplicated).

    `exclude`: output directories (`--out`) never searched for inputs, with any directory holding OUTPUT_MARKER.
    `images` (--images): image files in directories are inputs too (else skipped like thumbnails).
    A directory, list, tar or pattern that gives no input at all is a ConfigError naming it.
    """
    skip = frozenset(Path(e).resolve() for e in exclude if not store.is_url(e))
    for raw in paths:
        if store.is_url(raw):
            yield from _from_url(str(raw), {str(e).rstrip("/") for e in exclude if store.is_url(e)}, images)
            continue
        p = Path(raw)
        if not p.exists() and _is_pattern(str(raw)):
            root, matches = _expand(str(raw))
            found = [(m, m.relative_to(root).as_posix()) for m in matches]
        else:
            found = [(p, None)]
        given = 0
        for path, rel in found:
            for v in _inputs_at(path, rel, skip, images):
                given += 1
                yield v
        if not given:
            if p.is_dir():
                raise ConfigError(f"input directory {str(p)!r} holds no files to encode (hidden files, captions, "
                                  "lists, images without --images and latentcache output directories are not inputs)")
            if p.suffix.lower() in LIST_SUFFIXES:
                raise ConfigError(f"input list {str(p)!r} names no videos")
            raise ConfigError(f"input {str(raw)!r} gives no video to encode (a tar needs video members such as "
                              "KEY.mp4; captions, json and latents are not videos)")


def _inputs_at(p: Path, rel: str | None, skip: frozenset[Path], images: bool) -> Iterator[InputVideo]:
    """The inputs of one given (or pattern-matched) path; `rel`: its path relative to the pattern's root, which
    prefixes the relative paths of what it holds (None: given by itself)."""
    if not _is_text(str(p)):
        raise ConfigError(f"input {_shown_name(str(p))!r}: the path is not UTF-8 (bytes shown as \\xNN); keys, plans "
                          "and sample JSON are UTF-8 text: rename it")
    if p.is_dir():
        prefix = f"{rel}/" if rel else ""
        for f in _walk(p, skip, images):
            name = prefix + f.relative_to(p).as_posix()
            if not _is_text(name):
                _warn_not_utf8(str(f))
                continue
            if f.suffix.lower() == ".tar":
                yield from _tar_inputs(f, name)
            else:
                yield InputVideo(str(f.resolve()), name, local_caption(f))
    elif p.is_file() and p.suffix.lower() == ".tar":
        yield from _tar_inputs(p, rel or p.name)
    elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        yield from _from_list(p)
    elif p.is_file():
        yield InputVideo(str(p.resolve()), rel or p.name, local_caption(p))
    else:
        raise ConfigError(f"input {str(p)!r} does not exist")


def _is_text(name: str) -> bool:
    """Whether a name is UTF-8 text: the OS hands names holding other bytes over as surrogate escapes, which no
    JSON file (plan, inputs, sample JSON) can hold."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown_name(name: str) -> str:
    """A name as text, its bytes that are not UTF-8 shown as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _warn_not_utf8(path: str) -> None:
    # One file of a folder or tar: a warning, not the run (like a hidden file, it is not an input).
    log.warning("%s: the file name is not UTF-8 (bytes shown as \\xNN); not an input: rename it to encode it",
                _shown_name(path))


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[") or ("{" in text and "}" in text)


def _expand(pattern: str) -> tuple[Path, list[Path]]:
    """A brace list (`{00000..00009}`, `{a,b}`) and/or glob -> (the folder before its first wildcard, the paths).

    Every name a brace list spells must exist, and every glob must match: a missing shard is a mistake to report,
    not a smaller dataset to encode silently."""
    from braceexpand import braceexpand  # installed with webdataset

    matches: list[Path] = []
    for name in braceexpand(pattern):
        if any(c in name for c in "*?["):
            hits = sorted(glob.glob(name))
            if not hits:
                raise ConfigError(f"input pattern {pattern!r}: {name!r} matches no file")
            matches.extend(Path(h) for h in hits)
        elif Path(name).exists():
            matches.append(Path(name))
        else:
            raise ConfigError(f"input pattern {pattern!r}: {name!r} does not exist")
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if _is_pattern(part) or "{" in part:
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path("."), matches


# Tar members never taken as videos, besides NOT_VIDEO_SUFFIXES: what webdataset shards of other data hold.
NOT_VIDEO_MEMBERS = {".safetensors", ".npy", ".npz", ".pt", ".pth", ".pyd", ".pickle", ".pkl", ".cls", ".mp3",
                     ".wav", ".flac", ".m4a"}


def _tar_inputs(tar: Path, rel: str) -> Iterator[InputVideo]:
    """The videos of a webdataset tar (video2dataset's `key.mp4` + `key.txt` + `key.json`), read in place.

    Each video member is the input `TAR::member` (see `sources`), keyed by `rel/member` as if the tar were a folder.
    Its caption is `key.txt`, else the `caption` of `key.json`, whose other plain fields (url, key, status...) are
    carried as the row. Only headers and the small caption members are read here. Members that are links, devices
    or climb out of the tar are listed all the same and refused when probed: a failure record names each one.
    A member name the tar holds more than once is warned about, naming the tar and the member; its last copy is
    the one used (bytes and caption), as tar's own extraction and `sources` do.
    """
    if tar.name.lower().endswith((".tar.gz", ".tgz")):
        raise ConfigError(f"{tar}: compressed tars cannot be read in place; unpack it (gunzip) first")
    path = str(tar.resolve())
    try:
        with tarfile.open(path, mode="r:") as t:
            members, broken = [], None
            try:
                members.extend(t)
            except tarfile.TarError as e:
                broken = e
            if broken is not None:
                log.warning("%s: the tar breaks off after %d members (%s); the members before the break are inputs",
                        path, len(members), broken)
            by_name: dict[str, tarfile.TarInfo] = {}
            copies: dict[str, int] = {}
            for m in members:
                by_name[m.name] = m
                copies[m.name] = copies.get(m.name, 0) + 1
            for name, n in copies.items():
                if n > 1:
                    log.warning("%s: holds the member %r %d times; using its last copy (as tar extraction does)",
                                path, name, n)
            for m in members:
                if by_name[m.name] is not m:
                    continue  # an earlier copy of a repeated name: only the last is an input
                if m.isdir() or Path(m.name).name.startswith("."):
                    continue
                if not _is_text(m.name):
                    _warn_not_utf8(sources.tar_member_path(path, m.name))
                    continue
                suffix = Path(m.name).suffix.lower()
                if suffix in NOT_VIDEO_SUFFIXES or suffix in NOT_VIDEO_MEMBERS:
                    continue
                key = _member_key(m.name)
                caption, extra = _tar_caption(t, by_name, key, path)
                yield InputVideo(sources.tar_member_path(path, m.name), f"{rel}/{m.name}", caption, extra=extra)
    except tarfile.ReadError as e:
        raise ConfigError(f"{tar} is not a readable tar ({e}); webdataset shards of videos are plain .tar files") \
            from None


def _member_key(name: str) -> str:
    """webdataset's sample key: the name up to the first dot of its base name ('a/000031.mp4' -> 'a/000031')."""
    folder, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def _tar_caption(t: tarfile.TarFile, by_name: dict[str, tarfile.TarInfo], key: str, where: str
                 ) -> tuple[str | None, dict[str, Any] | None]:
    """(caption, the json's other plain fields) of sample `key`: from key.txt, else key.json's `caption`."""

    def read(ext: str) -> bytes | None:
        m = by_name.get(f"{key}.{ext}")
        if m is None or sources.member_problem(m) or m.size > _MAX_SIDECAR_BYTES:
            return None
        try:
            f = t.extractfile(m)
            return f.read() if f is not None else None
        except (tarfile.TarError, OSError) as e:  # cut short inside the member
            log.warning("%s: %s cannot be read (%s); not used", where, m.name, e)
            return None

    caption, extra = None, None
    text = read("txt")
    if text is not None:
        caption = text.decode("utf-8", errors="replace").strip() or None
    raw = read("json")
    if raw is not None:
        try:
            # NaN, Infinity and 1e999 become null: the sample JSON they are carried into stays JSON.
            record = strictjson.loads(raw)
        except json.JSONDecodeError as e:
            log.warning("%s: %s.json is not JSON (%s); its fields are not carried", where, key, e.msg)
            record = None
        if isinstance(record, dict):
            if caption is None and isinstance(record.get("caption"), str):
                caption = record["caption"].strip() or None
            # Plain fields only: video2dataset's json can hold whole metadata dumps (subtitles, formats), which would
            # be copied into every input line and every clip's JSON.
            extra = {k: v for k, v in record.items() if k != "caption" and (v is None or isinstance(
                v, bool | int | float | str))} or None
    return caption, extra


_MAX_SIDECAR_BYTES = 1 << 20


def duplicate_error(relpath: str, first: str, second: str) -> ConfigError:
    return ConfigError(f"two inputs share the relative path {relpath!r} ({first} and {second}); keys would collide: "
                       "pass their common parent directory instead")


def warn_duplicate(path: str, kept: str | None, dropped: str | None) -> None:
    """The same file given twice is one input, the first; a second caption for it is reported, never chosen silently."""
    if kept != dropped:
        log.warning("%s is given twice with different captions (%r, then %r); keeping the first", path, kept, dropped)


def discover_inputs(paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = (), *,
                    images: bool = False) -> list[InputVideo]:
    """Files, directories (recursive) and list files -> input videos, sorted, each with a root-relative path.

    Holds every input in memory: for millions of inputs, `chunks.InputTable` takes `iter_inputs` instead."""
    by_rel: dict[str, InputVideo] = {}
    for v in iter_inputs(paths, exclude, images=images):
        other = by_rel.setdefault(input_id(v), v)
        if other.path != v.path:
            raise duplicate_error(v.relpath, other.path, v.path)
        if other is not v:
            warn_duplicate(v.path, other.caption, v.caption)
    return sorted(by_rel.values(), key=input_id)
