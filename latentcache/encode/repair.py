"""`encode --repair`: which damaged shards can be written again from their sources.

A damaged shard is rewritten by encoding its clips again, so every one of its sources must still be what its chunk
plan recorded. Where one is gone (deleting the videos once their latents exist is the point of a latent cache) or
was replaced since, rewriting would turn its intact samples into failures, and nothing deletes a sample that cannot
be made again: such a shard is kept exactly as it is, named with its sources, and `verify` keeps reporting it.
"""

from __future__ import annotations

from pathlib import Path

from latentcache.encode.chunk_plan import ChunkPlan, PlannedShard
from latentcache.encode.decoding.decoded_identity import differs, planned_stats
from latentcache.encode.input_stats import quick_stat
from latentcache.encode.job_plan import JobPlan


def unrepairable(out: Path, job_plan: JobPlan, chunk_plans: list[ChunkPlan],
                 damaged: list[PlannedShard]) -> dict[str, str]:
    """relpath -> why, for each of `damaged` one of whose clips' sources is gone or not what its chunk plan
    recorded (size and mtime, a link's target, a tar's stat, an object's ETag)."""
    if not damaged:
        return {}
    recorded = planned_stats(out, job_plan, chunk_plans)
    by_key = {key: clip for chunk in chunk_plans for key, clip in chunk.clip_map().items()}
    why: dict[str, str] = {}
    for shard in damaged:
        problems = []
        for source in sorted({by_key[k].source for k in shard.keys if k in by_key}):
            if quick_stat(source) is None:
                problems.append(f"{source} is gone")
            elif (how := differs(source, recorded.get(source))) is not None:
                problems.append(f"{source} changed since it was encoded ({how})")
        if problems:
            why[shard.relpath] = "; ".join(problems)
    return why
