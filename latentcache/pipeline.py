"""The executor: plan once, then for each shard this process owns decode -> encode -> write; finalize last.

Where a process runs (a plain loop, `accelerate launch`, a SLURM array task) only changes `rank` and `world_size`.
One error policy lives here: an `InputError` from any stage becomes a failure record in the shard's sidecar (and
later `failures.jsonl`) plus a log line, and the run goes on; anything else is a bug and propagates.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentcache.decode import Clip
from latentcache.errors import ConfigError, InputError, ShardFormatError
from latentcache.loader import ClipStream, default_workers
from latentcache.plan import (
    InputVideo,
    Plan,
    PlannedClip,
    PlannedShard,
    failure_record,
    make_plan,
    shards_for_rank,
)
from latentcache.provenance import merge_software, software_record, vae_change
from latentcache.settings import EncodeSettings, TilingSettings
from latentcache.shards import (
    EncodedClip,
    read_done,
    remove_stale_temporaries,
    remove_temporaries,
    write_manifest,
    write_shard,
    write_text_atomic,
)
from latentcache.text import TextEncoder
from latentcache.vae import DTYPES, VideoVAE, tile_problem

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
# Everything latentcache writes into OUT besides the plan; `--overwrite` removes exactly these.
OUTPUTS = ("shards", "manifest.json", "failures.jsonl")
# Tile overlaps tried on an out-of-memory retry, most blending first; 0 is always exact (see vae.tile_problem).
FALLBACK_OVERLAPS = (0.25, 0.5, 1 / 3, 0.125, 0.0)


@dataclass(slots=True)
class RunSummary:
    shards_written: int = 0
    shards_skipped: int = 0
    # Shards found half-done (a temporary file, or a tar without its sidecar) and written again.
    shards_redone: int = 0
    clips_written: int = 0
    clips_skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clips_per_second(self) -> float:
        return self.clips_written / self.seconds if self.seconds else 0.0


def vae_record(vae: VideoVAE) -> dict[str, Any]:
    return {"identity": vae.identity.to_dict(), "spec": vae.spec.to_dict(), "dtype": str(vae.dtype).split(".")[-1]}


def load_or_make_plan(out: Path, inputs: list[InputVideo], settings: EncodeSettings, vae: VideoVAE, *,
                      overwrite: bool = False, write: bool = True) -> Plan:
    """Reuse OUT/plan.json when it was made with the same settings, VAE and inputs; refuse to mix otherwise.

    Safe for processes that cannot wait for each other (SLURM array tasks): each makes the same plan from the same
    inputs and renames it into place from its own temporary name, so whichever rename lands last, the bytes agree.
    A restart does not probe the inputs again; it only compares their paths with the plan's.
    """
    vae.spec.check_clip(settings.clip)
    path = out / PLAN_FILE
    record = vae_record(vae)
    if path.is_file():
        existing = Plan.from_json(path.read_text(encoding="utf-8"))
        changed = vae_change(existing.vae.get("identity"), record["identity"], str(path))
        if changed and not overwrite:
            raise ConfigError(f"{out}: {changed}")
        # An empty plan costs nothing and carries the fingerprint exactly as make_plan computes it.
        wanted = make_plan([], settings, record)
        if existing.fingerprint != wanted.fingerprint and not overwrite:
            raise ConfigError(f"{out} was made with other settings or another VAE: {_differences(existing, wanted)}. "
                              "Use a new --out directory, or --overwrite to start this one again.")
        if existing.fingerprint == wanted.fingerprint and not overwrite:
            _check_inputs(out, existing, inputs)
            return existing
        if write:
            clear_outputs(out)
    fresh = make_plan(inputs, settings, record)
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, fresh.to_json())
    return fresh


def _planned_paths(plan: Plan) -> set[str]:
    return {c.source for c in plan.clips} | {r["path"] for r in plan.rejected}


def _check_inputs(out: Path, plan: Plan, inputs: list[InputVideo]) -> None:
    """New inputs would silently be left out of a resumed run: refuse. Vanished ones just become failures."""
    planned = _planned_paths(plan)
    given = {v.path for v in inputs}
    added, gone = sorted(given - planned), sorted(planned - given)
    if added:
        raise ConfigError(f"{out}/{PLAN_FILE} was made from other inputs: {len(added)} input(s) are not in it, "
                          f"e.g. {added[0]}. Use a new --out directory for them, or --overwrite to plan again.")
    if gone:
        log.warning("%d planned input(s) were not given this time (e.g. %s); they stay in the plan", len(gone),
                    gone[0])


def clear_outputs(out: Path) -> None:
    """What `--overwrite` removes: the shards, sidecars, manifest, failures and plan latentcache wrote, nothing else."""
    log.warning("--overwrite: removing the previous shards, manifest and plan in %s", out)
    for name in (*OUTPUTS, PLAN_FILE):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def _differences(old: Plan, new: Plan) -> str:
    diffs = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        elif a != b:
            diffs.append(f"{where}: {a!r} then, {b!r} now")

    # Through JSON both ways, so a tuple now and the list it became in plan.json compare equal.
    now = json.loads(json.dumps({"settings": new.settings, "vae": new.vae}, default=str))
    walk({"settings": old.settings, "vae": old.vae}, now, "")
    return "; ".join(diffs[:6]) or "the input clips differ"


def fallback_tilings(height: int, width: int, spatial: int,
                     configured: TilingSettings | None = None) -> list[TilingSettings]:
    """Ever smaller valid tilings for a clip that ran out of memory: halve the tile (from the configured one, or from
    the clip) down to two latents a side. Each has an overlap that keeps the latents exactly the right size."""
    th, tw = (min(configured.tile_height, height), min(configured.tile_width, width)) if configured else (height, width)
    smallest = 2 * spatial
    found: list[TilingSettings] = []
    while th > smallest or tw > smallest:
        th, tw = max(smallest, th // 2 // spatial * spatial), max(smallest, tw // 2 // spatial * spatial)
        for overlap in FALLBACK_OVERLAPS:
            tiling = TilingSettings(tile_height=th, tile_width=tw, overlap=overlap)
            if tile_problem(tiling, spatial) is None:
                found.append(tiling)
                break
    return found


def _is_oom(error: BaseException) -> bool:
    # cuDNN and some kernels report an allocation failure as a plain RuntimeError.
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def _release_memory(vae: VideoVAE) -> None:
    if vae.device.type == "cuda":
        torch.cuda.empty_cache()


def encode_with_fallback(vae: VideoVAE, frames: np.ndarray, sources: list[str]
                         ) -> tuple[torch.Tensor, torch.Tensor, TilingSettings | None]:
    """`vae.encode`, retried with tiling and then smaller tiles when it runs out of memory.

    Returns (mean, logvar, the tiling that was needed, or None). The configured tiling is restored afterwards, so
    whether a clip is tiled depends on that clip alone, never on which clips a process happened to encode before.
    Raises InputError (stage "encode") when even the smallest tiles do not fit.
    """
    configured = vae.tiling
    smaller = fallback_tilings(frames.shape[2], frames.shape[3], vae.spec.spatial_compression, configured)
    last: BaseException | None = None
    try:
        for tiling in [None, *smaller]:  # None: as configured
            if tiling is not None:
                _release_memory(vae)
                log.warning("%s: out of memory; retrying with %dx%d tiles, overlap %g", ", ".join(sources),
                            tiling.tile_height, tiling.tile_width, tiling.overlap)
                vae.configure(tiling, None)
            try:
                mean, logvar = vae.encode(frames, sources=sources)
                return mean, logvar, tiling
            except Exception as e:
                if not _is_oom(e):
                    raise
                # Keep the message, drop the traceback: its frames hold the activations that filled the memory.
                last = e.with_traceback(None)
    finally:
        if last is not None:
            vae.configure(configured, None)
            _release_memory(vae)
    raise InputError(", ".join(sources), "encode", f"out of memory even with the smallest tiles ({last}); use a "
                     "bigger GPU, fewer --frames or a smaller --height/--width") from last


Encoded = tuple[torch.Tensor, torch.Tensor, TilingSettings | None]


def _encode_batch(vae: VideoVAE, batch: list[tuple[PlannedClip, Clip]]
                  ) -> list[tuple[PlannedClip, Clip, Encoded | InputError]]:
    """Encode a batch in one call; if that fails (memory, non-finite latents), clip by clip so one bad clip or one
    huge clip never takes its batch-mates down with it."""
    if len(batch) > 1:
        try:
            mean, logvar = vae.encode(np.stack([c.frames for _, c in batch]), sources=[p.source for p, _ in batch])
        except Exception as e:
            if not (isinstance(e, InputError) or _is_oom(e)):
                raise
            log.warning("batch of %d failed (%s); encoding its clips one by one", len(batch), e)
        else:
            return [(p, c, (mean[i], logvar[i], None)) for i, (p, c) in enumerate(batch)]
        _release_memory(vae)  # out of the except block, once the failed call's frames are gone
    results: list[tuple[PlannedClip, Clip, Encoded | InputError]] = []
    for p, c in batch:
        try:
            mean, logvar, tiling = encode_with_fallback(vae, c.frames[None], [p.source])
            results.append((p, c, (mean[0], logvar[0], tiling)))
        except InputError as e:
            results.append((p, c, e))
    return results


def _sample_meta(p: PlannedClip, clip: Clip, plan: Plan, tiling: TilingSettings | None) -> dict[str, Any]:
    # frames_decoded measures the decode's cost (it differs between CPU and NVDEC decoding), not the sample: it stays
    # out of the shard so any decoder writes the same bytes.
    kept = {k: v for k, v in clip.meta.items() if k != "frames_decoded"}
    meta = {**kept, "key": p.key, "source": p.relpath, "clip_index": p.index, "bucket": p.bucket,
            "caption_source": "given" if p.caption is not None else None,
            "vae": plan.vae["identity"], "dtype": plan.vae["dtype"]}
    if tiling is not None:
        # This clip needed smaller tiles than the run's settings (out of memory): its latents differ slightly.
        meta["tiling_fallback"] = {"tile_height": tiling.tile_height, "tile_width": tiling.tile_width,
                                   "overlap": tiling.overlap, "reason": "out of memory"}
    return meta


def _stored(mean: torch.Tensor, logvar: torch.Tensor, settings: EncodeSettings
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What goes into the shard: `--store mean` drops the log-variance, `--store-dtype` casts."""
    dtype = None if settings.store_dtype == "encode" else DTYPES[settings.store_dtype]
    if dtype is not None:
        mean, logvar = mean.to(dtype), logvar.to(dtype)
        if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
            raise InputError("", "write", f"latents overflow --store-dtype {settings.store_dtype}; "
                             "store them in fp32 or bf16")
    return mean, (logvar if settings.store == "posterior" else None)


