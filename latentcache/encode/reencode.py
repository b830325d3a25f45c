"""`--reencode-changed`: a chunk planned again around its changed inputs only, losing no sample of the others.

A latent cache often outlives its videos: an input that is gone is not a change (its latents are of the bytes it
had), so its samples can never be made again. Only the changed inputs are probed and encoded again; every other
input keeps the clips it was planned with, and each sample of theirs that a rewritten shard holds is carried over
byte for byte from the shard that held it, never encoded again. The steps keep kill -9 at any moment safe:

1. the carry: `chunks/pNNNN/cNNNNNN.carry.tar` (a shard of the carried samples, with its sidecar, which also keeps
   their clips' failure records), read from the old shards or from a carry that a killed run left;
2. the old shards that do not stay as they are go, sidecars first;
3. the new chunk plan is written, with what each input is now: from here the chunk is an ordinary chunk whose pending
   shards take their carried samples from the carry (`read_carry`);
4. once every shard of the chunk is done, the carry goes (`drop_carry`).

Killed before 3, the old chunk plan is still in place: the rerun sees the change again and starts over at 1, finding
what step 2 removed in the carry. Killed after 3, it is an ordinary resume. Either way the final tree is the one an
uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentcache.encode.chunk_plan import ChunkPlan, InputVideo, PlannedClip, input_id, lay_out_shards, make_plan
from latentcache.encode.decoding import probing
from latentcache.encode.input_stats import Stat, input_stats
from latentcache.encode.settings import EncodeSettings
from latentcache.errors import ConfigError, ShardFormatError
from latentcache.format.out_layout import carry_name, sidecar_of
from latentcache.format.reader import TarStats, iter_tar
from latentcache.format.shards import CarriedSample, read_done, remove_temporaries, write_shard
from latentcache.storage import location

log = logging.getLogger(__name__)

# A carried clip: its sample, or the failure record its shard's sidecar held for it.
Carried = CarriedSample | dict[str, Any]


def carry_path(out: Path, chunk: ChunkPlan) -> Path | None:
    """Where the carry of a chunk plan's chunk is; None for a plan with no shard (nothing to carry into)."""
    if not chunk.shards or chunk.shards[0].chunk is None:
        return None
    shard = chunk.shards[0]
    return out / carry_name(shard.part or 0, shard.chunk)


def _row_of(record: dict[str, Any]) -> tuple[Any, Any]:
    return record.get("path"), record.get("row")


def replan(old: ChunkPlan, where: tuple[int, int], inputs: list[InputVideo], changed: set[str],
           settings: EncodeSettings, *, probe_fn: Callable[[str], probing.VideoInfo] | None, strict: bool) -> ChunkPlan:
    """The chunk's plan with the inputs at `changed` paths probed and planned again and every other input's clips
    and refusals as `old` has them: what a fresh plan of the chunk gives when the unchanged inputs probe as before.
    `where`: the chunk's (part, chunk) numbers, which its shards are named from."""
    fresh = make_plan([v for v in inputs if v.path in changed], settings, old.vae, probe_fn=probe_fn, strict=strict)
    if fresh.fingerprint != old.fingerprint:
        raise ConfigError(f"the settings now give fingerprint {fresh.fingerprint}, the chunk was planned with "
                          f"{old.fingerprint}; run with the settings the directory was made with")
    def by_input(clips: list[PlannedClip]) -> dict[str, list[PlannedClip]]:
        found: dict[str, list[PlannedClip]] = {}
        for c in clips:
            found.setdefault(c.relpath, []).append(c)
        return found

    def by_row(records: list[dict[str, Any]]) -> dict[tuple[Any, Any], list[dict[str, Any]]]:
        found: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
        for r in records:
            found.setdefault(_row_of(r), []).append(r)
        return found

    clips_then, clips_now = by_input(old.clips), by_input(fresh.clips)
    refused_then, refused_now = by_row(old.rejected), by_row(fresh.rejected)
    clips: list[PlannedClip] = []
    rejected: list[dict[str, Any]] = []
    for v in inputs:  # in the chunk's order, as make_plan lays them out
        now = v.path in changed
        clips += (clips_now if now else clips_then).get(input_id(v), [])
        rejected += (refused_now if now else refused_then).pop((v.path, v.origin), [])
    shards = lay_out_shards(clips, settings.samples_per_shard)
    for shard in shards:
        shard.part, shard.chunk = where
    return ChunkPlan(old.fingerprint, old.settings, old.vae, clips, shards, rejected)


def changed_stats(inputs: list[InputVideo], stats: list[Stat], changed: set[str]) -> list[Stat]:
    """`stats` with those of the `changed` inputs taken again now: before they are probed, so a file replaced
    after this is seen as changed by the next run, never missed."""
    fresh = dict(zip(sorted(changed), input_stats(sorted(changed)), strict=True))
    return [fresh[v.path] if v.path in changed else s for v, s in zip(inputs, stats, strict=True)]


