"""Finalizing: what is done on disk, and the manifest written once nothing is left.

A shard is done when its sidecar is (`pending_shards`); a rank's share is done when it has left its marker,
`OUT/chunks/done/<plan digest>/w<world size>/r<rank>`; a job is done, once finalized, when its plan's `complete`
marker is there. The markers are hints that let a task that is not the last stop after a stat or two;
`pending_in_job` remains the truth (docs/distributed.md). `finalize` merges the sidecars into manifest.json and
failures.jsonl, checking that every planned clip is there once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from latentcache.encode import chunks
from latentcache.encode.chunk_plan import PlannedShard
from latentcache.encode.job_plan import JobPlan, read_job_plan
from latentcache.encode.models.provenance import merge_software
from latentcache.encode.output import write_naming_path
from latentcache.errors import ShardFormatError
from latentcache.format.manifest import Manifest, ShardEntry, write_manifest
from latentcache.format.out_layout import (
    FAILURES_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    SHARE_COMPLETE_FILE,
    SHARE_MARKERS_DIR,
    SHARE_PLAN_FOLDER,
    SHARE_RANK_MARKER,
    SHARE_WORLD_FOLDER,
    share_complete,
    share_rank_marker,
    share_world_folder,
)
from latentcache.format.outcomes import tally
from latentcache.format.shards import read_done, remove_stale_temporaries, write_text_atomic
from latentcache.storage import location

# ----------------------------------------------------------------------------------------------- what is done


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


def _plan_digest(job_plan: JobPlan) -> str:
    # Markers are named by a digest of plan.json: an append (a new part) makes every earlier marker stale at once.
    return hashlib.sha256(job_plan.to_json().encode()).hexdigest()[:16]


def mark_share_done(out: Path, job_plan: JobPlan, rank: int, world_size: int, shards: list[PlannedShard]) -> bool:
    """After a rank's run: if none of its `shards` is pending (a stat of each sidecar: its share only), leave a
    marker saying so. Returns whether it did."""
    if pending_shards(out, shards):
        return False
    marker = share_rank_marker(share_world_folder(out, _plan_digest(job_plan), world_size), rank)
    if not marker.is_file():
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, "")
    return True


def first_share_pending(out: Path, job_plan: JobPlan, world_size: int) -> int | None:
    """The first rank of `world_size` without a done marker, or None when every one has one. It stops at the
    first missing marker, so a task that is not the last one to finish pays about one stat, not a read of every
    chunk plan. A marker is a hint, never the truth: None is followed by `pending_in_job`, which checks it all (a
    marker left from before shards were removed by hand costs that check, nothing worse)."""
    digest = _plan_digest(job_plan)
    folder = share_world_folder(out, digest, world_size)
    if share_complete(out, digest).is_file():
        return None
    for rank in range(world_size):
        if not share_rank_marker(folder, rank).is_file():
            return rank
    return None


def clear_share_markers(out: Path, job_plan: JobPlan) -> None:
    """Once the manifest is written, the per-rank markers have served; one `complete` marker of this plan takes
    their place, so a finished directory holds the same files whatever number of processes wrote it, and a rerun
    of any task of a finished job checks everything and finalizes again, as before.

    Array tasks that finish together all finalize, at once: each writes `complete` first and then removes only
    the markers themselves (every plan's rank markers, an earlier plan's `complete`) and the folders they leave
    empty. Removing the whole folder took another task's `complete`, or the temporary it was renaming into place
    (a FileNotFoundError that failed that task)."""
    complete = share_complete(out, _plan_digest(job_plan))
    complete.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(complete, "")
    done = out / SHARE_MARKERS_DIR
    try:
        found = [p for p in done.rglob("*") if p != complete and _is_share_marker(p)]
    except FileNotFoundError:  # a folder another task emptied and removed while this one walked it
        found = []
    for marker in found:
        marker.unlink(missing_ok=True)
    if location.has_folders(done):
        # Deepest first: the world-size folders, then an earlier plan's folder. One still in use stays.
        for folder in sorted({m.parent for m in found} | {m.parent.parent for m in found}, key=lambda f: -len(f.parts)):
            if folder != complete.parent and folder != done:
                with suppress(OSError):
                    folder.rmdir()


def _is_share_marker(path: Path) -> bool:
    """A rank marker (`<plan digest>/w<world size>/r<rank>`) or a plan's `complete`, never a temporary."""
    if SHARE_COMPLETE_FILE.fullmatch(path.name):
        return SHARE_PLAN_FOLDER.fullmatch(path.parent.name) is not None
    return (SHARE_RANK_MARKER.fullmatch(path.name) is not None
            and SHARE_WORLD_FOLDER.fullmatch(path.parent.name) is not None
            and SHARE_PLAN_FOLDER.fullmatch(path.parent.parent.name) is not None)


# ------------------------------------------------------------------------------------------------ the manifest


