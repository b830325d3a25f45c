"""The executor: plan once, then for each shard this process owns decode -> encode -> write; finalize last.

Where a process runs (a plain loop, `accelerate launch`, a SLURM array task) only changes `rank` and `world_size`.
One error policy lives here: an `InputError` from any stage becomes a failure record in the shard's sidecar (and
later `failures.jsonl`) plus a log line, and the run goes on; anything else is a bug and propagates.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentcache.encode import chunks, decoded_identity, reencode, rerun_inputs
from latentcache.encode.chunks import JobPlan
from latentcache.encode.decode import Clip, VideoInfo
from latentcache.encode.loader import ClipStream, default_workers
from latentcache.encode.memory import _is_oom, _release_memory, encode_with_fallback
from latentcache.encode.output import PLAN_FILE, _writing, claim_output, clear_outputs, differences
from latentcache.encode.plan import (
    InputVideo,
    Plan,
    PlannedClip,
    PlannedShard,
    aspect_sizes,
    check_buckets,
    failure_record,
)
from latentcache.encode.provenance import merge_software, software_record, vae_change
from latentcache.encode.settings import EncodeSettings, RuntimeSettings, TilingSettings, hash_json
from latentcache.encode.share_markers import clear_share_markers, pending_shards
from latentcache.encode.text import TextEncoder
from latentcache.encode.vae import DTYPES, VideoVAE
from latentcache.encode.writer import ShardWriter
from latentcache.errors import ConfigError, InputError, ShardFormatError
from latentcache.format.manifest import write_manifest
from latentcache.format.outcomes import tally
from latentcache.format.shards import (
    CarriedSample,
    EncodedClip,
    pause_point,
    read_done,
    remove_stale_temporaries,
    remove_temporaries,
    write_shard,
    write_text_atomic,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunSummary:
    shards_written: int = 0
    shards_skipped: int = 0
    # Shards found half-done (a temporary file, or a tar without its sidecar) and written again.
    shards_redone: int = 0
    # Done shards whose tar no longer matched its sidecar's sha256, written again by `encode --repair`.
    shards_repaired: int = 0
    clips_written: int = 0
    clips_skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clips_per_second(self) -> float:
        return self.clips_written / self.seconds if self.seconds else 0.0


def vae_record(vae: VideoVAE) -> dict[str, Any]:
    return {"identity": vae.identity.to_dict(), "spec": vae.spec.to_dict(), "dtype": str(vae.dtype).split(".")[-1]}


def load_or_make_plan(out: Path, inputs: Iterable[InputVideo], settings: EncodeSettings, vae: VideoVAE, *,
                      overwrite: bool = False, chunk_size: int | None = None,
                      lists: list[dict[str, Any]] | None = None, world_size: int = 1) -> JobPlan:
    """The top-level plan: OUT/plan.json reused, extended by the inputs it lacks (a new part), or made. No video is
    opened here: each chunk is probed later by the rank that owns it (`plan_chunks`).

    Safe for processes that cannot wait for each other (SLURM array tasks): each makes the same plan from the same
    inputs and renames each file into place from its own temporary name, so whichever rename lands last, the bytes
    agree. Other settings or another VAE are refused, and so are earlier inputs that are not given again.

    `lists`: the identity of the input lists (`input_stats.list_identity`, taken before `inputs` is read). When it
    is the one recorded for plan.json, `inputs` is never read: the lists hold nothing new (see docs/distributed.md
    "Changed inputs").
    `chunk_size`: None for `chunks.auto_chunk_size` over the new inputs and `world_size` (all processes of the job).
    """
    vae.spec.check_clip(settings.clip)
    claim_output(out)  # before any probing: a wrong --out fails in a second, not after an hour of probes
    path = out / PLAN_FILE
    record = vae_record(vae)
    # No video is probed here, but settings that cannot work are refused before any file is written.
    check_buckets(settings.clip, record.get("spec"))
    wanted = JobPlan(hash_json({"settings": settings.output_affecting(), "vae": record}), settings.output_affecting(),
                     record, [])
    if path.is_file():
        existing = chunks.read_job_plan(out)
        changed = vae_change(existing.vae.get("identity"), record["identity"], str(path))
        if changed and not overwrite:
            raise ConfigError(f"{out}: {changed}")
        if existing.fingerprint != wanted.fingerprint and not overwrite:
            raise ConfigError(f"{out} was made with other settings or another VAE: {differences(existing, wanted)}. "
                              "Use a new --out directory, or --overwrite to start this one again.")
        if existing.fingerprint == wanted.fingerprint and not overwrite:
            if rerun_inputs.lists_unchanged(out, existing, lists):
                log.info("%s: the input lists are the ones plan.json was made from; not read again", out)
                return existing
            return _append_and_record(out, existing, chunks.InputTable(inputs), chunk_size, world_size, lists)
        clear_outputs(out, existing)
    return _append_and_record(out, wanted, chunks.InputTable(inputs), chunk_size, world_size, lists)


def _append_and_record(out: Path, plan: JobPlan, table: chunks.InputTable, chunk_size: int | None,
                       world_size: int, lists: list[dict[str, Any]] | None) -> JobPlan:
    grown = _append(out, plan, table, chunk_size, world_size)
    # Captions read from sidecar files can change while the lists do not: then the lists are read on every run.
    rerun_inputs.record_lists(out, grown, None if table.sidecar_captions else lists)
    return grown


def _append(out: Path, plan: JobPlan, table: chunks.InputTable, chunk_size: int | None,
            world_size: int = 1) -> JobPlan:
    """The plan with the inputs it lacks added as one new part; the plan itself when there are none."""
    new = rerun_inputs.new_inputs(out, plan, table)
    if not len(new):
        return plan
    if plan.parts:
        log.info("%d new input(s): planned as part %d, the %d earlier part(s) stay as they are", len(new),
                 len(plan.parts), len(plan.parts))
    # A function of the new inputs and the world size alone: every task of the job agrees. The part records it, so
    # an output planned under an earlier rule resumes with its own chunk size.
    size = chunk_size or chunks.auto_chunk_size(len(new), world_size)
    part = chunks.make_part(out, len(plan.parts), table, new, size)
    grown = JobPlan(plan.fingerprint, plan.settings, plan.vae, [*plan.parts, part])
    # plan.json last: it names the part, whose files are in place by now.
    _writing(out / PLAN_FILE, write_text_atomic, out / PLAN_FILE, grown.to_json())
    pause_point("planned")  # test-only kill moment (see shards.PAUSE_ENV); nothing when unset
    return grown


def plan_chunks(out: Path, plan: JobPlan, settings: EncodeSettings, *, rank: int = 0, world_size: int = 1,
                probe_fn: Callable[[str], VideoInfo] | None = None, strict: bool = False,
                reencode_changed: bool = False) -> list[Plan]:
    """This rank's chunk plans, read from OUT/chunks/ or made now: it probes only its own share of the inputs.
    `strict`: the first input that cannot be probed raises (see `plan.make_plan`). An input changed since its chunk
    was planned is refused, or with `reencode_changed` its chunk is planned again (see `chunks.plan_share`)."""
    return chunks.plan_share(out, plan, chunks.chunks_for_rank(plan, rank, world_size), settings, probe_fn=probe_fn,
                             strict=strict, reencode_changed=reencode_changed)


Encoded = tuple[torch.Tensor, torch.Tensor, TilingSettings | None]


def _encode_batch(vae: VideoVAE, batch: list[tuple[PlannedClip, Clip]]
                  ) -> list[tuple[PlannedClip, Clip, Encoded | InputError]]:
    """Encode a batch in one call; if that fails (memory, non-finite latents), clip by clip so one bad clip or one
    huge clip never takes its batch-mates down with it."""
    if len(batch) > 1:
        try:
            mean, logvar = vae.encode(vae.stage([c.frames for _, c in batch]), sources=[p.source for p, _ in batch])
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
    if p.span is not None:
        # The key is made from the input's id (its path plus a digest of its spans); the source stays the path.
        meta["source"] = p.relpath.rpartition("#")[0]
        meta["span"], meta["span_index"] = p.span, p.span_index
    if p.extra:
        meta["row"] = p.extra  # the list row's other columns (a tar sample's json fields): scores, ids, licenses
    if tiling is not None:
        # This clip needed smaller tiles than the run's settings (out of memory): its latents differ slightly.
        meta["tiling_fallback"] = {"tile_height": tiling.tile_height, "tile_width": tiling.tile_width,
                                   "overlap": tiling.overlap, "reason": "out of memory"}
    return meta


def _stored(mean: torch.Tensor, logvar: torch.Tensor | None, settings: EncodeSettings
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What goes into the shard: `--store mean` drops the log-variance, `--store-dtype` casts."""
    dtype = None if settings.store_dtype == "encode" else DTYPES[settings.store_dtype]
    if dtype is not None:
        mean, logvar = mean.to(dtype), (None if logvar is None else logvar.to(dtype))
        if not (torch.isfinite(mean).all() and (logvar is None or torch.isfinite(logvar).all())):
            raise InputError("", "write", f"latents overflow --store-dtype {settings.store_dtype}; "
                             "store them in fp32 or bf16")
    return mean, (logvar if settings.store == "posterior" else None)


