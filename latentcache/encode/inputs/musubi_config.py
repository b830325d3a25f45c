"""A musubi-tuner dataset TOML as an encode's input: its video datasets mapped onto latentcache's clip settings.

musubi-tuner (kohya-ss/musubi-tuner, `docs/dataset_config.md` at commit 30c658c) describes data in a TOML of a
`[general]` table and `[[datasets]]` entries. What maps, and how:

- `video_directory` -> an input folder; `caption_extension = ".txt"` is latentcache's own sidecar caption;
- `resolution = [W, H]` -> `--width W --height H`; `enable_bucket = true` -> `--buckets`, the list musubi's
  `BucketSelector` builds (area W x H, sides in steps of 16), each video taking the nearest aspect as there;
- `target_frames = [N]` -> `--frames N`; `frame_extraction` head -> `--clips first`, chunk -> `all` (back to back),
  uniform with `frame_sample = K` -> `uniform:K`, slide with `frame_stride = S` -> `sliding:S/fps`;
- `source_fps` set: musubi drops frames to the model's rate (16 fps for Wan, 24 for HunyuanVideo) -> `--fps` that.
  Not set, musubi takes every frame at each video's own rate, which one `--fps` cannot say: `--fps` must be given.

Refused, by name: several `target_frames` (musubi takes a clip of each length from every video; latentcache one
length per video), `frame_extraction = "full"` (a length per video), `bucket_no_upscale`, image datasets,
`video_jsonl_file`, `control_directory`, caption extensions other than `.txt`, datasets whose clip settings differ,
and any key this mapping does not know. Training-side keys (`batch_size`, `num_repeats`, `cache_directory`) are
noted and left to the trainer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentcache.errors import ConfigError, MissingDependency

log = logging.getLogger(__name__)

# The frame rate musubi-tuner resamples a video to when `source_fps` is set (its dataset code: 24 for HunyuanVideo,
# 16 for Wan 2.1), by latentcache family.
MODEL_FPS = {"hunyuanvideo": 24.0, "wan": 16.0}
BUCKET_STEP = 16  # musubi's BucketSelector resolution steps for HunyuanVideo and Wan
COMMON = {"resolution", "caption_extension", "batch_size", "num_repeats", "enable_bucket", "bucket_no_upscale",
          "cache_directory"}
VIDEO = {"video_directory", "target_frames", "frame_extraction", "frame_stride", "frame_sample", "max_frames",
         "source_fps"}
TRAINER_ONLY = ("batch_size", "num_repeats", "cache_directory")


@dataclass(frozen=True, slots=True)
class MusubiDataset:
    """What the TOML says to encode: input folders and the clip settings they share."""

    inputs: tuple[str, ...]
    frames: int
    fps: float
    width: int
    height: int
    clips: str
    buckets: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())


def musubi_buckets(width: int, height: int, step: int = BUCKET_STEP) -> list[tuple[int, int]]:
    """(width, height) buckets as musubi-tuner's BucketSelector makes them for `resolution = [width, height]` with
    enable_bucket: widths from half the square side up in `step`s, each with the height that keeps the area, both
    ways round, sorted."""
    area = width * height
    side = int(math.sqrt(area))
    low = side // 2 - (side // 2) % step
    found = set()
    for w in range(low, side + step, step):
        h = area // w - (area // w) % step
        found.update({(w, h), (h, w)})
    return sorted(found)


def read_musubi_toml(path: Path, family: str, fps: float | None) -> MusubiDataset:
    """The TOML's video datasets as one encode; `fps`: the --fps the user gave, else None. ConfigError naming
    every key or value that does not map."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise MissingDependency(f"{path}: reading TOML on Python 3.10 needs tomli, a dependency of latentcache "
                                    "there: `pip install tomli`") from None
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a readable TOML file ({e})") from None
    general = config.get("general", {})
    datasets = config.get("datasets", [])
    unknown = sorted(set(config) - {"general", "datasets"}) + sorted(f"general.{k}" for k in set(general) - COMMON)
    if unknown or not isinstance(datasets, list) or not datasets:
        raise ConfigError(f"{path}: not a musubi-tuner dataset config latentcache can map"
                          + (f" (unknown: {', '.join(unknown)})" if unknown else " (no [[datasets]])"))
    mapped = [_dataset(path, i, {**general, **d}, family, fps) for i, d in enumerate(datasets)]
    first = mapped[0]
    for i, m in enumerate(mapped[1:], 1):
        if (m.frames, m.fps, m.width, m.height, m.clips, m.buckets) != (first.frames, first.fps, first.width,
                                                                       first.height, first.clips, first.buckets):
            raise ConfigError(f"{path}: [[datasets]] {i} has other clip settings than [[datasets]] 0; one encode "
                              "has one set: encode them into separate outputs (one TOML each)")
    notes = tuple(n for m in mapped for n in m.notes)
    return MusubiDataset(tuple(i for m in mapped for i in m.inputs), first.frames, first.fps, first.width,
                         first.height, first.clips, first.buckets, notes)


