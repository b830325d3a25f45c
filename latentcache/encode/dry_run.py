"""`latentcache encode --dry-run`: what a run would do, before a week of device time is committed to it.

It plans exactly as a run does (the same input readers, the same probes in parallel, the same clip rules), but into
a temporary directory that is removed afterwards, so nothing is written into --out and a later real run starts
from scratch with whatever settings it is given. With `--estimate N` it also decodes and encodes the first N
planned clips on this device and extrapolates the encode time of the whole run.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from latentcache.encode import chunks
from latentcache.encode.chunk_plan import ChunkPlan, PlannedClip, clip_settings_for
from latentcache.encode.job_plan import JobPlan, read_job_plan
from latentcache.encode.models.vae import DTYPES, VideoVAE
from latentcache.encode.settings import EncodeSettings, JobSettings
from latentcache.format.buckets import Bucket
from latentcache.format.outcomes import Tally, tally

# A sample's tar members besides the latents (JSON meta, tar headers, the caption), and a shard's end-of-archive
# record and block padding: measured on tiny shards (343 KB estimated, 340 KB then written).
SAMPLE_OVERHEAD_BYTES = 3 * 1024
SHARD_OVERHEAD_BYTES = 10 * 1024


@dataclass(slots=True)
class DryRun:
    """What a run of these settings over these inputs would write."""

    inputs: int = 0
    clips_per_bucket: Counter[str] = field(default_factory=Counter)
    outcomes: Tally = field(default_factory=Tally)
    bytes_per_bucket: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    # --estimate: seconds per clip measured here, and the whole run's device-hours extrapolated from them.
    estimated_clips: int = 0
    decode_seconds_per_clip: float | None = None
    encode_seconds_per_clip: float | None = None
    # On an existing output: the inputs it holds already; the counts above are then what an append would add.
    existing_inputs: int | None = None

    @property
    def clips(self) -> int:
        return sum(self.clips_per_bucket.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_per_bucket.values())

    def lines(self, out: object, device: str) -> list[str]:
        rows = [f"dry run: nothing was written to {out}"]
        if self.existing_inputs is not None:
            rows.append(f"{out} holds {self.existing_inputs} input(s) already; a run would add {self.inputs} new "
                        "input(s) (an append), described below" if self.inputs else
                        f"{out} holds {self.existing_inputs} input(s) already; a run would add none")
        rows.append(f"inputs: {self.inputs}; clips: {self.clips} in {self.shards} shard(s); "
                    f"{self.outcomes.describe()}")
        for bucket, n in sorted(self.clips_per_bucket.items()):
            rows.append(f"  bucket {bucket}: {n} clip(s), about {_size(self.bytes_per_bucket[bucket])}")
        rows.append(f"estimated output: about {_size(self.total_bytes)} (latents as stored, without prompt "
                    "embeddings)")
        if self.encode_seconds_per_clip is not None:
            hours = self.clips * self.encode_seconds_per_clip / 3600
            rows.append(f"estimate from {self.estimated_clips} clip(s) on {device}: encode "
                        f"{self.encode_seconds_per_clip:.3f} s/clip, decode {self.decode_seconds_per_clip:.3f} "
                        f"CPU-s/clip; the whole run: about {hours:.2f} device-hours of encoding on one such device "
                        "(divide by the number of devices; batching and decode workers make a real run faster "
                        "per clip than this clip-by-clip measure)")
        return rows


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def sample_bytes(vae: VideoVAE, settings: EncodeSettings, bucket: str) -> int:
    """Bytes one sample of `bucket` takes in a shard: the stored latents (mean, and logvar for --store posterior),
    the image-to-video condition if cached, and the members around them."""
    b = Bucket.parse(bucket)
    channels, frames, height, width = vae.spec.latent_shape(b.frames, b.height, b.width)
    itemsize = (vae.dtype if settings.store_dtype == "encode" else DTYPES[settings.store_dtype]).itemsize
    copies = 2 if settings.store == "posterior" else 1
    latents = channels * frames * height * width * itemsize * copies
    image = channels * height * width * itemsize * copies if settings.image_latents else 0
    return latents + image + SAMPLE_OVERHEAD_BYTES


def dry_run(settings: JobSettings, vae: VideoVAE, *, estimate: int = 0, world_size: int = 1) -> DryRun:
    """Plan `settings` over their inputs in a temporary directory and describe the run; --out is only read.
    `world_size`: the process count the run will have, which the default chunking (and so the shards) follows."""
    from latentcache.encode import planning
    from latentcache.encode.inputs import iter_inputs

    encode = settings.encode
    result = DryRun()
    with tempfile.TemporaryDirectory(prefix="latentcache-dry-run-") as tmp:
        scratch = Path(tmp) / "out"
        before = _seed_from_output(settings.out, scratch) if not settings.overwrite else None
        inputs = iter_inputs(settings.inputs, exclude=[settings.out], images=encode.clip.images)
        plan = planning.load_or_make_plan(scratch, inputs, encode, vae, chunk_size=settings.chunk_size,
                                          world_size=world_size)
        # On an existing output only the parts this run would add are planned (probed): what an append adds.
        refs = [r for r in plan.chunk_refs() if before is None or r.part >= len(before.parts)]
        chunk_plans = chunks.plan_share(scratch, plan, refs, encode)
    result.inputs = plan.inputs - (before.inputs if before is not None else 0)
    result.existing_inputs = before.inputs if before is not None else None
    result.outcomes = tally(r for chunk in chunk_plans for r in chunk.rejected)
    shards_per_bucket: Counter[str] = Counter()
    for chunk in chunk_plans:
        result.shards += len(chunk.shards)
        shards_per_bucket.update(s.bucket for s in chunk.shards)
        result.clips_per_bucket.update(c.bucket for c in chunk.clips)
    result.bytes_per_bucket = {b: n * sample_bytes(vae, encode, b) + shards_per_bucket[b] * SHARD_OVERHEAD_BYTES
                               for b, n in result.clips_per_bucket.items()}
    if estimate > 0:
        _estimate(result, chunk_plans, vae, encode, estimate)
    return result


def _seed_from_output(out: Path, scratch: Path) -> JobPlan | None:
    """An existing local output's plan, with links to its inputs files, in `scratch`: planning there appends exactly
    what a real run would, and reads --out without writing to it. None for a new output (or one in object
    storage, planned as new)."""
    from latentcache.format.out_layout import INPUTS_DIR, PLAN_FILE, TMP_SUFFIX
    from latentcache.storage import location

    if not location.linkable(out) or not (out / PLAN_FILE).is_file():
        return None
    plan = read_job_plan(out)
    (scratch / INPUTS_DIR).mkdir(parents=True)
    (scratch / PLAN_FILE).write_bytes((out / PLAN_FILE).read_bytes())
    for f in (out / INPUTS_DIR).iterdir():
        if f.is_file() and not f.name.endswith(TMP_SUFFIX):
            (scratch / INPUTS_DIR / f.name).symlink_to(f.resolve())
    return plan


def _estimate(result: DryRun, chunk_plans: list[ChunkPlan], vae: VideoVAE, settings: EncodeSettings, n: int) -> None:
    """Decode and encode up to `n` planned clips one at a time (the first is a warm-up, not counted, when there are
    more), timing each stage."""
    from latentcache.encode.decoding.decode import decode_clip
    from latentcache.errors import InputError

    clips: list[PlannedClip] = [c for chunk in chunk_plans for c in chunk.clips][: n + 1 if n > 1 else n]
    decode_s = encode_s = 0.0
    timed = 0
    for i, p in enumerate(clips):
        started = time.process_time()
        try:
            clip = decode_clip(p.source, p.start, clip_settings_for(p.bucket, settings.clip), key=p.key)
        except InputError:
            continue
        decoded = time.process_time()
        wall = time.perf_counter()
        vae.encode(clip.frames[None], sources=[p.source])
        if vae.device.type == "cuda":
            import torch

            torch.cuda.synchronize(vae.device)
        if i == 0 and len(clips) > 1:
            continue  # the warm-up: first-call allocations and kernel selection
        decode_s += decoded - started
        encode_s += time.perf_counter() - wall
        timed += 1
    if timed:
        result.estimated_clips = timed
        result.decode_seconds_per_clip = decode_s / timed
        result.encode_seconds_per_clip = encode_s / timed