def reencode_chunk(out: Path, where: tuple[int, int], old: ChunkPlan, new: ChunkPlan, stats: list[Stat],
                   changed: set[str], write_plan: Callable[[ChunkPlan, list[Stat]], None]) -> ChunkPlan:
    """Put `new` (from `replan`) in place of `old` in the steps the module's docstring gives. `stats`: what each
    input is now (`changed_stats`)."""
    changed_keys = {c.key for c in new.clips if c.source in changed} | {c.key for c in old.clips if c.source in changed}
    old_shards = {s.relpath: s for s in old.shards}
    kept = {s.relpath for s in new.shards if s.relpath in old_shards and old_shards[s.relpath].keys == s.keys
            and not changed_keys.intersection(s.keys)}
    # Placed by the old plan (so written or failed in a done shard of it), in a shard written again, not changed.
    then = {c.key for c in old.clips}
    wanted = {k for s in new.shards if s.relpath not in kept for k in s.keys if k in then and k not in changed_keys}
    _write_carry(out, out / carry_name(*where), old, wanted)
    for shard in old.shards:
        if shard.relpath not in kept:
            sidecar_of(out / shard.relpath).unlink(missing_ok=True)
    for shard in old.shards:
        if shard.relpath not in kept:
            remove_temporaries(out / shard.relpath)
            (out / shard.relpath).unlink(missing_ok=True)
    write_plan(new, stats)
    log.warning("%s part %d chunk %d: %d changed input(s) planned again; %d of the chunk's %d shard(s) kept as they "
                "were, %d sample(s) carried over unchanged into the shards written again", out, *where, len(changed),
                len(kept), len(new.shards), len(wanted))
    return new


def _write_carry(out: Path, path: Path, old: ChunkPlan, wanted: set[str]) -> None:
    """Step 1: every sample (or failure record) of `wanted` that the old chunk's done shards or an earlier carry
    hold, in one carry shard. Refuses, having removed nothing, when a shard it needs does not match its sidecar."""
    record = read_done(path)
    found = _read_samples(path, record, wanted) if record is not None and wanted else {}
    for shard in old.shards:
        need = wanted.intersection(shard.keys) - found.keys()
        if not need:
            continue
        record = read_done(out / shard.relpath)
        if record is None:
            continue  # never finished: its clips are encoded from their sources like any pending clip
        found.update(_read_samples(out / shard.relpath, record, need))
    if not found:
        # None to carry: a carry an earlier run left must not stand in for the clips planned now.
        sidecar_of(path).unlink(missing_ok=True)
        remove_temporaries(path)
        path.unlink(missing_ok=True)
        return
    order = sorted(found)
    samples = [found[k] for k in order if isinstance(found[k], CarriedSample)]
    failures = [found[k] for k in order if isinstance(found[k], dict)]
    write_shard(path, samples, extra={"failures": failures})  # type: ignore[arg-type]


def _read_samples(path: Path, record: dict[str, Any], need: set[str]) -> dict[str, Carried]:
    found: dict[str, Carried] = {}
    stats = TarStats()
    # In object storage (`--out s3://...`) the shard is one GET, checked in memory; on disk it streams.
    whole = path.read_bytes() if location.read_whole_first(path) else None
    try:
        for sample in iter_tar(whole if whole is not None else path, str(path), stats=stats):
            key = sample.pop("__key__")
            if key in need:
                found[key] = CarriedSample(key, tuple((f"{key}.{ext}", data) for ext, data in sample.items()))
    except (ShardFormatError, OSError) as e:
        raise ConfigError(f"cannot carry the unchanged samples of {path} over: {e}; nothing was removed") from None
    digest = hashlib.sha256(whole).hexdigest() if whole is not None else stats.sha256
    if digest != record.get("sha256"):
        raise ConfigError(f"{path} does not match its sidecar's sha256, so its unchanged samples cannot be carried "
                          "over; nothing was removed. Restore the shard, or encode into a new --out directory")
    for failure in record.get("failures", []):
        if isinstance(failure, dict) and failure.get("key") in need:
            found[failure["key"]] = failure
    return found


def carry_keys(out: Path, chunk: ChunkPlan) -> set[str]:
    """The keys a chunk's carry holds (samples and failures); empty when it has none."""
    path = carry_path(out, chunk)
    record = read_done(path) if path is not None else None
    if record is None:
        return set()
    return set(record["keys"]) | {f["key"] for f in record.get("failures", []) if isinstance(f, dict)}


def read_carry(out: Path, chunk: ChunkPlan, keys: set[str]) -> dict[str, Carried]:
    """The carried samples and failure records of `keys` that the chunk's carry holds."""
    path = carry_path(out, chunk)
    record = read_done(path) if path is not None else None
    if path is None or record is None or not keys:
        return {}
    return _read_samples(path, record, keys)


def drop_carry(out: Path, chunk: ChunkPlan) -> None:
    """Step 4: the carry goes once every shard of its chunk is done (sidecar first: without it, it is unfinished)."""
    path = carry_path(out, chunk)
    if path is None or not (path.exists() or sidecar_of(path).exists()):
        return
    if all(read_done(out / s.relpath) is not None for s in chunk.shards):
        sidecar_of(path).unlink(missing_ok=True)
        remove_temporaries(path)
        path.unlink(missing_ok=True)