ImageCondition = tuple[torch.Tensor, torch.Tensor | None]


def _image_conditions(vae: VideoVAE, clips: list[tuple[PlannedClip, Clip]]
                      ) -> list[ImageCondition | InputError]:
    """`--image-latents`: each clip's first frame encoded as its family's I2V pipeline does, in one call, or clip
    by clip when that fails (memory, non-finite latents), so one clip's failure stays its own."""
    if len(clips) > 1:
        try:
            mean, logvar = vae.encode_image_condition(vae.stage([c.frames for _, c in clips]),
                                                      sources=[p.source for p, _ in clips])
            return [(mean[i], None if logvar is None else logvar[i]) for i in range(len(clips))]
        except Exception as e:
            if not (isinstance(e, InputError) or _is_oom(e)):
                raise
            log.warning("image conditions of a batch of %d failed (%s); encoding them one by one", len(clips), e)
        _release_memory(vae)
    results: list[ImageCondition | InputError] = []
    for p, c in clips:
        try:
            mean, logvar = vae.encode_image_condition(c.frames[None], sources=[p.source])
            results.append((mean[0], None if logvar is None else logvar[0]))
        except InputError as e:
            results.append(e)
        except Exception as e:
            if not _is_oom(e):
                raise
            _release_memory(vae)
            results.append(InputError(p.source, "encode", f"out of memory encoding the image condition ({e})"))
    return results


