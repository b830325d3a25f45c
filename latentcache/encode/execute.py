"""Executing: for each shard this process owns, decode -> encode -> write, batched across the shards of a group.

Where a process runs (a plain loop, `accelerate launch`, a SLURM array task) only changes `rank` and `world_size`.
One error policy lives here: an `InputError` from any stage becomes a failure record in the shard's sidecar (and
later `failures.jsonl`) plus a log line, and the run goes on; anything else is a bug and propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentcache.encode import reencode
from latentcache.encode.chunk_plan import ChunkPlan, PlannedClip, PlannedShard, failure_record
from latentcache.encode.decoding import decoded_identity
from latentcache.encode.decoding.frames import Clip
from latentcache.encode.decoding.loader import ClipStream, default_workers
from latentcache.encode.job_plan import JobPlan
from latentcache.encode.models.memory import encode_with_fallback, is_out_of_memory, release_cached_memory
from latentcache.encode.models.provenance import software_record, vae_change
from latentcache.encode.models.text import TextEncoder
from latentcache.encode.models.vae import DTYPES, VideoVAE
from latentcache.encode.output import write_naming_path
from latentcache.encode.planning import plan_chunks
from latentcache.encode.settings import EncodeSettings, RuntimeSettings, TilingSettings, aspect_sizes
from latentcache.encode.writer import ShardWriter
from latentcache.errors import ConfigError, InputError
from latentcache.format.out_layout import PLAN_FILE
from latentcache.format.shards import CarriedSample, EncodedClip, read_done, remove_temporaries, write_shard

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


Encoded = tuple[torch.Tensor, torch.Tensor, TilingSettings | None]


def _encode_batch(vae: VideoVAE, batch: list[tuple[PlannedClip, Clip]]
                  ) -> list[tuple[PlannedClip, Clip, Encoded | InputError]]:
    """Encode a batch in one call; if that fails (memory, non-finite latents), clip by clip so one bad clip or one
    huge clip never takes its batch-mates down with it."""
    if len(batch) > 1:
        try:
            mean, logvar = vae.encode(vae.stage([c.frames for _, c in batch]), sources=[p.source for p, _ in batch])
        except Exception as e:
            if not (isinstance(e, InputError) or is_out_of_memory(e)):
                raise
            log.warning("batch of %d failed (%s); encoding its clips one by one", len(batch), e)
        else:
            return [(p, c, (mean[i], logvar[i], None)) for i, (p, c) in enumerate(batch)]
        release_cached_memory(vae)  # out of the except block, once the failed call's frames are gone
    results: list[tuple[PlannedClip, Clip, Encoded | InputError]] = []
    for p, c in batch:
        try:
            mean, logvar, tiling = encode_with_fallback(vae, c.frames[None], [p.source])
            results.append((p, c, (mean[0], logvar[0], tiling)))
        except InputError as e:
            results.append((p, c, e))
    return results


def _sample_meta(p: PlannedClip, clip: Clip, chunk_plan: ChunkPlan, tiling: TilingSettings | None) -> dict[str, Any]:
    # frames_decoded measures the decode's cost (it differs between CPU and NVDEC decoding), not the sample: it stays
    # out of the shard so any decoder writes the same bytes.
    kept = {k: v for k, v in clip.meta.items() if k != "frames_decoded"}
    meta = {**kept, "key": p.key, "source": p.relpath, "clip_index": p.index, "bucket": p.bucket,
            "caption_source": "given" if p.caption is not None else None,
            "vae": chunk_plan.vae["identity"], "dtype": chunk_plan.vae["dtype"]}
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
            if not (isinstance(e, InputError) or is_out_of_memory(e)):
                raise
            log.warning("image conditions of a batch of %d failed (%s); encoding them one by one", len(clips), e)
        release_cached_memory(vae)
    results: list[ImageCondition | InputError] = []
    for p, c in clips:
        try:
            mean, logvar = vae.encode_image_condition(c.frames[None], sources=[p.source])
            results.append((mean[0], None if logvar is None else logvar[0]))
        except InputError as e:
            results.append(e)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            release_cached_memory(vae)
            results.append(InputError(p.source, "encode", f"out of memory encoding the image condition ({e})"))
    return results


def _encode_clips(vae: VideoVAE, batch: list[tuple[PlannedClip, Clip]], chunk_plan: ChunkPlan, settings: EncodeSettings,
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
        out.append((p, EncodedClip(p.key, mean, logvar, _sample_meta(p, c, chunk_plan, tiling), p.caption, text, *image,
                                   text_trimmed=texts.trimmed if texts is not None else None)))
    return out


@dataclass(slots=True)
class EncodeGroup:
    """The consecutive shards of one bucket in one chunk: batches are fixed windows of `batch_size` over their keys
    taken together, so a batch crosses shard boundaries and what a batch holds is a function of the chunk plan and
    the batch size alone, never of which shards an earlier run finished (a rerun writes the same bytes)."""

    chunk: ChunkPlan
    shards: list[PlannedShard]
    pending: set[str]  # relpaths of the shards to write

    def windows(self, batch_size: int) -> list[list[str]]:
        """The windows that hold a key of a pending shard; those of finished shards only are not encoded again."""
        keys = [k for s in self.shards for k in s.keys]
        wanted = {k for s in self.shards if s.relpath in self.pending for k in s.keys}
        windows = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
        return [w for w in windows if wanted.intersection(w)]


def encode_groups(chunk_plans: list[ChunkPlan], out: Path, summary: RunSummary,
                  redo: frozenset[str] = frozenset()) -> list[EncodeGroup]:
    """This rank's encode groups that have a shard to write; counts the finished shards in `summary`. `redo`: the
    relpaths of done shards to write again all the same (damaged ones, `finalize.damaged_shards`)."""
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


def run(out: Path, job_plan: JobPlan, vae: VideoVAE, settings: EncodeSettings, *, rank: int = 0, world_size: int = 1,
        on_clip: Callable[[int], None] = lambda n: None, texts: TextEncoder | None = None,
        chunk_plans: list[ChunkPlan] | None = None, runtime: RuntimeSettings | None = None,
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
    changed = vae_change(job_plan.vae.get("identity"), vae.identity.to_dict(), str(out / PLAN_FILE))
    if changed:
        raise ConfigError(f"{out}: {changed}")
    if chunk_plans is None:
        chunk_plans = plan_chunks(out, job_plan, settings, rank=rank, world_size=world_size, strict=runtime.strict)
    groups = encode_groups(chunk_plans, out, summary, redo)
    batch_size = resolve_batch_size(runtime.batch_size, vae, settings)
    windows = [(g, g.windows(batch_size)) for g in groups]
    carried: set[str] = set()  # clips of unchanged inputs kept by --reencode-changed: never decoded again
    for g in groups:
        carried |= reencode.carry_keys(out, g.chunk)
    decoded = _decode_stream(out, job_plan, windows, carried, settings, runtime, batch_size)
    with cpu_threads(vae.device, runtime.cpu_threads), ShardWriter(depth=1) as writer:
        # In the sidecar, never in the tar: byte identity is promised within one software record, not across them.
        software = software_record(vae.device, text_encoder=texts is not None, batch_size=batch_size)

        def submit(shard: PlannedShard, encoded: list[EncodedClip], failures: list[dict[str, Any]]) -> None:
            writer.submit(_write_job(out, shard, encoded, failures, software, summary))

        encoder = _GroupEncoder(out, vae, settings, texts, runtime.strict, on_clip, decoded, carried, submit)
        for group, group_windows in windows:
            encoder.encode(group, group_windows)
    for chunk in chunk_plans:
        reencode.drop_carry(out, chunk)  # once its chunk is done (a rerun that finds nothing to do drops it too)
    summary.seconds = time.perf_counter() - started
    return summary


def _decode_stream(out: Path, job_plan: JobPlan, windows: list[tuple[EncodeGroup, list[list[str]]]], carried: set[str],
                   settings: EncodeSettings, runtime: RuntimeSettings, batch_size: int
                   ) -> Iterator[tuple[PlannedClip, Clip | InputError]]:
    """One stream over all of this rank's windows, so decode workers run ahead across shard and group boundaries."""
    by_key: dict[str, PlannedClip] = {}
    for g, _ in windows:
        by_key.update(g.chunk.clip_map())
    workers = default_workers() if runtime.workers is None else runtime.workers
    # What each source was when its chunk was planned: a source that differs when it is decoded stops the run.
    recorded = decoded_identity.planned_stats(out, job_plan, [g.chunk for g, _ in windows])
    return iter(ClipStream([by_key[k] for _, ws in windows for w in ws for k in w if k not in carried],
                           settings.clip, recorded=recorded,
                           workers=workers, nvdec=runtime.nvdec, decode_check=runtime.decode_check,
                           held=batch_size))


