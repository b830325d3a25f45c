"""The work, as data: inputs -> probed videos -> clips -> shards.

The plan is a pure function of the inputs and the settings. Ranks, accelerate and SLURM only decide which shard ids a
process takes (`job_plan.chunks_for_rank`); any process can produce any shard, and produces the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from latentcache.encode.decoding.probing import VideoInfo, probe
from latentcache.encode.settings import ClipSettings, EncodeSettings, aspect_sizes, hash_json, parse_strategy
from latentcache.errors import ConfigError, InputError
from latentcache.format.buckets import Bucket, FrameRule
from latentcache.format.out_layout import shard_name
from latentcache.format.outcomes import make_record

if TYPE_CHECKING:
    from latentcache.format.spec import LatentSpec

log = logging.getLogger(__name__)

@dataclass(slots=True, frozen=True)
class InputVideo:
    path: str  # absolute, or a tar member as `sources` names it ("/d/00003.tar::000031.mp4")
    relpath: str  # relative to the input root it was found under: the stable part of every key
    # One caption, or one per span (Panda-70M's tables caption each span).
    caption: str | tuple[str | None, ...] | None = None
    # Clip bounds from a list: (start, end) seconds, end None = to the video's end. Clips are taken inside each span
    # and never cross one. None: the whole video.
    spans: tuple[tuple[float, float | None], ...] | None = None
    # The row's other columns (a tar sample's json fields), carried into each sample's JSON as "row".
    extra: dict[str, Any] | None = None
    # "videos.csv row 12": where a span problem is reported (rows with spans only).
    origin: str | None = None
    # A list row's caption read from NAME.txt beside its video: a file the list's own identity does not cover, so
    # the list is read again on every run (never written to the inputs files; not part of equality).
    caption_from_sidecar: bool = field(default=False, compare=False)


def input_id(video: InputVideo) -> str:
    """What an input's keys are made from: its relative path, plus a digest of its spans when a list gives them.

    Two rows naming one video with different spans are two inputs with distinct keys; the same row twice is one.
    The digest is of the span values, never of the row's position, so reordering or extending a list keeps keys."""
    if video.spans is None:
        return video.relpath
    return f"{video.relpath}#{spans_digest(video.spans)}"


def spans_digest(spans: Iterable[Iterable[float | None]]) -> str:
    canonical = json.dumps([[_canonical_time(t) for t in span] for span in spans], separators=(",", ":"))
    return hashlib.sha1(canonical.encode()).hexdigest()[:12]


def _canonical_time(t: float | None) -> float | None:
    return None if t is None else round(float(t), 6)


@dataclass(slots=True)
class PlannedClip:
    key: str
    source: str
    relpath: str  # the input's id (`input_id`): its relative path, plus "#<spans digest>" for a row with spans
    index: int  # counted over all of the input's spans
    start: float
    bucket: str
    caption: str | None = None
    span: list[float] | None = None  # [start, end] seconds of the span the clip lies in
    span_index: int | None = None
    extra: dict[str, Any] | None = None  # the row's other columns


@dataclass(slots=True)
class PlannedShard:
    shard_id: int
    bucket: str
    keys: list[str]
    # Set for the shards of a chunk plan (see chunks.py): shard_id is then the shard's index within its chunk.
    part: int | None = None
    chunk: int | None = None

    @property
    def relpath(self) -> str:
        return shard_name(self.bucket, self.shard_id, self.part, self.chunk)


@dataclass(slots=True)
class ChunkPlan:
    """One chunk's plan: its clips laid out in bucket-pure shards, and the inputs it rejected. The whole job's plan
    (plan.json) is `job_plan.JobPlan`; each chunk plan is written as chunks.py says."""

    fingerprint: str
    settings: dict[str, Any]
    vae: dict[str, Any]
    clips: list[PlannedClip]
    shards: list[PlannedShard]
    # Inputs that could not even be probed, or gave no clip: recorded once, by the process that plans.
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def clip_map(self) -> dict[str, PlannedClip]:
        return {c.key: c for c in self.clips}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, allow_nan=False)
































































def clip_key(relpath: str, index: int) -> str:
    """Deterministic, dot-free (webdataset splits keys on dots), the same on every machine."""
    digest = hashlib.sha1(relpath.encode()).hexdigest()[:16]
    return f"{digest}_{index:04d}"


