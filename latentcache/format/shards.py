"""Stage 3: encoded clips -> webdataset tar shards, a sidecar per shard, and the manifest written last.

Completion is a file: a shard is written under a temporary name, renamed into place, and only then is its sidecar
(`<shard>.tar.json`: samples, bytes, sha256) written. A shard without a sidecar is unfinished and is redone. Tars
are byte-reproducible (fixed member order, mtime 0, no owner), so whoever writes shard i writes the same bytes.

Nothing is pickled: latents are safetensors, metadata is JSON, captions are UTF-8 text. `decode_sample` is the
only way latentcache reads a sample, and it decodes exactly those members.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from latentcache.format import strictjson
from latentcache.format.layout import IMAGE_TENSORS, LATENTS, TEXT_EMBEDS
from latentcache.format.out_layout import (
    CARRY_FILE,
    CHUNK_FOLDER,
    CHUNK_PLAN_FILE,
    CHUNKS_DIR,
    INPUT_LISTS_FILE,
    INPUTS_DIR,
    INPUTS_FILE,
    KEYS_FILE,
    ROOT_FILE,
    SHARD_FILE,
    SHARDS_DIR,
    SHARE_COMPLETE_FILE,
    SHARE_MARKERS_DIR,
    SHARE_PLAN_FOLDER,
    SHARE_RANK_MARKER,
    SHARE_WORLD_FOLDER,
    TMP_SUFFIX,
    any_of,
    sidecar_of,
    sidecar_pattern,
    temporaries,
    temporary_of,
)
from latentcache.format.text import text_member
from latentcache.storage import location

log = logging.getLogger(__name__)

@dataclass(slots=True)
class EncodedClip:
    """What the encode stage hands the writer: the raw posterior of one clip and its metadata."""

    key: str
    mean: torch.Tensor  # [C, T, H, W]
    logvar: torch.Tensor
    meta: dict[str, Any]
    caption: str | None = None
    text: dict[str, torch.Tensor] | None = None
    # --image-latents: the first frame's raw posterior as the family's I2V pipeline encodes it (`VideoVAE.
    # encode_image_condition`): [C, 1, H, W] for CogVideoX, [C, T, H, W] for Wan (no log-variance: it uses the mode).
    image_mean: torch.Tensor | None = None
    image_logvar: torch.Tensor | None = None
    # Text tensors stored only at their mask's positions (name -> mask name; format/text.py).
    text_trimmed: dict[str, str] | None = None



@dataclass(slots=True, frozen=True)
class CarriedSample:
    """A sample taken over byte for byte from a shard written earlier (`--reencode-changed` keeps the samples of
    unchanged inputs whose shard is rewritten): its members as they were, in their order."""

    key: str
    members: tuple[tuple[str, bytes], ...]


def sample_members(clip: EncodedClip | CarriedSample) -> list[tuple[str, bytes]]:
    if isinstance(clip, CarriedSample):
        return list(clip.members)
    tensors = {"mean": clip.mean.contiguous()}
    if clip.logvar is not None:
        tensors["logvar"] = clip.logvar.contiguous()
    for name in IMAGE_TENSORS:
        if getattr(clip, name) is not None:
            tensors[name] = getattr(clip, name).contiguous()
    members = [
        (f"{clip.key}.json", json.dumps(clip.meta, sort_keys=True, ensure_ascii=False, allow_nan=False).encode()),
        (f"{clip.key}.{LATENTS}", save_safetensors(tensors)),
    ]
    if clip.caption is not None:
        members.append((f"{clip.key}.txt", clip.caption.encode("utf-8")))
    if clip.text is not None:
        members.append((f"{clip.key}.{TEXT_EMBEDS}", text_member(clip.text, clip.text_trimmed)))
    return members


# Observers of shard writing, called with (event, path): ("member", shard) after each tar member, ("sidecar",
# sidecar) just before a sidecar is written and ("sidecar-written", sidecar) just after. Empty by default; a tool
# that watches or paces writing appends to it (the kill-mid-write tests slow writing down with it).
WRITE_HOOKS: list[Callable[[str, Path], None]] = []


def _notify(event: str, path: Path) -> None:
    for hook in WRITE_HOOKS:
        hook(event, path)
    pause_point(event)


# TEST-ONLY. LATENTCACHE_TEST_PAUSE_AT=<point>[#<n>]:<dir> makes a process, the n-th time (default 1) it reaches
# `point` (a WRITE_HOOKS event: member, sidecar, sidecar-written; or "planned": plan.json just written), create
# <dir>/<point>.<pid>.reached and then wait until <dir>/release exists. The kill tests never write "release": they
# wait for "reached" and kill -9 a writer frozen in exactly that state, however loaded the machine (polling for a
# state and then killing lets the moment pass first). Unset, the cost is one environment lookup per event.
PAUSE_ENV = "LATENTCACHE_TEST_PAUSE_AT"
_paused_at: dict[str, int] = {}


def pause_point(point: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    wanted, _, folder = spec.partition(":")
    name, _, nth = wanted.partition("#")
    if name != point:
        return
    _paused_at[point] = _paused_at.get(point, 0) + 1
    if _paused_at[point] != int(nth or 1):
        return
    (Path(folder) / f"{point}.{os.getpid()}.reached").touch()
    while not (Path(folder) / "release").exists():
        time.sleep(0.05)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


# The files latentcache writes through a temporary, by the folder of OUT they are written in (format/out_layout.py
# names each). Only temporaries of these names, in these folders, are ever swept: any other file, even
# `OUT/shards/<bucket>/notes.tmp`, is a user's.
_ROOT_FILES = temporaries(ROOT_FILE)
_INPUTS_FILES = temporaries(any_of(INPUTS_FILE, KEYS_FILE, INPUT_LISTS_FILE))
_CHUNK_FILES = temporaries(any_of(CHUNK_PLAN_FILE, CARRY_FILE, sidecar_pattern(CARRY_FILE)))
_SHARD_FILES = temporaries(any_of(SHARD_FILE, sidecar_pattern(SHARD_FILE)))
_COMPLETE_FILES = temporaries(SHARE_COMPLETE_FILE)
_RANK_FILES = temporaries(SHARE_RANK_MARKER)


def _own_temporaries(root: Path) -> Iterator[tuple[Path, re.Match[str]]]:
    """Each temporary under OUT=`root` whose name latentcache builds, in a folder latentcache writes it in."""
    from latentcache.format.checks import parse_bucket

    def entries(folder: Path) -> list[Path]:
        # Another task finalizing at the same time removes the marker folders it empties.
        try:
            return sorted(folder.iterdir()) if folder.is_dir() else []
        except FileNotFoundError:
            return []

    def listed(folder: Path, names: re.Pattern[str]) -> Iterator[tuple[Path, re.Match[str]]]:
        for entry in entries(folder):
            match = names.fullmatch(entry.name)
            if match and entry.is_file() and not entry.is_symlink():  # latentcache makes no links: one is a user's
                yield entry, match

    def subfolders(folder: Path, ok: Callable[[str], bool]) -> list[Path]:
        return [d for d in entries(folder) if ok(d.name) and d.is_dir()]

    yield from listed(root, _ROOT_FILES)
    yield from listed(root / INPUTS_DIR, _INPUTS_FILES)
    for folder in subfolders(root / CHUNKS_DIR, CHUNK_FOLDER.fullmatch):
        yield from listed(folder, _CHUNK_FILES)
    for folder in subfolders(root / SHARDS_DIR, lambda name: parse_bucket(name) is not None):
        yield from listed(folder, _SHARD_FILES)
    for folder in subfolders(root / SHARE_MARKERS_DIR, SHARE_PLAN_FOLDER.fullmatch):
        yield from listed(folder, _COMPLETE_FILES)
        for world in subfolders(folder, SHARE_WORLD_FOLDER.fullmatch):
            yield from listed(world, _RANK_FILES)


def write_shard(path: Path, clips: list[EncodedClip | CarriedSample], *,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the whole shard atomically, then its sidecar. Returns the sidecar record.

    In object storage (`path` a location.ObjectPath) the tar is built in memory and PUT once: no rename exists there
    and none is needed, a PUT is atomic (see `location.atomic_writer`). The sidecar is PUT after it, so "done" means
    the same thing as on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with location.atomic_writer(path, temporary_of) as raw:

        class _Hashing(io.RawIOBase):
            def writable(self) -> bool:
                return True

            def write(self, b: bytes) -> int:
                digest.update(b)
                return raw.write(b)

        with tarfile.open(fileobj=_Hashing(), mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for clip in clips:
                for name, data in sample_members(clip):
                    _add(tar, name, data)
                    _notify("member", path)
    # Only the rename makes the tar visible, and only the sidecar makes it count: a kill between the two leaves a
    # complete tar without a sidecar, which `read_done` treats as unfinished and the next run rewrites (same bytes).
    record = {
        "path": path.name,
        "samples": len(clips),
        "keys": [c.key for c in clips],
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
        **(extra or {}),
    }
    _notify("sidecar", sidecar_of(path))
    write_json_atomic(sidecar_of(path), record)
    _notify("sidecar-written", sidecar_of(path))
    return record


def write_json_atomic(path: Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, no timestamps), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False))


def write_text_atomic(path: Path, text: str) -> None:
    """Write under this process's temporary name, fsync, rename: readers see the old file or the new, never half.
    In object storage, one PUT, which gives the same guarantee."""
    with location.atomic_writer(path, temporary_of) as f:
        f.write(text.encode("utf-8"))


def read_done(path: Path) -> dict[str, Any] | None:
    """The sidecar of a finished shard, or None when the shard must be (re)done."""
    side = sidecar_of(path)
    if not (path.is_file() and side.is_file()):
        return None
    try:
        record = strictjson.loads(side.read_bytes())
    except (json.JSONDecodeError, OSError):
        return None
    return record if isinstance(record, dict) and record.get("bytes") == path.stat().st_size else None


def remove_temporaries(shard: Path) -> list[Path]:
    """Leftovers of killed writers of this shard and its sidecar; returns what was removed.

    Only the shard's owner calls this, right before writing it, so in a normal run no live writer is hurt. (Two
    overlapping runs into one directory could remove each other's file; the loser's rename then fails loudly.)
    """
    if not location.renames_into_place(shard):
        return []  # writes there are single PUTs: no temporary is ever left behind
    # The tar's temporaries and its sidecar's (`000017.tar.json.<host>.<pid>.tmp`), and no other name: a user's
    # `000017.tar.notes.tmp` is not one of ours.
    exact = re.compile(re.escape(shard.name))
    ours = temporaries(any_of(exact, sidecar_pattern(exact)))
    removed = [p for p in sorted(shard.parent.glob(f"{shard.name}.*{TMP_SUFFIX}"))
               if ours.fullmatch(p.name) and not p.is_symlink()]
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    if removed:
        log.info("removed %d stale temporary file(s) of %s", len(removed), shard)
    return removed


def remove_stale_temporaries(root: Path, *, max_age_s: float = 3600.0) -> list[Path]:
    """latentcache's own temporaries in the output `root` whose writer is gone: a dead process on this host, or older
    than an hour (a writer on another host cannot be asked). Run once no live writer should remain, e.g. when
    finalizing. Only names `_tmp_name` builds for files latentcache writes, in the folders it writes them in, are
    candidates (see `_own_temporaries`): a user's `OUT/my_notes/draft.tmp` stays, however old."""
    if not location.renames_into_place(root):
        return []  # writes there are single PUTs: no temporary is ever left behind
    host = socket.gethostname()
    removed = []
    for tmp, match in _own_temporaries(root):
        # The host is matched from the end: `000017.tar.json.<host>.<pid>.tmp` may split either way, not this.
        pid = match["pid"]
        local = tmp.name.endswith(f".{host}.{pid}{TMP_SUFFIX}")
        try:
            age = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        if (local and not process_alive(int(pid))) or age > max_age_s:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d stale temporary file(s) under %s, e.g. %s", len(removed), root, removed[0])
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