def encode_shard(shard: PlannedShard, plan: Plan, vae: VideoVAE, settings: EncodeSettings,
                 decoded: Iterator[tuple[PlannedClip, Clip | InputError]], on_clip: Callable[[int], None],
                 texts: TextEncoder | None = None) -> tuple[list[EncodedClip], list[dict]]:
    """Encode the shard's clips, taking them from `decoded` (a stream over this rank's pending clips, in order)."""
    encoded: list[EncodedClip] = []
    failures: list[dict[str, Any]] = []
    batch: list[tuple[PlannedClip, Clip]] = []

    def fail(p: PlannedClip, error: InputError) -> None:
        failures.append(failure_record(error) | {"key": p.key})
        log.warning("%s: %s", error.path, error.reason)
        if settings.strict:
            raise error

    def flush() -> None:
        for p, c, result in _encode_batch(vae, batch):
            if isinstance(result, InputError):
                fail(p, result)
            else:
                mean, logvar, tiling = result
                try:
                    mean, logvar = _stored(mean, logvar, settings)
                except InputError as e:
                    fail(p, InputError(p.source, e.stage, e.reason))
                    continue
                # Prompt embeddings (`--text-encoder`), computed once per distinct caption by the encoder's cache.
                text = texts.embed(p.caption) if texts is not None else None
                encoded.append(EncodedClip(p.key, mean, logvar, _sample_meta(p, c, plan, tiling), p.caption, text))
        on_clip(len(batch))
        batch.clear()

    for expected_key in shard.keys:
        p, result = next(decoded)
        if p.key != expected_key:
            raise RuntimeError(f"decode stream out of order: got {p.key}, expected {expected_key}")
        if isinstance(result, InputError):
            fail(p, result)
            on_clip(1)
            continue
        batch.append((p, result))
        if len(batch) >= settings.batch_size:
            flush()
    flush()
    return encoded, failures


