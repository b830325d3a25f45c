"""Inputs -> `InputVideo` records: files, directories, list files (.txt/.csv/.jsonl/.parquet), webdataset tars of
videos, object-store urls and glob/brace patterns of any of them.

`iter_inputs` dispatches each given path to the reader of its kind: `folders`, `lists` (with `paired_lists`),
`tars`, `urls`, `patterns`; `captions` reads the `.txt` sidecars they share, `musubi_config` a musubi-tuner dataset
TOML as inputs and clip settings. Every reader turns malformed content into a `ConfigError` naming the file and row
(or a failure record for a row naming a file that is not there); nothing here probes a video."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from latentcache.encode.chunk_plan import InputVideo, input_id
from latentcache.encode.inputs import lists
from latentcache.encode.inputs.captions import local_caption
from latentcache.encode.inputs.folders import folder_inputs
from latentcache.encode.inputs.lists import LIST_SUFFIXES
from latentcache.encode.inputs.names import is_text, shown_name
from latentcache.encode.inputs.patterns import expand, is_pattern
from latentcache.encode.inputs.tars import tar_inputs
from latentcache.encode.inputs.urls import from_url
from latentcache.errors import ConfigError
from latentcache.storage import location

log = logging.getLogger(__name__)


def iter_inputs(paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = (), *,
                images: bool = False) -> Iterator[InputVideo]:
    """Files, directories (recursive), list files, webdataset tars of videos and glob/brace patterns of any of them
    (`shards/{00000..00009}.tar`) -> input videos, streamed in the order given (not deduplicated).

    `exclude`: output directories (`--out`) never searched for inputs, with any directory holding OUTPUT_MARKER.
    `images` (--images): image files in directories are inputs too (else skipped like thumbnails).
    A directory, list, tar or pattern that gives no input at all is a ConfigError naming it.
    """
    skip = frozenset(local.resolve() for e in exclude if (local := location.local(e)) is not None)
    for raw in paths:
        p = location.local(raw)  # a file url the user typed names its path
        if p is None:
            excluded = {str(e).rstrip("/") for e in exclude if location.local(e) is None}
            yield from from_url(str(raw), excluded, images)
            continue
        if not p.exists() and is_pattern(text := location.typed(str(raw))):
            root, matches = expand(text)
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
    if not is_text(str(p)):
        raise ConfigError(f"input {shown_name(str(p))!r}: the path is not UTF-8 (bytes shown as \\xNN); keys, plans "
                          "and sample JSON are UTF-8 text: rename it")
    if p.is_dir():
        yield from folder_inputs(p, rel, skip, images)
    elif p.is_file() and p.suffix.lower() == ".tar":
        yield from tar_inputs(p, rel or p.name)
    elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        yield from lists.from_list(p)
    elif p.is_file():
        yield InputVideo(str(p.resolve()), rel or p.name, local_caption(p))
    else:
        raise ConfigError(f"input {str(p)!r} does not exist")


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

    Holds every input in memory: for millions of inputs, `job_plan.InputTable` takes `iter_inputs` instead."""
    by_rel: dict[str, InputVideo] = {}
    for v in iter_inputs(paths, exclude, images=images):
        other = by_rel.setdefault(input_id(v), v)
        if other.path != v.path:
            raise duplicate_error(v.relpath, other.path, v.path)
        if other is not v:
            warn_duplicate(v.path, other.caption, v.caption)
    return sorted(by_rel.values(), key=input_id)