def pending_in_job(out: Path, job_plan: JobPlan) -> tuple[int, int]:
    """(shards not finished, chunks not planned yet) over the whole job: (0, 0) once it is done.

    Reads one chunk plan at a time, so it needs the memory of one chunk, not of the dataset."""
    shards, unplanned = 0, 0
    for ref in job_plan.chunk_refs():
        if not (out / ref.plan_name).is_file():
            unplanned += 1
            continue
        shards += len(pending_shards(out, chunks.read_chunk_plan(out, job_plan, ref).shards))
    return shards, unplanned


def finalize(out: Path) -> Manifest:
    """Merge the sidecars into manifest.json and failures.jsonl, checking that every planned clip is there once."""
    return finalize_with_outcome(out)[0]


def finalize_with_outcome(out: Path) -> tuple[Manifest, dict[str, Any]]:
    """`finalize`, plus what the run did (videos, skips and failures by reason), counted chunk by chunk."""
    plan_path = out / PLAN_FILE
    if not plan_path.is_file():
        raise ShardFormatError(f"{out}: no {PLAN_FILE}; run `latentcache encode` into it first")
    plan = read_job_plan(out)
    remove_stale_temporaries(out)
    shards: list[ShardEntry] = []
    failures: list[dict[str, Any]] = []
    software: list[Any] = []
    missing: list[str] = []
    samples = planned_clips = with_clips = 0
    for ref in plan.chunk_refs():
        if not (out / ref.plan_name).is_file():
            missing.append(ref.plan_name)
            continue
        chunk = chunks.read_chunk_plan(out, plan, ref)
        failures.extend(chunk.rejected)
        chunk_failures: list[dict[str, Any]] = []
        seen: set[str] = set()  # keys are unique across chunks by construction (distinct relative paths)
        for shard in chunk.shards:
            record = read_done(out / shard.relpath)
            if record is None:
                missing.append(shard.relpath)
                continue
            _check_shard_record(out, shard, record)
            seen.update(record["keys"])
            chunk_failures.extend(record.get("failures", []))
            software.append(record.get("software"))
            shards.append(ShardEntry(shard.relpath, shard.bucket, record["samples"], record["bytes"], record["sha256"]))
        failures.extend(chunk_failures)
        failed_keys = {f["key"] for f in chunk_failures if "key" in f}
        lost = [c.key for c in chunk.clips if c.key not in seen and c.key not in failed_keys]
        if lost and not missing:
            raise ShardFormatError(f"{out}: {len(lost)} planned clip(s) are neither written nor recorded as failed, "
                                   f"e.g. {lost[0]}")
        samples += len(seen)
        planned_clips += len(chunk.clips)
        with_clips += len({c.source for c in chunk.clips if c.key in seen})
    if missing:
        raise ShardFormatError(f"{out}: {len(missing)} planned chunk(s) or shard(s) are not finished, e.g. "
                               f"{missing[0]}; run the same `latentcache encode` again to complete them")
    failures_text = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in failures)
    write_naming_path(out / FAILURES_FILE, write_text_atomic, out / FAILURES_FILE, failures_text)
    buckets: dict[str, int] = {}
    for s in shards:
        buckets[s.bucket] = buckets.get(s.bucket, 0) + s.samples
    counted = tally(failures)
    manifest = Manifest(
        latent_spec=plan.vae["spec"],
        vae=plan.vae["identity"],
        dtype=plan.vae["dtype"],
        settings=plan.settings,
        fingerprint=plan.fingerprint,
        counts={"samples": samples, "shards": len(shards), "planned_clips": planned_clips,
                "skipped": counted.skipped_total, "failed": counted.failed_total,
                "skipped_by_reason": dict(counted.skipped.most_common()),
                "failed_by_reason": dict(counted.failed.most_common())},
        buckets=buckets,
        shards=tuple(shards),
        # Each distinct software record of the processes that wrote the shards, with their shard counts.
        software=merge_software(software),
    )
    write_naming_path(out / MANIFEST_FILE, write_manifest, out, manifest)
    clear_share_markers(out, plan)
    return manifest, {"videos": plan.inputs, "videos_with_clips": with_clips, "tally": counted,
                      "clip": plan.settings.get("clip", {})}


def _check_shard_record(out: Path, shard: PlannedShard, record: dict[str, Any]) -> None:
    """A sidecar accounts for each of its shard's planned clips exactly once: written or failed, not both."""
    written = record["keys"]
    failed = [f["key"] for f in record.get("failures", []) if "key" in f]
    accounted = written + failed
    if sorted(accounted) != sorted(shard.keys):
        extra = sorted(set(accounted) - set(shard.keys)) or sorted(k for k in accounted if accounted.count(k) > 1)
        absent = sorted(set(shard.keys) - set(accounted))
        raise ShardFormatError(
            f"{out / shard.relpath}: its sidecar accounts for {len(accounted)} clip(s), the plan gives it "
            f"{len(shard.keys)} (unexpected or repeated: {extra[:3]}, absent: {absent[:3]}); it was written under "
            "another plan or by another tool. Delete the shard and its .json sidecar and run the encode again.")
