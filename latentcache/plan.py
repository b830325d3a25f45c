"""The work, as data: inputs -> probed videos -> clips -> shards.

The plan is a pure function of the inputs and the settings. Ranks, accelerate and SLURM only decide which shard ids a
process takes (`shards_for_rank`); any process can produce any shard, and produces the same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latentcache.decode import VideoInfo, probe
from latentcache.errors import ConfigError, InputError
from latentcache.settings import ClipSettings, EncodeSettings, hash_json

log = logging.getLogger(__name__)

LIST_SUFFIXES = {".txt", ".csv", ".jsonl", ".parquet"}
# Files that are obviously not videos are not even probed (captions, lists, images next to videos).
NOT_VIDEO_SUFFIXES = {".txt", ".json", ".jsonl", ".csv", ".md", ".srt", ".vtt", ".jpg", ".jpeg", ".png", ".webp",
                     ".parquet"}


@dataclass(slots=True, frozen=True)
class InputVideo:
    path: str  # absolute
    relpath: str  # relative to the input root it was found under: the stable part of every key
    caption: str | None = None


@dataclass(slots=True)
class PlannedClip:
    key: str
    source: str
    relpath: str
    index: int
    start: float
    bucket: str
    caption: str | None = None


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
        if self.chunk is not None:
            return f"shards/{self.bucket}/p{self.part:04d}-c{self.chunk:06d}-{self.shard_id:06d}.tar"
        return f"shards/{self.bucket}/{self.shard_id:06d}.tar"


@dataclass(slots=True)
class Plan:
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
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Plan:
        d = json.loads(text)
        return Plan(
            fingerprint=d["fingerprint"],
            settings=d["settings"],
            vae=d["vae"],
            clips=[PlannedClip(**c) for c in d["clips"]],
            shards=[PlannedShard(**s) for s in d["shards"]],
            rejected=d.get("rejected", []),
        )


def _read_caption(video: Path) -> str | None:
    sidecar = video.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8", errors="replace").strip() or None
    return None


def _list_rows(list_file: Path) -> Iterator[dict[str, Any]]:
    """The list's rows, streamed: a list of millions of videos is never held whole."""
    suffix = list_file.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(list_file)
        return
    # utf-8-sig: spreadsheets save CSVs with a byte-order mark, which would otherwise become part of "path".
    # newline="": lines end only at \n, \r or \r\n, never at U+2028, NEL or form feeds inside captions.
    with open(list_file, encoding="utf-8-sig", newline="") as f:
        if suffix == ".csv":
            # The csv module's own line handling: a quoted caption may hold newlines.
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ConfigError(f"{list_file}: a CSV list needs a 'path' column (and optionally 'caption'); "
                                  f"found columns: {', '.join(reader.fieldnames or []) or 'none'}")
            yield from reader
            return
        for n, line in enumerate(f, 1):
            if suffix != ".jsonl":
                if line.strip() and not line.startswith("#"):
                    yield {"path": line.strip()}
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{list_file}: line {n} is not JSON ({e.msg}); expected one object per line "
                                  'such as {"path": "a.mp4", "caption": "..."}') from None
            if not isinstance(row, dict):
                raise ConfigError(f"{list_file}: line {n} is a {type(row).__name__}, expected an object with 'path'")
            yield row


