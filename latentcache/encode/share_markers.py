"""What is done, on disk: a shard is done when its sidecar is (`pending_shards`); a rank's share is done when it has
left its marker, `OUT/chunks/done/<plan digest>/w<world size>/r<rank>`; a job is done, once finalized, when its plan's
`complete` marker is there. The markers are hints that let a task that is not the last stop after a stat or two;
`pipeline.pending_in_job` remains the truth (docs/distributed.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from latentcache.encode.chunks import JobPlan
from latentcache.encode.plan import PlannedShard
from latentcache.format.shards import (
    SHARE_COMPLETE,
    SHARE_PLAN_FOLDER,
    SHARE_RANK_MARKER,
    SHARE_WORLD_FOLDER,
    read_done,
    write_text_atomic,
)
from latentcache.storage import store


def pending_shards(out: Path, shards: list[PlannedShard]) -> list[PlannedShard]:
    """Those of `shards` without a valid sidecar."""
    return [s for s in shards if read_done(out / s.relpath) is None]


def damaged_shards(out: Path, shards: Iterable[PlannedShard]) -> list[PlannedShard]:
    """Those of `shards` that are done but whose tar no longer hashes to its sidecar's sha256 (a flipped byte, a
    shard replaced by hand): what `encode --repair` writes again. It reads every done shard whole, so only --repair
    calls it: an ordinary rerun trusts a sidecar whose size matches (`read_done`), a stat per shard."""
    damaged = []
    for shard in shards:
        path = out / shard.relpath
        record = read_done(path)
        if record is None:
            continue  # not done: any run writes it
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != record.get("sha256"):
            damaged.append(shard)
    return damaged


def _share_markers(out: Path, plan: JobPlan, world_size: int) -> Path:
    # Named by a digest of plan.json: an append (a new part) makes every earlier marker stale at once.
    digest = hashlib.sha256(plan.to_json().encode()).hexdigest()[:16]
    return out / f"chunks/done/{digest}/w{world_size:06d}"


def _share_marker(folder: Path, rank: int) -> Path:
    return folder / f"r{rank:06d}"


def mark_share_done(out: Path, plan: JobPlan, rank: int, world_size: int, shards: list[PlannedShard]) -> bool:
    """After a rank's run: if none of its `shards` is pending (a stat of each sidecar: its share only), leave a
    marker saying so. Returns whether it did."""
    if pending_shards(out, shards):
        return False
    marker = _share_marker(_share_markers(out, plan, world_size), rank)
    if not marker.is_file():
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, "")
    return True


def first_share_pending(out: Path, plan: JobPlan, world_size: int) -> int | None:
    """The first rank of `world_size` without a done marker, or None when every one has one. It stops at the
    first missing marker, so a task that is not the last one to finish pays about one stat, not a read of every
    chunk plan. A marker is a hint, never the truth: None is followed by `pending_in_job`, which checks it all (a
    marker left from before shards were removed by hand costs that check, nothing worse)."""
    folder = _share_markers(out, plan, world_size)
    if (folder.parent / SHARE_COMPLETE).is_file():
        return None
    for rank in range(world_size):
        if not _share_marker(folder, rank).is_file():
            return rank
    return None


def clear_share_markers(out: Path, plan: JobPlan) -> None:
    """Once the manifest is written, the per-rank markers have served; one `complete` marker of this plan takes
    their place, so a finished directory holds the same files whatever number of processes wrote it, and a rerun
    of any task of a finished job checks everything and finalizes again, as before.

    Array tasks that finish together all finalize, at once: each writes `complete` first and then removes only
    the markers themselves (every plan's rank markers, an earlier plan's `complete`) and the folders they leave
    empty. Removing the whole folder took another task's `complete`, or the temporary it was renaming into place
    (a FileNotFoundError that failed that task)."""
    complete = _share_markers(out, plan, 1).parent / SHARE_COMPLETE
    complete.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(complete, "")
    done = out / "chunks" / "done"
    try:
        found = [p for p in done.rglob("*") if p != complete and _is_share_marker(p)]
    except FileNotFoundError:  # a folder another task emptied and removed while this one walked it
        found = []
    for marker in found:
        marker.unlink(missing_ok=True)
    if not store.in_object_store(done):
        # Deepest first: the world-size folders, then an earlier plan's folder. One still in use stays.
        for folder in sorted({m.parent for m in found} | {m.parent.parent for m in found}, key=lambda f: -len(f.parts)):
            if folder != complete.parent and folder != done:
                with suppress(OSError):
                    folder.rmdir()


def _is_share_marker(path: Path) -> bool:
    """A rank marker (`<plan digest>/w<world size>/r<rank>`) or a plan's `complete`, never a temporary."""
    if path.name == SHARE_COMPLETE:
        return SHARE_PLAN_FOLDER.fullmatch(path.parent.name) is not None
    return (SHARE_RANK_MARKER.fullmatch(path.name) is not None
            and SHARE_WORLD_FOLDER.fullmatch(path.parent.name) is not None
            and SHARE_PLAN_FOLDER.fullmatch(path.parent.parent.name) is not None)
