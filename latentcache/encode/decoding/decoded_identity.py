"""What was decoded is what was planned: a clip's source is statted right before it is opened and again right after
its frames are taken, and both must be what its chunk plan recorded (size and mtime, a link's target, a tar's stat,
an object's ETag). A video replaced while its chunk is being encoded (and perhaps put back later, which a rerun's
check would call unchanged) never leaves another file's latents under its key: the run stops before any shard holds
them, naming it, and the rerun checks it like any changed input.

Not detected: a replacement with the same size and mtime (as for the rerun check), and one swapped in and back again
between the two stats (while the decoder reads it).
"""

from __future__ import annotations

from pathlib import Path

from latentcache.encode.chunk_plan import ChunkPlan
from latentcache.encode.chunks import read_chunk_inputs, read_chunk_stats
from latentcache.encode.input_stats import Stat, quick_stat
from latentcache.encode.job_plan import JobPlan
from latentcache.errors import ConfigError, InputError


class ChangedWhileEncoding(InputError):
    """A clip's source is not what its chunk plan recorded when it was decoded. Not a failure record: the run stops."""


def planned_stats(out: Path, job_plan: JobPlan, chunk_plans: list[ChunkPlan]) -> dict[str, Stat]:
    """Each source path of `chunk_plans` with the stat its chunk plan recorded (chunk plans made before stats were
    recorded give none: their sources are not checked)."""
    refs = {(r.part, r.chunk): r for r in job_plan.chunk_refs()}
    found: dict[str, Stat] = {}
    for chunk in {id(c): c for c in chunk_plans}.values():  # a chunk's encode groups share its plan
        if not chunk.shards or chunk.shards[0].chunk is None:
            continue
        ref = refs.get((chunk.shards[0].part, chunk.shards[0].chunk))
        stats = read_chunk_stats(out, job_plan, ref) if ref is not None else None
        if stats is not None:
            found.update((v.path, s) for v, s in zip(read_chunk_inputs(out, ref), stats, strict=True))
    return found


def differs(path: str, recorded: Stat) -> str | None:
    """How the source at `path` differs now from `recorded` in its cheap fields; None when it does not (or when it
    cannot be statted: then decoding it fails on its own, as a failure record)."""
    now = quick_stat(path)
    if recorded is None or now is None:
        return None
    fields = sorted(set(now) | ({"target"} if "target" in recorded else set()))
    changed = [f"{k} {recorded.get(k)!r} -> {now.get(k)!r}" for k in fields if recorded.get(k) != now.get(k)]
    return ", ".join(changed) or None


def check(path: str, recorded: Stat, when: str) -> None:
    """Raises ChangedWhileEncoding when the source at `path` is not what its chunk plan recorded."""
    how = differs(path, recorded)
    if how is not None:
        raise ChangedWhileEncoding(path, "decode", f"changed {when} ({how}) since its chunk was planned")


def stop(out: Path, error: InputError) -> ConfigError:
    return ConfigError(f"{out}: {error.path} {error.reason}, while this run encoded it; nothing of it was written. Run "
                       "the same command again: a replaced input is then refused by name (--reencode-changed encodes "
                       "its new bytes), one put back as it was is encoded from its planned bytes.")