def run(out: Path, plan: Plan, vae: VideoVAE, settings: EncodeSettings, *, rank: int = 0, world_size: int = 1,
        on_clip: Callable[[int], None] = lambda n: None, texts: TextEncoder | None = None) -> RunSummary:
    """Produce every shard this rank owns that is not already done; `on_clip` counts clips actually worked on."""
    summary = RunSummary()
    started = time.perf_counter()
    # Every process checks its own VAE against the plan: a node whose local copy of the weights differs refuses.
    changed = vae_change(plan.vae.get("identity"), vae.identity.to_dict(), str(out / PLAN_FILE))
    if changed:
        raise ConfigError(f"{out}: {changed}")
    # In the sidecar, never in the tar: byte identity is promised within one software record, not across them.
    software = software_record(vae.device, text_encoder=texts is not None)
    todo: list[PlannedShard] = []
    for shard in shards_for_rank(plan, rank, world_size):
        path = out / shard.relpath
        if read_done(path) is not None:
            summary.shards_skipped += 1
            summary.clips_skipped += len(shard.keys)
            continue
        # A temporary or a tar without a sidecar is the trace of a killed writer: start the shard over.
        if remove_temporaries(path) or path.exists():
            summary.shards_redone += 1
            log.info("%s was left unfinished by an earlier run; writing it again", shard.relpath)
        todo.append(shard)
    by_key = plan.clip_map()
    workers = default_workers() if settings.workers is None else settings.workers
    # One stream over all of this rank's pending clips, so decode workers run ahead across shard boundaries.
    decoded = iter(ClipStream([by_key[k] for s in todo for k in s.keys], settings.clip, workers=workers,
                              nvdec=settings.nvdec))
    for shard in todo:
        encoded, failures = encode_shard(shard, plan, vae, settings, decoded, on_clip, texts)
        write_shard(out / shard.relpath, encoded, extra={"shard_id": shard.shard_id, "bucket": shard.bucket,
                                                         "failures": failures, "software": software})
        summary.shards_written += 1
        summary.clips_written += len(encoded)
        summary.failures.extend(failures)
    summary.seconds = time.perf_counter() - started
    return summary