def clip_starts(duration: float, clip: ClipSettings, salt: str = "") -> list[float]:
    """Start times (seconds) of the clips taken from a video of `duration` seconds; [] when no clip fits.

    A clip fits when its last target time falls strictly inside the video (a frame is on screen there).
    Deterministic: the same duration and settings give the same starts on every machine; `random:K` draws from a
    generator seeded by `clip.seed` and `salt` (the video's relative path), so each video gets its own draw.
    """
    kind, arg = parse_strategy(clip.strategy)
    span = (clip.frames - 1) / clip.fps
    room = duration - span  # the latest start is just before this
    if room <= 0:
        return []
    if kind == "first":
        return [0.0]
    if kind == "uniform":
        k = int(arg)
        if k == 1:
            return [round(room / 2, 6)]
        # Spread from 0 to just before `room` (0.999: the last start must stay strictly inside).
        return [round(room * i / (k - 1) * 0.999, 6) for i in range(k)]
    if kind == "random":
        digest = hashlib.sha256(f"{clip.seed}:{salt}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        return sorted(round(rng.random() * room * 0.999, 6) for _ in range(int(arg)))
    # "all": back to back without overlap, one target period apart; "sliding": every `arg` seconds.
    stride = arg if kind == "sliding" else span + 1.0 / clip.fps
    n = int(room / stride) + 1
    if n > _MAX_CLIPS_PER_VIDEO:
        # Broken timestamps (a few KB claiming years) would otherwise plan millions of clips and exhaust memory.
        raise ValueError(f"{n} clips of {span:.2f}s in {duration:.0f}s: more than {_MAX_CLIPS_PER_VIDEO} from one "
                         "video; its duration is not believable")
    return [round(i * stride, 6) for i in range(n) if i * stride < room - 1e-9]


def clip_settings_for(bucket: str, clip: ClipSettings) -> ClipSettings:
    """The clip settings a planned clip is decoded with: its own bucket's frames and size, the rest shared (its frame
    buckets, a planning choice already made, are dropped: they need not fit the bucket's shorter frame count)."""
    b = Bucket.parse(bucket)
    return dataclasses.replace(clip, frames=b.frames, height=b.height, width=b.width, frame_buckets=())


def nearest_size(width: int, height: int, clip: ClipSettings) -> tuple[int, int]:
    """The aspect bucket (height, width) nearest the displayed aspect of a width x height video (first on ties)."""
    aspect = math.log(width / height)
    return min(aspect_sizes(clip), key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def check_fits_vae(clip: ClipSettings, spec: LatentSpec) -> None:
    """Refuse frame counts and sizes the VAE cannot encode exactly (--frames, --height/--width, --frame-buckets,
    --buckets), offering the nearest valid values: once a run, before any video is probed (job.py calls it, from the
    VAE's config before it loads where that can be read, else once it is loaded). What cannot work whatever the VAE
    (a strategy, a bucket's spelling, a frame bucket longer than --frames) the settings refuse when they are made."""
    spec.check_clip(clip)
    check_buckets(clip, spec.to_dict())


def check_buckets(clip: ClipSettings, spec: dict[str, Any] | None) -> None:
    """Refuse aspect and frame buckets the VAE cannot encode exactly, as `--frames/--height/--width` are.

    `spec` is the VAE's latent spec (temporal and spatial compression); None: nothing to check against.
    """
    sizes = aspect_sizes(clip)
    if not spec:
        return
    k, s = int(spec.get("temporal_compression", 1)), int(spec.get("spatial_compression", 1))
    rule = FrameRule.parse(spec["frame_rule"]) if spec.get("frame_rule") else FrameRule(k)
    for f in clip.frame_buckets:
        nearest = rule.nearest(f)
        if nearest is not None:
            raise ConfigError(f"--frame-buckets {f} does not fit the VAE, which needs {rule} frames; "
                              f"nearest valid: {nearest[0]} or {nearest[1]}")
    if clip.buckets:
        for h, w in sizes:
            for name, v in (("height", h), ("width", w)):
                if v < s or v % s:
                    lower = max(s, v // s * s)
                    raise ConfigError(f"--buckets {h}x{w}: the {name} {v} is not a multiple of the VAE's spatial "
                                      f"compression {s}; nearest valid: {lower} or {lower + s}")


# One video never gives more clips than this (2 s clips back to back over 23 days): a bound that holds even where
# the frame count is unknown.
_MAX_CLIPS_PER_VIDEO = 1_000_000
# A stream whose frames are shown longer than this on average has broken timestamps (a bad remux, 32-bit wrap):
# no camera, screen recorder or slideshow export holds each frame for two minutes.
_MAX_FRAME_PERIOD = 120.0


def _distinct_starts(starts: list[float], period: float) -> list[float]:
    """The starts that begin on different source frames: two clips starting on the same frame take the same frames
    (uniform:3 on a 2-frame video would plan the same clip twice). `period` 0: unknown, keep all."""
    if period <= 0:
        return starts
    kept, seen = [], set()
    for s in starts:
        frame = int(s / period + 1e-6)
        if frame not in seen:
            seen.add(frame)
            kept.append(s)
    return kept


def plan_video(info: VideoInfo, clip: ClipSettings, salt: str = "") -> tuple[str, list[float]]:
    """The bucket and clip starts for one probed video. Raises InputError (skipped) when no clip fits.

    A video too short for `clip.frames` falls back to the largest frame bucket that fits, then to the short policy:
    "pad" takes one clip of the smallest frame count from the start (decode repeats the last frame, recorded in
    the clip's `padded_frames`), "skip" reports it.
    """
    height, width = nearest_size(info.width, info.height, clip)
    if info.source_kind == "image":
        # A still image (--images) is one 1-frame clip, in its own frame bucket beside the videos' aspect bucket.
        return str(Bucket(1, height, width)), [0.0]
    # Where the stream's frames are counted, the average time each is shown; else the stream's frame period.
    period = info.duration / info.frames if info.frames else 1.0 / info.fps if info.fps > 0 else 0.0
    if period > _MAX_FRAME_PERIOD:
        raise InputError(info.path, "plan",
                         f"broken timestamps: the stream claims {info.duration:.0f}s for {info.frames} frames (one "
                         f"every {period:.0f}s), which would plan clips of one frame repeated; remux it with fresh "
                         "timestamps (ffmpeg -i IN -c copy -fflags +genpts OUT) or drop it")
    fallbacks = sorted((f for f in clip.frame_buckets if f < clip.frames), reverse=True)
    for frames in (clip.frames, *fallbacks):
        try:
            # Its frame buckets dropped: the settings refuse a frame bucket longer than their frames.
            starts = clip_starts(info.duration, dataclasses.replace(clip, frames=frames, frame_buckets=()), salt)
        except ValueError as e:
            raise InputError(info.path, "plan", f"broken timestamps: {e}") from None
        if starts:
            return str(Bucket(frames, height, width)), _distinct_starts(starts, period)
    smallest = min((clip.frames, *fallbacks))
    if clip.short == "pad":
        return str(Bucket(smallest, height, width)), [0.0]
    need = (smallest - 1) / clip.fps
    raise InputError(info.path, "plan",
                     f"too short: {info.duration:.2f}s, a clip of {smallest} frames at {clip.fps:g} fps needs more "
                     f"than {need:.2f}s (use --short pad, fewer --frames or --frame-buckets)", skipped=True)


# Span times are taken as exact to the millisecond (Panda-70M writes H:MM:SS.mmm): clips keep this far inside a
# span, so a scene cut rounded to the millisecond never puts the other shot's frame into a clip.
_SPAN_GUARD = 0.001


def _span_bounds(span: tuple[float, float | None], info: VideoInfo) -> list[float]:
    """[start, end] of a span, its open end (None) closed at the video's end."""
    start, end = span
    return [round(start, 6), round(min(info.duration, end) if end is not None else info.duration, 6)]


def plan_spans(info: VideoInfo, clip: ClipSettings, video: InputVideo) -> list[tuple[str, float, int]]:
    """(bucket, start, span index) of each clip of a row with spans: the clip strategy applied inside each span.

    A clip never crosses its span's end (a scene cut in Panda-70M's tables). A span that does not fit the video (end
    before start, past the video's end) fails the whole row: its times do not belong to this file. A span too short
    for a clip is skipped; a row none of whose spans holds a clip is one "too short" skip. `--short pad` pads only
    a span that runs to the video's end: anywhere else the frames after it belong to another shot.
    """
    spans = video.spans or ()
    row = f" ({video.origin})" if video.origin else ""
    if info.source_kind == "image":
        raise InputError(video.path, "plan", f"bad span: a still image has no time to take spans from{row}")
    if not spans:
        raise InputError(video.path, "plan", f"bad span: the row lists no spans{row}")
    if isinstance(video.caption, tuple) and len(video.caption) != len(spans):
        raise InputError(video.path, "plan", f"bad span: {len(video.caption)} captions for {len(spans)} spans{row}")
    period = info.duration / info.frames if info.frames else 1.0 / info.fps if info.fps > 0 else 0.0
    for k, (start, end) in enumerate(spans):
        shown = f"span {k} [{start:.3f}, {'end' if end is None else f'{end:.3f}'}]"
        if start < 0 or (end is not None and end <= start):
            raise InputError(video.path, "plan", f"bad span: {shown} ends before it starts{row}")
        # A frame's worth of slack: tables round times, and a video's last frame is shown until its end.
        if (end if end is not None else start) > info.duration + period + _SPAN_GUARD:
            raise InputError(video.path, "plan", f"bad span: {shown} ends past the video's end ({info.duration:.3f}s): "
                             f"the timestamps do not fit this file{row}")
    placed: list[tuple[str, float, int]] = []
    frames_seen: set[int] = set()
    short = 0
    for k, span in enumerate(spans):
        low, high = _span_bounds(span, info)
        to_the_end = high >= info.duration - period
        low, high = low + _SPAN_GUARD, high - (0.0 if to_the_end else _SPAN_GUARD)
        length = max(high - low, 0.0)
        frames = round(info.frames * length / info.duration) if info.frames and info.duration > 0 else 0
        inside = dataclasses.replace(info, duration=length, frames=frames)
        try:
            bucket, starts = plan_video(inside, clip if to_the_end else dataclasses.replace(clip, short="skip"),
                                        f"{input_id(video)}#{k}")
        except InputError as e:
            if not e.skipped:
                raise
            short += 1
            continue
        for t in starts:
            # No two clips on the same source frame, even where the table's spans overlap.
            frame = int((low + t) / period + 1e-6) if period > 0 else len(frames_seen)
            if frame not in frames_seen:
                frames_seen.add(frame)
                placed.append((bucket, round(low + t, 6), k))
    if not placed:
        need = (min((clip.frames, *clip.frame_buckets)) - 1) / clip.fps
        raise InputError(video.path, "plan", f"too short: none of its {len(spans)} span(s) is longer than a clip "
                         f"({need:.2f}s){row}", skipped=True)
    if short:
        log.info("%s: %d of %d spans are too short for a clip%s", video.path, short, len(spans), row)
    return placed


def make_plan(
    inputs: list[InputVideo],
    settings: EncodeSettings,
    vae_identity: dict[str, Any],
    *,
    probe_fn: Callable[[str], VideoInfo] | None = None,
    workers: int = 8,
    strict: bool = False,
) -> ChunkPlan:
    """Probe every input (in parallel, container metadata only) and lay its clips out in shards, one bucket each.

    With `strict`, the first input that cannot be probed raises its InputError (skips are not failures).
    """
    clip = settings.clip
    probe_fn = probe_fn or functools.partial(probe, images=clip.images)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        probed = list(pool.map(lambda v: _try_probe(v, probe_fn), inputs))
    clips: list[PlannedClip] = []
    rejected: list[dict[str, Any]] = []
    for video, result in zip(inputs, probed, strict=True):
        ident = input_id(video)
        try:
            if isinstance(result, InputError):
                raise result
            if video.spans is None:
                bucket, starts = plan_video(result, clip, video.relpath)
                placed: list[tuple[str, float, int | None]] = [(bucket, s, None) for s in starts]
            else:
                placed = plan_spans(result, clip, video)
        except InputError as e:
            if strict and not e.skipped:
                raise
            # A row's problem names the row (list file and row number), beside the video's path.
            record = failure_record(e) | ({"row": video.origin} if video.origin else {})
            if e.skipped and video.spans is None and isinstance(result, VideoInfo):
                record["seconds"] = round(result.duration, 3)  # what a too-short skip's hint computes from
            rejected.append(record)
            log.log(logging.INFO if e.skipped else logging.WARNING, "%s: %s", e.path, e.reason)
            continue
        for i, (bucket, start, k) in enumerate(placed):
            caption = video.caption[k] if isinstance(video.caption, tuple) and k is not None else video.caption
            span = None if k is None else _span_bounds(video.spans[k], result)  # type: ignore[index]
            clips.append(PlannedClip(clip_key(ident, i), video.path, ident, i, start, bucket,
                                     caption if isinstance(caption, str) else None, span, k, video.extra))
    fingerprint = hash_json({"settings": settings.output_affecting(), "vae": vae_identity})
    return ChunkPlan(fingerprint, settings.output_affecting(), vae_identity, clips,
                lay_out_shards(clips, settings.samples_per_shard), rejected)


def lay_out_shards(clips: list[PlannedClip], samples_per_shard: int) -> list[PlannedShard]:
    """Bucket-pure shards of `clips`: by bucket name, each bucket's keys in clip order, `samples_per_shard` a shard."""
    shards: list[PlannedShard] = []
    by_bucket: dict[str, list[str]] = {}
    for c in clips:
        by_bucket.setdefault(c.bucket, []).append(c.key)
    for bucket in sorted(by_bucket):
        keys = by_bucket[bucket]
        for i in range(0, len(keys), samples_per_shard):
            shards.append(PlannedShard(len(shards), bucket, keys[i : i + samples_per_shard]))
    return shards


def _try_probe(video: InputVideo, probe_fn: Callable[[str], VideoInfo]) -> VideoInfo | InputError:
    try:
        return probe_fn(video.path)
    except InputError as e:
        return e


def failure_record(error: InputError) -> dict[str, Any]:
    """The failures.jsonl record of a skipped or failed input or clip (see format/outcomes.py)."""
    return make_record(error.path, error.stage, error.reason, skipped=error.skipped, error_type=error.error_type)