def _write_job(out: Path, shard: PlannedShard, encoded: list[EncodedClip], failures: list[dict[str, Any]],
               software: dict[str, Any], summary: RunSummary) -> Callable[[], None]:
    """The background writer's job for one shard: the tar and its sidecar, then the shard is counted as written."""
    def job() -> None:
        path = out / shard.relpath
        # A full disk or a vanished mount names the file and stops the run; the rerun redoes just this shard.
        write_naming_path(path, write_shard, path, encoded,
                 extra={"shard_id": shard.shard_id, "bucket": shard.bucket, "failures": failures,
                        "software": software})
        summary.shards_written += 1
        summary.clips_written += len(encoded)
        summary.failures.extend(failures)
    return job


@dataclass(slots=True)
class _GroupEncoder:
    """Encodes the windows of each encode group from the one decode stream, and hands every shard whose clips are
    all encoded (or failed, or carried over) to `submit`, in plan order."""

    out: Path
    vae: VideoVAE
    settings: EncodeSettings
    texts: TextEncoder | None
    strict: bool
    on_clip: Callable[[int], None]
    decoded: Iterator[tuple[PlannedClip, Clip | InputError]]
    carried: set[str]
    submit: Callable[[PlannedShard, list[EncodedClip], list[dict[str, Any]]], None]

    def encode(self, group: EncodeGroup, group_windows: list[list[str]]) -> None:
        out, carried = self.out, self.carried
        shard_of = {k: s for s in group.shards if s.relpath in group.pending for k in s.keys}
        results: dict[str, EncodedClip | InputError | reencode.Carried] = {}
        results.update(reencode.read_carry(out, group.chunk, carried.intersection(shard_of)))
        left = [s for s in group.shards if s.relpath in group.pending]
        for window in group_windows:
            batch = self._decoded_batch(window, results)
            for p, result in _encode_clips(self.vae, batch, group.chunk, self.settings, self.texts):
                results[p.key] = result
            # Clips of a finished shard that share a window were encoded only to keep the batch as planned.
            for k in window:
                if k not in shard_of:
                    results.pop(k, None)
                elif isinstance(results[k], InputError):
                    error = results[k]
                    log.warning("%s: %s", error.path, error.reason)  # type: ignore[union-attr]
                    if self.strict:
                        raise error  # type: ignore[misc]
            self.on_clip(sum(1 for k in window if k in shard_of))
            # Every shard whose clips are all encoded goes to the writer, in plan order.
            while left and all(k in results for k in left[0].keys):
                shard = left.pop(0)
                mine = [results.pop(k) for k in shard.keys]
                encoded = [r for r in mine if isinstance(r, EncodedClip | CarriedSample)]
                failures = [r if isinstance(r, dict) else failure_record(r) | {"key": k}
                            for k, r in zip(shard.keys, mine, strict=True) if isinstance(r, InputError | dict)]
                self.submit(shard, encoded, failures)

    def _decoded_batch(self, window: list[str], results: dict[str, Any]) -> list[tuple[PlannedClip, Clip]]:
        """The window's decoded clips, taken from the stream in order; a clip that failed to decode goes into
        `results` as its InputError. A source changed since it was planned stops the run."""
        batch: list[tuple[PlannedClip, Clip]] = []
        for expected_key in window:
            if expected_key in self.carried:
                continue
            p, result = next(self.decoded)
            if p.key != expected_key:
                raise RuntimeError(f"decode stream out of order: got {p.key}, expected {expected_key}")
            if isinstance(result, InputError):
                if result.error_type == decoded_identity.ChangedWhileEncoding.__name__:
                    raise decoded_identity.stop(self.out, result)  # before any shard holds its latents
                results[p.key] = result
            else:
                batch.append((p, result))
        return batch


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
