"""The work, as data: inputs -> probed videos -> clips -> shards.

The plan is a pure function of the inputs and the settings. Ranks, accelerate and SLURM only decide which shard ids a
process takes (`shards_for_rank`); any process can produce any shard, and produces the same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latentcache.buckets import Bucket, frame_rule, nearest_frame_counts
from latentcache.decode import VideoInfo, probe
from latentcache.errors import ConfigError, InputError
from latentcache.image import IMAGE_SUFFIXES
from latentcache.settings import ClipSettings, EncodeSettings, hash_json

log = logging.getLogger(__name__)

LIST_SUFFIXES = {".txt", ".csv", ".jsonl", ".parquet"}
# Files that are obviously not videos are not even probed (captions, lists, images next to videos).
# Written first into every output directory latentcache makes: marks it as ours (safe to resume, to clear with
# --overwrite) and keeps it out of input discovery.
OUTPUT_MARKER = ".latentcache"
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
    def from_json(text: str, where: str | os.PathLike = "plan.json") -> Plan:
        """Parse plan.json, refusing anything latentcache does not write (ConfigError naming `where` and the field).

        Shard paths are built from a plan's buckets and ids, so a plan that could come from a stranger ("../../x" as
        a bucket) must never reach the writer or `--overwrite` unchecked.
        """
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e.msg}, line {e.lineno}); not a latentcache plan") from None
        _expect(isinstance(d, dict), where, "the top level", "an object")
        _expect(isinstance(d.get("fingerprint"), str), where, "fingerprint", "a string")
        for name in ("settings", "vae"):
            _expect(isinstance(d.get(name), dict), where, name, "an object")
        for name in ("clips", "shards"):
            _expect(isinstance(d.get(name), list), where, name, "a list")
        rejected = d.get("rejected", [])
        _expect(isinstance(rejected, list) and all(isinstance(r, dict) for r in rejected), where, "rejected",
                "a list of objects")
        return Plan(
            fingerprint=d["fingerprint"],
            settings=d["settings"],
            vae=d["vae"],
            clips=[_planned_clip(c, where, f"clips[{i}]") for i, c in enumerate(d["clips"])],
            shards=[_planned_shard(s, where, f"shards[{i}]") for i, s in enumerate(d["shards"])],
            rejected=rejected,
        )


# What plan.clip_key and make_plan write: keys are dot- and slash-free (webdataset splits keys on dots, and keys
# become member names), buckets FRAMESxHEIGHTxWIDTH (a bucket is a folder name under shards/).
SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _expect(ok: bool, where: str | os.PathLike, field_name: str, wanted: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {field_name} is not {wanted}; this plan was not written by latentcache (or was "
                          "edited): use a new --out directory, or delete the plan")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _planned_clip(c: Any, where: str | os.PathLike, at: str) -> PlannedClip:
    _expect(isinstance(c, dict) and set(c) == {f.name for f in dataclasses.fields(PlannedClip)}, where, at,
            "an object with exactly " + ", ".join(f.name for f in dataclasses.fields(PlannedClip)))
    _expect(isinstance(c["key"], str) and SAFE_KEY.fullmatch(c["key"]) is not None, where, f"{at}.key",
            "a key of letters, digits, '_' and '-' (such as 3f2a..._0000)")
    _expect(Bucket.parse_or_none(c["bucket"]) is not None, where, f"{at}.bucket",
            "FRAMESxHEIGHTxWIDTH such as 17x64x96")
    for name in ("source", "relpath"):
        _expect(isinstance(c[name], str) and c[name] != "", where, f"{at}.{name}", "a path")
    _expect(_is_int(c["index"]) and c["index"] >= 0, where, f"{at}.index", "a whole number >= 0")
    _expect(isinstance(c["start"], int | float) and not isinstance(c["start"], bool) and math.isfinite(c["start"])
            and c["start"] >= 0, where, f"{at}.start", "a time in seconds >= 0")
    _expect(c["caption"] is None or isinstance(c["caption"], str), where, f"{at}.caption", "a string or null")
    return PlannedClip(**c)


def _planned_shard(s: Any, where: str | os.PathLike, at: str) -> PlannedShard:
    _expect(isinstance(s, dict) and set(s) == {f.name for f in dataclasses.fields(PlannedShard)}, where, at,
            "an object with exactly " + ", ".join(f.name for f in dataclasses.fields(PlannedShard)))
    for name in ("part", "chunk"):
        _expect(s[name] is None or (_is_int(s[name]) and 0 <= s[name] < 10**6), where, f"{at}.{name}",
                "null or a whole number from 0 to 999999")
    _expect(_is_int(s["shard_id"]) and 0 <= s["shard_id"] < 10**6, where, f"{at}.shard_id",
            "a whole number from 0 to 999999")
    _expect(Bucket.parse_or_none(s["bucket"]) is not None, where, f"{at}.bucket",
            "FRAMESxHEIGHTxWIDTH such as 17x64x96")
    _expect(isinstance(s["keys"], list) and all(isinstance(k, str) and SAFE_KEY.fullmatch(k) for k in s["keys"]),
            where, f"{at}.keys", "a list of keys of letters, digits, '_' and '-'")
    return PlannedShard(**s)


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
    becomes a failure record when it is probed, so one stale line does not stop a million-video run. A path listed
    twice is kept once, from its first row; a repeat with another caption is reported, never silently chosen.
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


def _walk(root: Path, exclude: frozenset[Path] = frozenset(), images: bool = False) -> Iterator[Path]:
    """Files under `root`, sorted, without hidden files and folders (.git, .cache, editors' temporaries) and without
    latentcache output directories (holding OUTPUT_MARKER, or in `exclude`): an --out inside the input directory
    must not have its own shards discovered as new inputs on the rerun. Image files only with `images` (--images)."""
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not _is_output(here / d, exclude)]
        found.extend(here / f for f in files if not f.startswith("."))
    for f in sorted(found):
        if not f.is_file():
            continue
        if f.suffix.lower() in NOT_VIDEO_SUFFIXES and not (images and f.suffix.lower() in IMAGE_SUFFIXES):
            # Caption sidecars, lists, thumbnails: never videos. Anything else is probed, whatever its extension.
            log.debug("not a video by its extension, not probed: %s", f)
            continue
        yield f


def _is_output(folder: Path, exclude: frozenset[Path]) -> bool:
    if (folder / OUTPUT_MARKER).is_file() or folder.resolve() in exclude:
        log.info("%s is a latentcache output directory: not searched for inputs", folder)
        return True
    return False


def iter_inputs(paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = (), *,
                images: bool = False) -> Iterator[InputVideo]:
    """Files, directories (recursive) and list files -> input videos, streamed in the order given (not deduplicated).

    `exclude`: output directories (`--out`) never searched for inputs, with any directory holding OUTPUT_MARKER.
    `images` (--images): image files in directories are inputs too (else skipped like thumbnails).
    A directory or list that gives no input at all is a ConfigError naming it.
    """
    skip = frozenset(Path(e).resolve() for e in exclude)
    for raw in paths:
        p = Path(raw)
        given = 0
        if p.is_dir():
            for f in _walk(p, skip, images):
                given += 1
                yield InputVideo(str(f.resolve()), f.relative_to(p).as_posix(), _read_caption(f))
            if not given:
                raise ConfigError(f"input directory {str(p)!r} holds no files to encode (hidden files, captions, "
                                  "lists, images without --images and latentcache output directories are not inputs)")
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            for v in _from_list(p):
                given += 1
                yield v
            if not given:
                raise ConfigError(f"input list {str(p)!r} names no videos")
        elif p.is_file():
            yield InputVideo(str(p.resolve()), p.name, _read_caption(p))
        else:
            raise ConfigError(f"input {str(p)!r} does not exist")


def duplicate_error(relpath: str, first: str, second: str) -> ConfigError:
    return ConfigError(f"two inputs share the relative path {relpath!r} ({first} and {second}); keys would collide: "
                       "pass their common parent directory instead")


def warn_duplicate(path: str, kept: str | None, dropped: str | None) -> None:
    """The same file given twice is one input, the first; a second caption for it is reported, never chosen silently."""
    if kept != dropped:
        log.warning("%s is given twice with different captions (%r, then %r); keeping the first", path, kept, dropped)


def discover_inputs(paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = (), *,
                    images: bool = False) -> list[InputVideo]:
    """Files, directories (recursive) and list files -> input videos, sorted, each with a root-relative path.

    Holds every input in memory: for millions of inputs, `chunks.InputTable` takes `iter_inputs` instead."""
    by_rel: dict[str, InputVideo] = {}
    for v in iter_inputs(paths, exclude, images=images):
        other = by_rel.setdefault(v.relpath, v)
        if other.path != v.path:
            raise duplicate_error(v.relpath, other.path, v.path)
        if other is not v:
            warn_duplicate(v.path, other.caption, v.caption)
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
    if n > _MAX_CLIPS_PER_VIDEO:
        # Broken timestamps (a few KB claiming years) would otherwise plan millions of clips and exhaust memory.
        raise ValueError(f"{n} clips of {span:.2f}s in {duration:.0f}s: more than {_MAX_CLIPS_PER_VIDEO} from one "
                         "video; its duration is not believable")
    return [round(i * stride, 6) for i in range(n) if i * stride < room - 1e-9]


def clip_settings_for(bucket: str, clip: ClipSettings) -> ClipSettings:
    """The clip settings a planned clip is decoded with: its own bucket's frames and size, the rest shared."""
    b = Bucket.parse(bucket)
    return dataclasses.replace(clip, frames=b.frames, height=b.height, width=b.width)


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
    for f in clip.frame_buckets:
        nearest = nearest_frame_counts(f, k)
        if nearest is not None:
            raise ConfigError(f"--frame-buckets {f} does not fit the VAE, which needs {frame_rule(k)} frames; "
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
            starts = clip_starts(info.duration, dataclasses.replace(clip, frames=frames), salt)
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


def make_plan(
    inputs: list[InputVideo],
    settings: EncodeSettings,
    vae_identity: dict[str, Any],
    *,
    probe_fn: Callable[[str], VideoInfo] | None = None,
    workers: int = 8,
    strict: bool = False,
) -> Plan:
    """Probe every input (in parallel, container metadata only) and lay its clips out in shards, one bucket each.

    With `strict`, the first input that cannot be probed raises its InputError (skips are not failures).
    """
    clip = settings.clip
    check_buckets(clip, vae_identity.get("spec"))
    probe_fn = probe_fn or functools.partial(probe, images=clip.images)
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
            if strict and not e.skipped:
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