def _encode_clips(vae: VideoVAE, batch: list[tuple[PlannedClip, Clip]], plan: Plan, settings: EncodeSettings,
                  texts: TextEncoder | None) -> list[tuple[PlannedClip, EncodedClip | InputError]]:
    """One VAE batch (plus its image conditions and prompt embeddings): each clip's EncodedClip or its InputError."""
    if not batch:
        return []
    results = _encode_batch(vae, batch)
    # --image-latents: the I2V conditioning of the clips that encoded, batched the same way.
    done = [(p, c) for p, c, result in results if not isinstance(result, InputError)]
    conditions = iter(_image_conditions(vae, done) if settings.image_latents and done else [])
    out: list[tuple[PlannedClip, EncodedClip | InputError]] = []
    for p, c, result in results:
        if isinstance(result, InputError):
            out.append((p, result))
            continue
        mean, logvar, tiling = result
        image = next(conditions, None)
        if isinstance(image, InputError):
            out.append((p, image))
            continue
        try:
            mean, logvar = _stored(mean, logvar, settings)
            image = _stored(*image, settings) if image is not None else (None, None)
        except InputError as e:
            out.append((p, InputError(p.source, e.stage, e.reason)))
            continue
        # Prompt embeddings (`--text-encoder`), computed once per distinct caption by the encoder's cache.
        text = texts.embed(p.caption) if texts is not None else None
        out.append((p, EncodedClip(p.key, mean, logvar, _sample_meta(p, c, plan, tiling), p.caption, text, *image,
                                   text_trimmed=texts.trimmed if texts is not None else None)))
    return out