def _parquet_rows(list_file: Path) -> Iterator[dict[str, Any]]:
    """A Parquet list with a `path` column and optionally `caption`, read a record batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{list_file}: Parquet lists need pyarrow: pip install 'latentcache[parquet]'") from None
    table = pq.ParquetFile(list_file)
    names = table.schema_arrow.names
    if "path" not in names:
        raise ConfigError(f"{list_file}: a Parquet list needs a 'path' column (and optionally 'caption'); found "
                          f"columns: {', '.join(names) or 'none'}")
    columns = ["path", "caption"] if "caption" in names else ["path"]
    for batch in table.iter_batches(batch_size=65536, columns=columns):
        yield from batch.to_pylist()


def _from_list(list_file: Path) -> Iterator[InputVideo]:
    """A text file with one path per line, or a CSV/JSONL/Parquet list with a `path` and optional `caption` column.

    Relative paths are relative to the list's folder. A listed file that does not exist is not an error here: it
    becomes a failure record when it is probed, so one stale line does not stop a million-video run.
    """
    # Plain string operations, not Path objects: this runs once per input, millions of times.
    base = os.path.abspath(list_file.parent)
    prefix = base.rstrip(os.sep) + os.sep
    for n, row in enumerate(_list_rows(list_file), 1):
        raw = row.get("path")
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(f"{list_file}: row {n} has no 'path' (found: {row!r}); every row needs the video's path")
        # Keys come from the path relative to the list, not through symlinks: the same list gives the same keys
        # wherever it is mounted.
        p = os.path.normpath(os.path.join(base, os.path.expanduser(raw.strip())))
        rel = p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, base)
        caption = row.get("caption")
        caption = str(caption).strip() if caption not in (None, "") else None
        yield InputVideo(p, rel.replace(os.sep, "/"), caption or _read_caption(Path(p)))


def _walk(root: Path) -> Iterator[Path]:
    """Files under `root`, sorted, without hidden files and folders (.git, .cache, editors' temporaries)."""
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or not f.is_file():
            continue
        if f.suffix.lower() in NOT_VIDEO_SUFFIXES:
            # Caption sidecars, lists, thumbnails: never videos. Anything else is probed, whatever its extension.
            log.debug("not a video by its extension, not probed: %s", f)
            continue
        yield f


def iter_inputs(paths: Iterable[str | os.PathLike]) -> Iterator[InputVideo]:
    """Files, directories (recursive) and list files -> input videos, streamed in the order given (not deduplicated)."""
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            yield from (InputVideo(str(f.resolve()), f.relative_to(p).as_posix(), _read_caption(f)) for f in _walk(p))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            yield from _from_list(p)
        elif p.is_file():
            yield InputVideo(str(p.resolve()), p.name, _read_caption(p))
        else:
            raise ConfigError(f"input {str(p)!r} does not exist")


def duplicate_error(relpath: str, first: str, second: str) -> ConfigError:
    return ConfigError(f"two inputs share the relative path {relpath!r} ({first} and {second}); keys would collide: "
                       "pass their common parent directory instead")


def discover_inputs(paths: Iterable[str | os.PathLike]) -> list[InputVideo]:
    """Files, directories (recursive) and list files -> input videos, sorted, each with a root-relative path.

    Holds every input in memory: for millions of inputs, `chunks.InputTable` takes `iter_inputs` instead."""
    by_rel: dict[str, InputVideo] = {}
    for v in iter_inputs(paths):
        other = by_rel.setdefault(v.relpath, v)
        if other.path != v.path:
            raise duplicate_error(v.relpath, other.path, v.path)
    return sorted(by_rel.values(), key=lambda v: v.relpath)


def clip_key(relpath: str, index: int) -> str:
    """Deterministic, dot-free (webdataset splits keys on dots), the same on every machine."""
    digest = hashlib.sha1(relpath.encode()).hexdigest()[:16]
    return f"{digest}_{index:04d}"


STRATEGIES = "first, uniform:K, sliding:SECONDS, all, random:K"


def parse_strategy(strategy: str) -> tuple[str, float]:
    """'uniform:4' -> ('uniform', 4); raises ConfigError naming the valid forms."""
    kind, sep, arg = strategy.partition(":")
    try:
        if kind in ("first", "all") and not sep:
            return kind, 0.0
        if kind in ("uniform", "random") and int(arg) >= 1 and float(arg) == int(arg):
            return kind, float(int(arg))
        if kind == "sliding" and float(arg) > 0:
            return kind, float(arg)
    except ValueError:
        pass
    raise ConfigError(f"--clips {strategy!r} is not one of {STRATEGIES} (K a whole number >= 1, SECONDS > 0), "
                      "e.g. uniform:4 or sliding:2.5")


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
    return [round(i * stride, 6) for i in range(n) if i * stride < room - 1e-9]


def parse_bucket(bucket: str) -> tuple[int, int, int]:
    """'17x64x96' -> (frames, height, width)."""
    frames, height, width = (int(x) for x in bucket.split("x"))
    return frames, height, width


def clip_settings_for(bucket: str, clip: ClipSettings) -> ClipSettings:
    """The clip settings a planned clip is decoded with: its own bucket's frames and size, the rest shared."""
    frames, height, width = parse_bucket(bucket)
    return dataclasses.replace(clip, frames=frames, height=height, width=width)


def _aspect_sizes(clip: ClipSettings) -> list[tuple[int, int]]:
    sizes = []
    for b in clip.buckets:
        try:
            h, w = (int(x) for x in b.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--buckets {b!r}: expected HEIGHTxWIDTH such as 480x720") from None
        if h < 1 or w < 1:
            raise ConfigError(f"--buckets {b!r}: height and width must be positive")
        sizes.append((h, w))
    return sizes or [(clip.height, clip.width)]


def nearest_size(width: int, height: int, clip: ClipSettings) -> tuple[int, int]:
    """The aspect bucket (height, width) nearest the displayed aspect of a width x height video (first on ties)."""
    aspect = math.log(width / height)
    return min(_aspect_sizes(clip), key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def check_buckets(clip: ClipSettings, spec: dict[str, Any] | None) -> None:
    """Refuse strategies and buckets that cannot work, before any video is probed.

    `spec` is the VAE's latent spec (temporal and spatial compression): every aspect bucket and frame bucket must be
    something the VAE encodes exactly, as `--frames/--height/--width` are.
    """
    parse_strategy(clip.strategy)
    sizes = _aspect_sizes(clip)
    for f in clip.frame_buckets:
        if not 1 <= f <= clip.frames:
            raise ConfigError(f"--frame-buckets {f} is not between 1 and --frames {clip.frames}: frame buckets are the "
                              "shorter clips a video too short for --frames falls back to")
    if not spec:
        return
    k, s = int(spec.get("temporal_compression", 1)), int(spec.get("spatial_compression", 1))
    rule = spec.get("frame_rule", f"{k}k+1")
    for f in clip.frame_buckets:
        if (f - 1) % k:
            lower = max(1, (f - 1) // k * k + 1)
            raise ConfigError(f"--frame-buckets {f} does not fit the VAE, which needs {rule} frames; nearest valid: "
                              f"{lower} or {lower + k}")
    if clip.buckets:
        for h, w in sizes:
            for name, v in (("height", h), ("width", w)):
                if v < s or v % s:
                    lower = max(s, v // s * s)
                    raise ConfigError(f"--buckets {h}x{w}: the {name} {v} is not a multiple of the VAE's spatial "
                                      f"compression {s}; nearest valid: {lower} or {lower + s}")


def plan_video(info: VideoInfo, clip: ClipSettings, salt: str = "") -> tuple[str, list[float]]:
    """The bucket and clip starts for one probed video. Raises InputError (skipped) when no clip fits.

    A video too short for `clip.frames` falls back to the largest frame bucket that fits, then to the short policy:
    "pad" takes one clip of the smallest frame count from the start (decode repeats the last frame, recorded in
    the clip's `padded_frames`), "skip" reports it.
    """
    height, width = nearest_size(info.width, info.height, clip)
    fallbacks = sorted((f for f in clip.frame_buckets if f < clip.frames), reverse=True)
    for frames in (clip.frames, *fallbacks):
        starts = clip_starts(info.duration, dataclasses.replace(clip, frames=frames), salt)
        if starts:
            return f"{frames}x{height}x{width}", starts
    smallest = min((clip.frames, *fallbacks))
    if clip.short == "pad":
        return f"{smallest}x{height}x{width}", [0.0]
    need = (smallest - 1) / clip.fps
    raise InputError(info.path, "plan",
                     f"too short: {info.duration:.2f}s, a clip of {smallest} frames at {clip.fps:g} fps needs more "
                     f"than {need:.2f}s (use --short pad, fewer --frames or --frame-buckets)", skipped=True)


def make_plan(
    inputs: list[InputVideo],
    settings: EncodeSettings,
    vae_identity: dict[str, Any],
    *,
    probe_fn: Callable[[str], VideoInfo] = probe,
    workers: int = 8,
) -> Plan:
    """Probe every input (in parallel, container metadata only) and lay its clips out in shards, one bucket each.

    With `settings.strict`, the first input that cannot be probed raises its InputError (skips are not failures).
    """
    clip = settings.clip
    check_buckets(clip, vae_identity.get("spec"))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        probed = list(pool.map(lambda v: _try_probe(v, probe_fn), inputs))
    clips: list[PlannedClip] = []
    rejected: list[dict[str, Any]] = []
    for video, result in zip(inputs, probed, strict=True):
        try:
            if isinstance(result, InputError):
                raise result
            bucket, starts = plan_video(result, clip, video.relpath)
        except InputError as e:
            if settings.strict and not e.skipped:
                raise
            rejected.append(failure_record(e))
            log.log(logging.INFO if e.skipped else logging.WARNING, "%s: %s", e.path, e.reason)
            continue
        for i, start in enumerate(starts):
            clips.append(PlannedClip(clip_key(video.relpath, i), video.path, video.relpath, i, start,
                                     bucket, video.caption))
    shards: list[PlannedShard] = []
    by_bucket: dict[str, list[str]] = {}
    for c in clips:
        by_bucket.setdefault(c.bucket, []).append(c.key)
    for bucket in sorted(by_bucket):
        keys = by_bucket[bucket]
        for i in range(0, len(keys), settings.samples_per_shard):
            shards.append(PlannedShard(len(shards), bucket, keys[i : i + settings.samples_per_shard]))
    fingerprint = hash_json({"settings": settings.output_affecting(), "vae": vae_identity})
    return Plan(fingerprint, settings.output_affecting(), vae_identity, clips, shards, rejected)


def _try_probe(video: InputVideo, probe_fn: Callable[[str], VideoInfo]) -> VideoInfo | InputError:
    try:
        return probe_fn(video.path)
    except InputError as e:
        return e


def failure_record(error: InputError) -> dict[str, Any]:
    return {
        "path": error.path,
        "stage": error.stage,
        "error": error.error_type,
        "message": error.reason,
    }


def outcome_counts(plan: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a finished run did, from plan.json and failures.jsonl: videos, and skips and failures by reason.

    Skips are grouped by the reason's first words ("too short"), failures by stage and error type
    ("probe/InvalidDataError", "decode/CorruptVideo")."""
    failed_keys = {r["key"] for r in records if "key" in r}
    sources = {c["source"] for c in plan["clips"]}
    with_clips = {c["source"] for c in plan["clips"] if c["key"] not in failed_keys}
    skips: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for r in records:
        if r.get("error") == "skipped":
            skips[r["message"].split(":")[0]] += 1
        else:
            failures[f"{r.get('stage')}/{r.get('error')}"] += 1
    return {"videos": len(sources | {r["path"] for r in plan.get("rejected", [])}),
            "videos_with_clips": len(with_clips), "skips": skips, "failures": failures}


def shards_for_rank(plan: Plan, rank: int, world_size: int) -> list[PlannedShard]:
    """Round-robin: shard i belongs to rank i % world_size. No coordination needed."""
    return [s for s in plan.shards if s.shard_id % world_size == rank]