def pending_shards(out: Path, shards: list[PlannedShard]) -> list[PlannedShard]:
    """Those of `shards` without a valid sidecar (all of `plan.shards`: empty once the whole job is done)."""
    return [s for s in shards if read_done(out / s.relpath) is None]


def finalize(out: Path) -> dict[str, Any]:
    """Merge the sidecars into manifest.json and failures.jsonl, checking that every planned clip is there once."""
    plan_path = out / PLAN_FILE
    if not plan_path.is_file():
        raise ShardFormatError(f"{out}: no {PLAN_FILE}; run `latentcache encode` into it first")
    plan = Plan.from_json(plan_path.read_text(encoding="utf-8"))
    remove_stale_temporaries(out)
    shards, failures, seen, software = [], list(plan.rejected), {}, []
    missing = []
    for shard in plan.shards:
        record = read_done(out / shard.relpath)
        if record is None:
            missing.append(shard.relpath)
            continue
        _check_shard_record(out, shard, record)
        for key in record["keys"]:
            if key in seen:
                raise ShardFormatError(f"{out}: clip {key} is in both {seen[key]} and {shard.relpath}")
            seen[key] = shard.relpath
        failures.extend(record.get("failures", []))
        software.append(record.get("software"))
        shards.append({"path": shard.relpath, "bucket": shard.bucket, "samples": record["samples"],
                       "bytes": record["bytes"], "sha256": record["sha256"]})
    if missing:
        raise ShardFormatError(f"{out}: {len(missing)} planned shard(s) are not finished, e.g. {missing[0]}; "
                               "run the same `latentcache encode` again to complete them")
    failed_keys = {f["key"] for f in failures if "key" in f}
    lost = [c.key for c in plan.clips if c.key not in seen and c.key not in failed_keys]
    if lost:
        raise ShardFormatError(f"{out}: {len(lost)} planned clip(s) are neither written nor recorded as failed, "
                               f"e.g. {lost[0]}")
    write_text_atomic(out / "failures.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in failures))
    buckets: dict[str, int] = {}
    for s in shards:
        buckets[s["bucket"]] = buckets.get(s["bucket"], 0) + s["samples"]
    manifest = {
        "latent_spec": plan.vae["spec"],
        "vae": plan.vae["identity"],
        "dtype": plan.vae["dtype"],
        "settings": plan.settings,
        "fingerprint": plan.fingerprint,
        "counts": {"samples": len(seen), "shards": len(shards), "failures": len(failures),
                   "planned_clips": len(plan.clips)},
        "buckets": buckets,
        "shards": shards,
        # Each distinct software record of the processes that wrote the shards, with their shard counts.
        "software": merge_software(software),
    }
    write_manifest(out, manifest)
    return manifest


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