def encode_shard(shard: PlannedShard, plan: Plan, vae: VideoVAE, settings: EncodeSettings,
                 decoded: Iterator[tuple[PlannedClip, Clip | InputError]], on_clip: Callable[[int], None],
                 texts: TextEncoder | None = None, *, batch_size: int = 1,
                 strict: bool = False) -> tuple[list[EncodedClip], list[dict]]:
    """Encode one shard's clips on their own, taking them from `decoded` (a stream over them, in order),
    `batch_size` clips per VAE call; `strict`: the first failed clip raises. (`run` batches across the shards of
    one encode group instead: see `encode_groups`.)"""
    encoded: list[EncodedClip] = []
    failures: list[dict[str, Any]] = []
    batch: list[tuple[PlannedClip, Clip]] = []

    def fail(p: PlannedClip, error: InputError) -> None:
        failures.append(failure_record(error) | {"key": p.key})
        log.warning("%s: %s", error.path, error.reason)
        if strict:
            raise error

    def flush() -> None:
        for p, result in _encode_clips(vae, batch, plan, settings, texts):
            if isinstance(result, InputError):
                fail(p, result)
            else:
                encoded.append(result)
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
        if len(batch) >= batch_size:
            flush()
    flush()
    return encoded, failures


@dataclass(slots=True)
class EncodeGroup:
    """The consecutive shards of one bucket in one chunk: batches are fixed windows of `batch_size` over their keys
    taken together, so a batch crosses shard boundaries and what a batch holds is a function of the chunk plan and
    the batch size alone, never of which shards an earlier run finished (a rerun writes the same bytes)."""

    chunk: Plan
    shards: list[PlannedShard]
    pending: set[str]  # relpaths of the shards to write

    def windows(self, batch_size: int) -> list[list[str]]:
        """The windows that hold a key of a pending shard; those of finished shards only are not encoded again."""
        keys = [k for s in self.shards for k in s.keys]
        wanted = {k for s in self.shards if s.relpath in self.pending for k in s.keys}
        windows = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
        return [w for w in windows if wanted.intersection(w)]


def encode_groups(chunk_plans: list[Plan], out: Path, summary: RunSummary,
                  redo: frozenset[str] = frozenset()) -> list[EncodeGroup]:
    """This rank's encode groups that have a shard to write; counts the finished shards in `summary`. `redo`: the
    relpaths of done shards to write again all the same (damaged ones, `share_markers.damaged_shards`)."""
    groups: list[EncodeGroup] = []
    for chunk in chunk_plans:
        for shard in chunk.shards:
            if not groups or groups[-1].chunk is not chunk or groups[-1].shards[-1].bucket != shard.bucket:
                groups.append(EncodeGroup(chunk, [], set()))
            groups[-1].shards.append(shard)
            path = out / shard.relpath
            if shard.relpath in redo:
                summary.shards_repaired += 1
                log.warning("%s does not match the sha256 its sidecar recorded; writing it again", shard.relpath)
            elif read_done(path) is not None:
                summary.shards_skipped += 1
                summary.clips_skipped += len(shard.keys)
                continue
            # A temporary or a tar without a sidecar is the trace of a killed writer: start the shard over.
            elif remove_temporaries(path) or path.exists():
                summary.shards_redone += 1
                log.info("%s was left unfinished by an earlier run; writing it again", shard.relpath)
            groups[-1].pending.add(shard.relpath)
    return [g for g in groups if g.pending]


