"""What an input was when its chunk was probed (size, mtime, a content digest; a tar member's or an object's own
equivalents), and whether it has changed since: a rerun stats each input of its own share once and reads bytes only
where size or mtime differ, so a file only touched stays done and a replaced one is refused by name."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentcache.errors import ConfigError
from latentcache.storage import location, sources, trust

# What an input was when its chunk was probed, as the chunk plan records it (None: it could not be read then):
#   a local file   {"size", "mtime_ns", "sha256"}, plus "target" (the file it names) where the path is a link
#   a tar member   {"tar_size", "tar_mtime_ns"} of the tar, {"size", "sha256"} of the member's bytes
#   an object      {"size", "etag"} (or "modified" where the store gives no ETag): one HEAD, never a download
# A rerun compares the cheap fields first (one stat, one HEAD) and reads bytes only where they differ, so a file only
# touched (same bytes, new mtime) stays done while the whole dataset is never read again.
Stat = dict[str, Any] | None

# How many changed inputs a refusal names before it counts the rest.
NAMED_CHANGES = 10


_HASH_BLOCK = 1 << 20


def quick_stat(path: str) -> Stat | None:
    """The fields that are cheap to get: one stat (of the file, or of a member's tar), or one HEAD of an object.
    None: it is gone or is not a regular file now (devices, fifos and folders are never read here)."""
    try:
        split = trust.split_tar_path(path)
        found = sources.object_stat(path)  # one HEAD for an object; None for a local file or a tar member
        if found is not None:
            return found
        local = split[0] if split else path
        st = os.lstat(local)
        # A link (git-annex, DVC, a farm of links) is the file it names now: its target is part of what it is, so a
        # link repointed at a file of the same size and mtime is read, not taken as unchanged.
        link = {"target": os.path.realpath(local)} if stat.S_ISLNK(st.st_mode) else {}
        st = os.stat(local) if link else st
        if not stat.S_ISREG(st.st_mode):
            return None
        if split:
            return {"tar_size": st.st_size, "tar_mtime_ns": st.st_mtime_ns, **link}
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **link}
    except (OSError, ValueError, KeyError):
        return None


def _content(path: str, quick: dict[str, Any]) -> Stat:
    """`quick` plus what the bytes are: the sha256 of the file (or tar member). None: cannot be read."""
    if "etag" in quick or "modified" in quick:
        return quick  # an object: its ETag is the store's digest of its bytes
    try:
        if "tar_size" in quick:
            size = sources.source_size(path)
            with sources.open_source(path) as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            return {**quick, "size": size, "sha256": digest}
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        return {**quick, "sha256": digest}
    except (OSError, ValueError):
        return None


def input_stat(path: str) -> Stat:
    """What the input at `path` is now, as a chunk plan records it (see `Stat`); reads its bytes once."""
    quick = quick_stat(path)
    return None if quick is None else _content(path, quick)


def input_stats(paths: list[str], workers: int = 8) -> list[Stat]:
    """`input_stat` of each path, in order (in threads: hashing and stat calls release the GIL). A path given
    twice in a chunk (rows with spans of one video) is read once."""
    distinct = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = dict(zip(distinct, pool.map(input_stat, distinct), strict=True))
    return [found[p] for p in paths]


@dataclass(slots=True, frozen=True)
class Change:
    path: str
    how: str  # "size 1200 -> 1500", "new content, same size", "unreadable when planned, readable now"


def compare_stat(path: str, old: Stat) -> tuple[Change | None, Stat]:
    """(how the input changed or None, the stat to record now). Reads its bytes only when the cheap fields differ
    and the size does not already tell. An input gone now is not a change: its latents are of the bytes it had."""
    quick = quick_stat(path)
    if quick is None:
        return None, old
    if old is None:
        return Change(path, "unreadable when planned, readable now"), None
    if all(old.get(k) == v for k, v in quick.items()) and old.get("target") == quick.get("target"):
        return None, old
    if "size" in quick and "size" in old and quick["size"] != old["size"]:
        return Change(path, f"size {old['size']} -> {quick['size']} bytes"), None
    if "etag" in quick or "modified" in quick:
        return Change(path, "the object was replaced (its ETag or modification time differs)"), None
    now = _content(path, quick)
    if now is None:
        return None, old  # gone between the stat and the read
    if now.get("size") != old.get("size") or now.get("sha256") != old.get("sha256"):
        return Change(path, f"new content ({old.get('size')} -> {now.get('size')} bytes, sha256 differs)"), None
    return None, now  # touched only: same bytes; the new stat is recorded so the next run does not read it again


def compare_all(items: list[tuple[str, Stat]], workers: int) -> list[tuple[Change | None, Stat]]:
    """`compare_stat` of each item. A local, cached stat costs microseconds, and threads contending for the GIL
    make it slower; a stat on a network filesystem costs a round trip, which threads overlap. So the first items
    are timed one by one and the rest go to threads (in slices, not a task each) only when a stat is slow."""
    probe = [compare_stat(p, s) for p, s in items[:_TIMED]]
    started = time.perf_counter()
    probe += [compare_stat(p, s) for p, s in items[_TIMED : 2 * _TIMED]]
    rest = items[len(probe):]
    slow = len(probe) > _TIMED and (time.perf_counter() - started) / (len(probe) - _TIMED) > _SLOW_STAT
    if not slow or len(rest) < 2 * workers:
        return probe + [compare_stat(p, s) for p, s in rest]
    size = -(-len(rest) // workers)
    slices = [rest[i : i + size] for i in range(0, len(rest), size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return probe + [r for part in pool.map(lambda part: [compare_stat(p, s) for p, s in part], slices)
                        for r in part]


# The first _TIMED inputs warm up, the next _TIMED are timed; a check slower than _SLOW_STAT seconds an input
# (a network filesystem's round trip, not a cached local stat) runs the rest in threads.
_TIMED = 128


_SLOW_STAT = 50e-6


def changed_error(out: Path, changes: list[Change], chunks: int) -> ConfigError:
    named = "; ".join(f"{c.path} ({c.how})" for c in changes[:NAMED_CHANGES])
    more = f"; and {len(changes) - NAMED_CHANGES} more" if len(changes) > NAMED_CHANGES else ""
    return ConfigError(
        f"{out}: {len(changes)} input(s) changed since they were encoded, so their shards hold latents of bytes "
        f"that are gone: {named}{more}. Run the same command with --reencode-changed to plan and encode again just "
        f"the {chunks} chunk(s) that hold them (every other shard stays as it is), or put the old files back, or "
        "use a new --out directory.")


# --------------------------------------------------------------------------------------- the input lists themselves

# A list file's identity: its size, mtime and the sha256 of sampled blocks (the first and last MiB and 16 blocks of
# 64 KiB spread between them): checked in milliseconds at any size, where a whole-file digest would cost what the
# re-read it saves (~107 s at 10M inputs is mostly parsing, but hashing 1.5 GB is still seconds on every task).
# What slips through: an edit that keeps the size, has its mtime set back (touch -d, rsync -t of another file of
# the same size) and changes no sampled byte. Any other edit, a replaced file or a list given under another path
# plans new inputs exactly as before.
_EDGE, _BLOCK, _BLOCKS = 1 << 20, 1 << 16, 16


def _sampled_sha256(path: str, size: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 2 * _EDGE + _BLOCKS * _BLOCK:
            return hashlib.file_digest(f, "sha256").hexdigest()  # small: the whole file costs no more
        starts = [0, size - _EDGE] + [_EDGE + i * (size - 2 * _EDGE - _BLOCK) // (_BLOCKS - 1)
                                      for i in range(_BLOCKS)]
        for start in sorted(starts):
            f.seek(start)
            digest.update(f.read(_EDGE if start in (0, size - _EDGE) else _BLOCK))
    return digest.hexdigest()


def list_identity(inputs: list[str]) -> list[dict[str, Any]] | None:
    """What the given input lists are now (their absolute path, size, mtime and sampled digest), taken before they
    are read; None when any given input is not a local list file. A folder, pattern, tar, object prefix or video has
    no identity this cheap (a folder's content is a walk of it), so those are listed again on every run, as before."""
    from latentcache.encode.inputs import LIST_SUFFIXES

    found = []
    for raw in inputs:
        local = location.local(str(raw))  # a file url names its path
        if local is None or local.suffix.lower() not in LIST_SUFFIXES:
            return None
        path = os.path.abspath(local)  # relative rows resolve against the list's folder: the same path, the same rows
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                return None
            found.append({"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                          "sampled_sha256": _sampled_sha256(path, st.st_size)})
        except OSError:
            return None  # reading it reports why, naming it
    return found
