"""Webdataset tars of videos -> `InputVideo` records: each video member read in place (`TAR::member`), its caption
from the sample's `.txt` or `.json` member."""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentcache.encode.chunk_plan import InputVideo
from latentcache.encode.inputs.names import NOT_VIDEO_SUFFIXES, is_text, warn_not_utf8
from latentcache.errors import ConfigError
from latentcache.format import strictjson
from latentcache.storage import sources, trust

log = logging.getLogger(__name__)


# Tar members never taken as videos, besides NOT_VIDEO_SUFFIXES: what webdataset shards of other data hold.
NOT_VIDEO_MEMBERS = {".safetensors", ".npy", ".npz", ".pt", ".pth", ".pyd", ".pickle", ".pkl", ".cls", ".mp3",
                     ".wav", ".flac", ".m4a"}


def tar_inputs(tar: Path, rel: str) -> Iterator[InputVideo]:
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
                if not is_text(m.name):
                    warn_not_utf8(sources.tar_member_path(path, m.name))
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
        if m is None or trust.member_problem(m) or m.size > _MAX_SIDECAR_BYTES:
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