def run(out: Path, plan: JobPlan, vae: VideoVAE, settings: EncodeSettings, *, rank: int = 0, world_size: int = 1,
        on_clip: Callable[[int], None] = lambda n: None, texts: TextEncoder | None = None,
        chunk_plans: list[Plan] | None = None, runtime: RuntimeSettings | None = None,
        redo: frozenset[str] = frozenset()) -> RunSummary:
    """Produce every shard of this rank's chunks that is not already done; `on_clip` counts clips actually worked on.

    `chunk_plans`: this rank's chunk plans when the caller has them already (`plan_chunks`), else they are made here.
    `runtime`: batch size (None: from the clip size and the device's memory), decode workers, NVDEC, strictness;
    RuntimeSettings() when not given. `redo`: done shards to write again (`encode --repair`: the damaged ones).

    Batches are fixed windows over each encode group (`EncodeGroup`); shards are written by a background
    `ShardWriter`, so encoding goes on while the previous shard is built, hashed and written.
    """
    runtime = runtime or RuntimeSettings()
    summary = RunSummary()
    started = time.perf_counter()
    # Every process checks its own VAE against the plan: a node whose local copy of the weights differs refuses.
    changed = vae_change(plan.vae.get("identity"), vae.identity.to_dict(), str(out / PLAN_FILE))
    if changed:
        raise ConfigError(f"{out}: {changed}")
    if chunk_plans is None:
        chunk_plans = plan_chunks(out, plan, settings, rank=rank, world_size=world_size, strict=runtime.strict)
    groups = encode_groups(chunk_plans, out, summary, redo)
    workers = default_workers() if runtime.workers is None else runtime.workers
    batch_size = resolve_batch_size(runtime.batch_size, vae, settings)
    windows = [(g, g.windows(batch_size)) for g in groups]
    by_key: dict[str, PlannedClip] = {}
    carried: set[str] = set()  # clips of unchanged inputs kept by --reencode-changed: never decoded again
    for g in groups:
        by_key.update(g.chunk.clip_map())
        carried |= reencode.carry_keys(out, g.chunk)
    # One stream over all of this rank's windows, so decode workers run ahead across shard and group boundaries.
    # What each source was when its chunk was planned: a source that differs when it is decoded stops the run.
    recorded = decoded_identity.planned_stats(out, plan, [g.chunk for g in groups])
    decoded = iter(ClipStream([by_key[k] for _, ws in windows for w in ws for k in w if k not in carried],
                              settings.clip, recorded=recorded,
                              workers=workers, nvdec=runtime.nvdec, decode_check=runtime.decode_check,
                              held=batch_size))

    def write(shard: PlannedShard, encoded: list[EncodedClip], failures: list[dict[str, Any]]) -> Callable[[], None]:
        def job() -> None:
            path = out / shard.relpath
            # A full disk or a vanished mount names the file and stops the run; the rerun redoes just this shard.
            _writing(path, write_shard, path, encoded,
                     extra={"shard_id": shard.shard_id, "bucket": shard.bucket, "failures": failures,
                            "software": software})
            summary.shards_written += 1
            summary.clips_written += len(encoded)
            summary.failures.extend(failures)
        return job

    with cpu_threads(vae.device, runtime.cpu_threads), ShardWriter(depth=1) as writer:
        # In the sidecar, never in the tar: byte identity is promised within one software record, not across them.
        software = software_record(vae.device, text_encoder=texts is not None, batch_size=batch_size)
        for group, group_windows in windows:
            shard_of = {k: s for s in group.shards if s.relpath in group.pending for k in s.keys}
            results: dict[str, EncodedClip | InputError | reencode.Carried] = {}
            results.update(reencode.read_carry(out, group.chunk, carried.intersection(shard_of)))
            left = [s for s in group.shards if s.relpath in group.pending]
            for window in group_windows:
                batch: list[tuple[PlannedClip, Clip]] = []
                for expected_key in window:
                    if expected_key in carried:
                        continue
                    p, result = next(decoded)
                    if p.key != expected_key:
                        raise RuntimeError(f"decode stream out of order: got {p.key}, expected {expected_key}")
                    if isinstance(result, InputError):
                        if result.error_type == decoded_identity.ChangedWhileEncoding.__name__:
                            raise decoded_identity.stop(out, result)  # before any shard holds its latents
                        results[p.key] = result
                    else:
                        batch.append((p, result))
                for p, result in _encode_clips(vae, batch, group.chunk, settings, texts):
                    results[p.key] = result
                # Clips of a finished shard that share a window were encoded only to keep the batch as planned.
                for k in window:
                    if k not in shard_of:
                        results.pop(k, None)
                    elif isinstance(results[k], InputError):
                        error = results[k]
                        log.warning("%s: %s", error.path, error.reason)  # type: ignore[union-attr]
                        if runtime.strict:
                            raise error  # type: ignore[misc]
                on_clip(sum(1 for k in window if k in shard_of))
                # Every shard whose clips are all encoded goes to the writer, in plan order.
                while left and all(k in results for k in left[0].keys):
                    shard = left.pop(0)
                    mine = [results.pop(k) for k in shard.keys]
                    encoded = [r for r in mine if isinstance(r, EncodedClip | CarriedSample)]
                    failures = [r if isinstance(r, dict) else failure_record(r) | {"key": k}
                                for k, r in zip(shard.keys, mine, strict=True) if isinstance(r, InputError | dict)]
                    writer.submit(write(shard, encoded, failures))
    for chunk in chunk_plans:
        reencode.drop_carry(out, chunk)  # once its chunk is done (a rerun that finds nothing to do drops it too)
    summary.seconds = time.perf_counter() - started
    return summary