def _dataset(path: Path, i: int, d: dict[str, Any], family: str, fps: float | None) -> MusubiDataset:
    where = f"{path} [[datasets]] {i}"
    refused = sorted(set(d) - COMMON - VIDEO)
    if refused:
        raise ConfigError(f"{where}: {', '.join(refused)} cannot be mapped (latentcache maps video_directory "
                          "datasets with captions in .txt files beside the videos)")
    if "video_directory" not in d:
        raise ConfigError(f"{where}: no video_directory (image and jsonl datasets are not mapped)")
    if d.get("caption_extension", ".txt") not in (".txt", None):
        raise ConfigError(f"{where}: caption_extension {d['caption_extension']!r} cannot be mapped: latentcache reads "
                          "captions from NAME.txt beside each video")
    if d.get("bucket_no_upscale") and d.get("enable_bucket"):
        raise ConfigError(f"{where}: bucket_no_upscale cannot be mapped (its buckets follow each video's size)")
    frames = d.get("target_frames")
    if not (isinstance(frames, list) and len(frames) == 1 and isinstance(frames[0], int)):
        raise ConfigError(f"{where}: target_frames {frames!r} cannot be mapped: musubi takes a clip of each length "
                          "from every video, latentcache one length per video; give one value, e.g. [49]")
    source_fps = d.get("source_fps")
    if source_fps is not None:
        if family not in MODEL_FPS:
            raise ConfigError(f"{where}: source_fps resamples to the model's rate, known here for "
                              f"{', '.join(MODEL_FPS)} only, not {family}")
        rate = MODEL_FPS[family]
    elif fps is not None:
        rate = fps
    else:
        raise ConfigError(f"{where}: without source_fps musubi takes every frame at each video's own rate, which one "
                          "rate cannot say: pass --fps (your videos' frame rate), or set source_fps")
    clips = _clips(where, d, rate)
    width, height = _resolution(where, d.get("resolution", [960, 544]))
    buckets = tuple(f"{h}x{w}" for w, h in musubi_buckets(width, height)) if d.get("enable_bucket") else ()
    directory = Path(str(d["video_directory"])).expanduser()
    if not directory.is_absolute():
        directory = path.parent / directory  # relative to the TOML (musubi: to its working directory)
    notes = tuple(f"{where}: {k} = {d[k]!r} is the trainer's, not the encode's" for k in TRAINER_ONLY if k in d)
    return MusubiDataset((str(directory),), frames[0], rate, width, height, clips, buckets, notes)


def _clips(where: str, d: dict[str, Any], fps: float) -> str:
    how = d.get("frame_extraction", "head")
    if how == "head":
        return "first"
    if how == "chunk":
        return "all"
    if how == "uniform":
        return f"uniform:{int(d.get('frame_sample', 1))}"
    if how == "slide":
        return f"sliding:{int(d.get('frame_stride', 1)) / fps:g}"
    raise ConfigError(f"{where}: frame_extraction {how!r} cannot be mapped"
                      + (": each video would get its own length, latentcache buckets fixed lengths" if how == "full"
                         else ""))


def _resolution(where: str, value: Any) -> tuple[int, int]:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return value[0], value[1]  # musubi's order: [width, height]
    raise ConfigError(f"{where}: resolution {value!r}: expected [width, height]")
