"""The work, as data: inputs -> probed videos -> clips -> shards.

The plan is a pure function of the inputs and the settings. Ranks, accelerate and SLURM only decide which shard ids a
process takes (`shards_for_rank`); any process can produce any shard, and produces the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latentcache.decode import VideoInfo, probe
from latentcache.errors import ConfigError, InputError
from latentcache.settings import ClipSettings, EncodeSettings, hash_json

log = logging.getLogger(__name__)

LIST_SUFFIXES = {".txt", ".csv", ".jsonl"}
# Files that are obviously not videos are not even probed (captions, lists, images next to videos).
NOT_VIDEO_SUFFIXES = {".txt", ".json", ".jsonl", ".csv", ".md", ".srt", ".vtt", ".jpg", ".jpeg", ".png", ".webp"}


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

    @property
    def relpath(self) -> str:
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


def _from_list(list_file: Path) -> list[InputVideo]:
    """A text file with one path per line, or a CSV/JSONL with a `path` and optional `caption` column."""
    base = list_file.parent
    rows: list[dict[str, Any]]
    if list_file.suffix == ".csv":
        with list_file.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif list_file.suffix == ".jsonl":
        rows = [json.loads(line) for line in list_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = [{"path": line.strip()} for line in list_file.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    out = []
    for n, row in enumerate(rows, 1):
        if "path" not in row:
            raise ConfigError(f"{list_file}: row {n} has no 'path' column (columns: {', '.join(row)})")
        p = (base / row["path"]).resolve()
        caption = row.get("caption") or _read_caption(p)
        out.append(InputVideo(str(p), os.path.relpath(p, base), caption))
    return out


def discover_inputs(paths: Iterable[str | os.PathLike]) -> list[InputVideo]:
    """Files, directories (recursive) and list files -> input videos, sorted, each with a root-relative path."""
    found: list[InputVideo] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() not in NOT_VIDEO_SUFFIXES and not f.name.startswith("."):
                    found.append(InputVideo(str(f.resolve()), f.relative_to(p).as_posix(), _read_caption(f)))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            found.extend(_from_list(p))
        elif p.is_file():
            found.append(InputVideo(str(p.resolve()), p.name, _read_caption(p)))
        else:
            raise ConfigError(f"input {str(p)!r} does not exist")
    by_rel: dict[str, InputVideo] = {}
    for v in found:
        other = by_rel.setdefault(v.relpath, v)
        if other.path != v.path:
            raise ConfigError(f"two inputs share the relative path {v.relpath!r} ({other.path} and {v.path}); "
                              "keys would collide: pass their common parent directory instead")
    return sorted(by_rel.values(), key=lambda v: v.relpath)


def clip_key(relpath: str, index: int) -> str:
    """Deterministic, dot-free (webdataset splits keys on dots), the same on every machine."""
    digest = hashlib.sha1(relpath.encode()).hexdigest()[:16]
    return f"{digest}_{index:04d}"


def clip_starts(duration: float, clip: ClipSettings) -> list[float]:
    """Start times (seconds) of the clips taken from a video of `duration` seconds."""
    span = (clip.frames - 1) / clip.fps
    # A clip fits when its last target time falls strictly inside the video.
    room = duration - span
    kind, _, arg = clip.strategy.partition(":")
    if room <= 0:
        return [0.0] if clip.short == "pad" else []
    if kind == "first":
        return [0.0]
    if kind == "uniform":
        k = int(arg or 1)
        if k == 1:
            return [round(room / 2, 6)]
        return [round(room * i / (k - 1) * 0.999, 6) for i in range(k)]
    if kind in ("sliding", "all"):
        stride = float(arg) if kind == "sliding" else span + 1.0 / clip.fps
        if stride <= 0:
            raise ConfigError(f"--clips {clip.strategy}: the stride must be positive")
        n = int(room // stride) + 1
        return [round(i * stride, 6) for i in range(n) if i * stride < room]
    raise ConfigError(f"--clips {clip.strategy!r} is not one of first, uniform:K, sliding:SECONDS, all")


def make_plan(
    inputs: list[InputVideo],
    settings: EncodeSettings,
    vae_identity: dict[str, Any],
    *,
    probe_fn: Callable[[str], VideoInfo] = probe,
    workers: int = 8,
) -> Plan:
    """Probe every input (in parallel, container metadata only) and lay its clips out in shards."""
    clip = settings.clip
    with ThreadPoolExecutor(max_workers=workers) as pool:
        probed = list(pool.map(lambda v: _try_probe(v, probe_fn), inputs))
    clips: list[PlannedClip] = []
    rejected: list[dict[str, Any]] = []
    for video, result in zip(inputs, probed, strict=True):
        if isinstance(result, InputError):
            rejected.append(failure_record(result))
            continue
        starts = clip_starts(result.duration, clip)
        if not starts:
            need = (clip.frames - 1) / clip.fps
            rejected.append(failure_record(InputError(
                video.path, "plan",
                f"too short: {result.duration:.2f}s, a clip of {clip.frames} frames at {clip.fps:g} fps needs "
                f"more than {need:.2f}s (use --short pad or fewer --frames)", skipped=True)))
            continue
        for i, start in enumerate(starts):
            clips.append(PlannedClip(clip_key(video.relpath, i), video.path, video.relpath, i, start,
                                     clip.bucket, video.caption))
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
        "error": "skipped" if error.skipped else type(error.__cause__ or error).__name__,
        "message": error.reason,
    }


def shards_for_rank(plan: Plan, rank: int, world_size: int) -> list[PlannedShard]:
    """Round-robin: shard i belongs to rank i % world_size. No coordination needed."""
    return [s for s in plan.shards if s.shard_id % world_size == rank]