@contextmanager
def cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """torch's thread count for the encode on CPU (`--cpu-threads`), the caller's restored after. None: leave it
    (jobs/encode.py shares the cores among a machine's processes; one process uses them all)."""
    if device.type != "cpu" or threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_batch_size(batch_size: int | None, vae: VideoVAE, settings: EncodeSettings) -> int:
    """Clips per VAE call: as given, or for None (auto) from the clip size and the device's memory, the same on every
    run on the same machine."""
    if batch_size is not None:
        return batch_size
    clip = settings.clip
    # With --buckets (which replace --height/--width) the largest bucket, the one that needs the most memory.
    height, width = max(aspect_sizes(clip), key=lambda size: size[0] * size[1])
    return vae.auto_batch_size(clip.frames, height, width)


def pending_in_job(out: Path, plan: JobPlan) -> tuple[int, int]:
    """(shards not finished, chunks not planned yet) over the whole job: (0, 0) once it is done.

    Reads one chunk plan at a time, so it needs the memory of one chunk, not of the dataset."""
    shards, unplanned = 0, 0
    for ref in plan.chunk_refs():
        if not (out / ref.plan_name).is_file():
            unplanned += 1
            continue
        shards += len(pending_shards(out, chunks.read_chunk_plan(out, plan, ref).shards))
    return shards, unplanned


def finalize(out: Path) -> dict[str, Any]:
    """Merge the sidecars into manifest.json and failures.jsonl, checking that every planned clip is there once."""
    return finalize_with_outcome(out)[0]


def finalize_with_outcome(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`finalize`, plus what the run did (videos, skips and failures by reason), counted chunk by chunk."""
    plan_path = out / PLAN_FILE
    if not plan_path.is_file():
        raise ShardFormatError(f"{out}: no {PLAN_FILE}; run `latentcache encode` into it first")
    plan = chunks.read_job_plan(out)
    remove_stale_temporaries(out)
    shards: list[dict[str, Any]] = []
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
            shards.append({"path": shard.relpath, "bucket": shard.bucket, "samples": record["samples"],
                           "bytes": record["bytes"], "sha256": record["sha256"]})
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
    _writing(out / "failures.jsonl", write_text_atomic, out / "failures.jsonl", failures_text)
    buckets: dict[str, int] = {}
    for s in shards:
        buckets[s["bucket"]] = buckets.get(s["bucket"], 0) + s["samples"]
    counted = tally(failures)
    manifest = {
        "latent_spec": plan.vae["spec"],
        "vae": plan.vae["identity"],
        "dtype": plan.vae["dtype"],
        "settings": plan.settings,
        "fingerprint": plan.fingerprint,
        "counts": {"samples": samples, "shards": len(shards), "planned_clips": planned_clips,
                   "skipped": counted.skipped_total, "failed": counted.failed_total,
                   "skipped_by_reason": dict(counted.skipped.most_common()),
                   "failed_by_reason": dict(counted.failed.most_common())},
        "buckets": buckets,
        "shards": shards,
        # Each distinct software record of the processes that wrote the shards, with their shard counts.
        "software": merge_software(software),
    }
    _writing(out / "manifest.json", write_manifest, out, manifest)
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
