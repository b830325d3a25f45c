"""`latentcache preview`: decode latents back through the VAE the manifest names, into an mp4 a person can watch.

Each chosen sample's posterior mean (what the trainer sees, before normalisation) goes through the VAE decoder;
when the source video is still readable, the same clip is decoded from it again (same start, fps, crop) and shown
on the left, the reconstruction on the right. Samples play one after another.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from latentcache.encode.chunks import find_input_record
from latentcache.encode.settings import ClipSettings, VAESettings
from latentcache.errors import ConfigError, InputError, ShardFormatError
from latentcache.format import strictjson
from latentcache.format.manifest import Manifest
from latentcache.format.out_layout import MANIFEST_FILE, PLAN_FILE, sidecar_of
from latentcache.format.reader import decode_sample
from latentcache.train.shard_sources import ShardRef, read_shard, resolve_source

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PreviewResult:
    out: Path
    keys: list[str] = field(default_factory=list)
    with_source: list[bool] = field(default_factory=list)
    # Each sample's source file (as its JSON names it) and clip start in seconds: what a user recognises.
    sources: list[tuple[str, float]] = field(default_factory=list)
    frames: int = 0
    size: tuple[int, int] = (0, 0)  # width, height of the video


def _iter_raw(shards: list[ShardRef]) -> Iterator[tuple[ShardRef, dict[str, Any]]]:
    for shard in shards:
        for raw in read_shard(shard):
            yield shard, raw


def pick_samples(shards: list[ShardRef], keys: list[str] | None, count: int | None, seed: int = 0
                 ) -> list[dict[str, Any]]:
    """The decoded samples named by `keys`, or `count` drawn at random (one pass, reservoir sampling)."""
    if keys:
        wanted, found = set(keys), {}
        for shard, raw in _iter_raw(_shards_first(shards, wanted)):
            if raw["__key__"] in wanted:
                found[raw["__key__"]] = decode_sample(raw, shard.url)
                if len(found) == len(wanted):
                    break
        missing = [k for k in keys if k not in found]
        if missing:
            raise ConfigError(f"key(s) {', '.join(missing)} are not in the dataset; `latentcache verify` lists "
                              "none, but each shard's .tar.json sidecar lists its keys")
        return [found[k] for k in keys]
    # Reservoir sampling over the samples' places (shard, position), counted from the manifest: the same choice as
    # over the samples themselves, but only the shards holding a chosen sample are read (each is checked whole, and
    # reading all of them for one sample took minutes on a large output).
    rng, chosen, n = random.Random(seed), [], 0
    for index, shard in enumerate(shards):
        for position in range(shard.samples):
            if len(chosen) < (count or 1):
                chosen.append((index, position))
            elif (j := rng.randrange(n + 1)) < len(chosen):
                chosen[j] = (index, position)
            n += 1
    found = {}
    for index in sorted({i for i, _ in chosen}):
        wanted = {p for i, p in chosen if i == index}
        for position, raw in enumerate(read_shard(shards[index])):
            if position in wanted:
                found[index, position] = decode_sample(raw, shards[index].url)
                if position == max(wanted):
                    break
    return [found[place] for place in chosen]


def _shards_first(shards: list[ShardRef], wanted: set[str]) -> list[ShardRef]:
    """Shards whose sidecar lists a wanted key first, so a preview of one key reads one shard, not all."""
    def holds(shard: ShardRef) -> bool:
        side = sidecar_of(Path(shard.url))
        try:
            return bool(wanted & set(strictjson.loads(side.read_bytes()).get("keys", [])))
        except (OSError, ValueError, AttributeError, TypeError):
            return False

    return sorted(shards, key=lambda s: not holds(s))


def _source_path(root: Path, key: str, meta: dict[str, Any]) -> str | None:
    """Where the sample's video is now, if it is still the file that was encoded: the output's inputs files have the
    absolute path (found by the key's digest), meta has the path under the input root.

    Both are data, perhaps a stranger's, and neither is shown on its word alone: a plan's path must be a local file, a
    member of a local tar or an s3:// object, and be now what its chunk plan recorded when it was probed (size and
    sha256, or the object's ETag), so neither a file the plan merely names nor a video replaced since encoding is shown
    beside the latents; a sample's own `source` must be a plain relative path under the working directory whose size
    is the `source_size_bytes` the sample records."""
    if (root / PLAN_FILE).is_file():
        try:
            found = find_input_record(root, key)
        except (OSError, ValueError, ConfigError, ShardFormatError) as e:
            log.info("%s: cannot look the source up in %s (%s)", key, root, e)
            found = None
        if found is not None:
            why = _not_the_encoded_file(found[0].path, found[1], meta)
            if why is None:
                return found[0].path
            log.warning("%s: not showing %s as its source: %s", key, found[0].path[:300], why)
    source = meta.get("source")
    if not (_plain_relative(source) and Path(source).is_file()):
        return None
    size = meta.get("source_size_bytes")
    if isinstance(size, int) and not isinstance(size, bool) and Path(source).stat().st_size == size:
        return source
    log.warning("%s: not showing %s as its source: its size is not the %r bytes the sample records", key, source, size)
    return None


def _not_the_encoded_file(path: str, recorded: Any, meta: dict[str, Any]) -> str | None:
    """Why the plan's `path` is not shown as the source (None: it is the file that was encoded)."""
    from latentcache.encode.input_stats import input_stat
    from latentcache.storage.trust import openable_from_file

    if not openable_from_file(path):
        return "the plan names no local file, tar member or s3:// object there"
    if not isinstance(recorded, dict):
        return "its chunk plan records no identity to check it against"
    size = meta.get("source_size_bytes")
    if recorded.get("size") is not None and size is not None and recorded.get("size") != size:
        return f"the plan records {recorded.get('size')} bytes, the sample {size}: they are not of one input"
    now = input_stat(path)
    if now is None:
        return "it is gone or unreadable"
    fields = [k for k in ("size", "sha256", "etag", "modified") if k in recorded]
    if not fields or any(now.get(k) != recorded[k] for k in fields):
        return f"it is not the file that was encoded ({', '.join(fields) or 'nothing'} recorded; changed since)"
    return None


def _plain_relative(source: Any) -> bool:
    """Whether a sample's own `source` may be looked up (under the working directory): the sample JSON may be a
    stranger's, and an absolute path, a `..` part or a colon (`pipe:`, `concat:`, a drive) would let it pick any
    file on this machine to decode into the preview."""
    if not isinstance(source, str) or not source or ":" in source or "\\" in source:
        return False
    if any(ord(c) < 32 for c in source):
        return False
    path = Path(source)
    return not path.is_absolute() and ".." not in path.parts


def source_frames(root: Path, sample: dict[str, Any], height: int, width: int) -> np.ndarray | None:
    """The clip decoded from its source again, as the encoder saw it; None when the source is gone or unreadable."""
    from latentcache.encode.decoding.decode import decode_clip

    meta = sample["meta"]
    start, frames, fps = (_number(meta.get(k), most) for k, most in (("clip_start", 1e7), ("frames", 1e4),
                                                                       ("fps", 1e3)))
    if start is None or not frames or frames != int(frames) or not fps or meta.get("resize", "crop") not in (
            "crop", "fit"):
        # A sample's JSON is data, perhaps a stranger's: clip bounds that are no numbers show no source.
        log.info("%s: the sample's JSON has no usable clip bounds; previewing the reconstruction alone", sample["key"])
        return None
    path = _source_path(root, sample["key"], meta)
    if path is None:
        log.info("%s: source video not found; previewing the reconstruction alone", sample["key"])
        return None
    clip = ClipSettings(frames=int(frames), fps=fps, height=height, width=width, resize=meta.get("resize", "crop"),
                        short="pad")
    try:
        return decode_clip(path, start, clip, key=sample["key"]).frames
    except InputError as e:
        log.warning("%s: source %s no longer decodes (%s); previewing the reconstruction alone",
                    sample["key"], path, e.reason)
        return None


def _number(value: Any, most: float) -> float | None:
    """A number from a sample's JSON, when it is a finite one in [0, most]; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if 0 <= number <= most else None


def load_manifest_vae(manifest: Manifest, device: str = "cpu", where: str = MANIFEST_FILE) -> Any:
    """The VAE recorded in the manifest (tiny-random-* is rebuilt with the same seeded weights)."""
    from latentcache.encode.models.vae import load_vae

    identity, spec = manifest.vae, manifest.latent_spec
    if not (isinstance(identity.get("source"), str) and identity["source"]):
        raise ConfigError(f"{where}: vae.source is {repr(identity.get('source'))[:80]}: the manifest does not say "
                          "which VAE made these latents, so they cannot be decoded for a preview")
    _refuse_pickled_weights(identity)
    settings = VAESettings(source=identity["source"], family=spec["family"], subfolder=identity.get("subfolder"),
                           revision=identity.get("revision"), dtype="fp32")
    vae = load_vae(settings, device)
    if vae.identity.config_hash != identity.get("config_hash"):
        log.warning("the VAE at %s has config hash %s, the manifest recorded %s: it changed since encoding, so the "
                    "preview may not show what was encoded", identity["source"], vae.identity.config_hash,
                    identity.get("config_hash"))
    if "weights" in identity and vae.identity.weights != identity["weights"]:
        log.warning("the VAE at %s has weights %s, the manifest recorded %s: they changed since encoding, so the "
                    "preview may not show what was encoded", identity["source"], vae.identity.weights,
                    identity["weights"])
    return vae


# The weight files diffusers loads without unpickling (plain or sharded); a manifest may come from a stranger, and
# `.bin`/`.pt` weights are loaded with torch.load, which can run code.
SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def _refuse_pickled_weights(identity: dict[str, Any]) -> None:
    """A local VAE directory named by the manifest must hold safetensors weights: otherwise diffusers would fall back
    to torch.load on its .bin file."""
    source, subfolder = Path(str(identity.get("source"))), identity.get("subfolder")
    if not source.is_dir():
        return  # tiny-random-* (built in) or a hub id
    folder = source / subfolder if subfolder and (source / subfolder).is_dir() else source
    if not any((folder / name).is_file() for name in SAFE_WEIGHTS):
        found = sorted(f.name for f in folder.iterdir() if f.is_file())
        raise ConfigError(f"{folder}: no {SAFE_WEIGHTS[0]} (found: {', '.join(found) or 'nothing'}); preview loads "
                          "safetensors weights only, never pickled .bin/.pt files (loading them can run code). "
                          "Convert the weights with save_pretrained(..., safe_serialization=True)")


def _pad_to(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    t, h, w, _ = frames.shape
    out = np.zeros((t, height, width, 3), np.uint8)
    out[:, :h, :w] = frames
    return out


def compose(decoded: np.ndarray, source: np.ndarray | None, side_by_side: bool) -> np.ndarray:
    """[T, H, W, 3] reconstruction, with the source clip on its left (black when it is gone) if side_by_side."""
    if not side_by_side:
        return decoded
    if source is None:
        source = np.zeros_like(decoded)
    t = min(len(decoded), len(source))
    return np.concatenate([source[:t], decoded[:t]], axis=2)


def write_mp4(path: Path, segments: list[np.ndarray], fps: float) -> tuple[int, int]:
    """h264 (yuv420p, so sizes are padded to even) via PyAV; returns (width, height)."""
    import av

    height = max(s.shape[1] for s in segments)
    width = max(s.shape[2] for s in segments)
    height, width = height + height % 2, width + width % 2
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                      options={"preset": "veryfast", "crf": "18"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for segment in segments:
            for frame in _pad_to(segment, height, width):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return width, height


def preview(root: str | os.PathLike, out: str | os.PathLike, *, keys: list[str] | None = None,
            random_count: int | None = None, seed: int = 0, device: str = "cpu") -> PreviewResult:
    """Decode the chosen samples back to video and write them, side by side with their sources, to `out`."""
    manifest, mroot, shards = resolve_source(root)
    samples = pick_samples(shards, keys, random_count if not keys else None, seed)
    vae = load_manifest_vae(manifest, device, f"{mroot}/{MANIFEST_FILE}")
    if not samples:
        raise ConfigError(f"{root}: no sample to preview (the dataset is empty)")
    result = PreviewResult(out=Path(out))
    pairs = []
    for sample in samples:
        decoded = vae.decode(sample["mean"].float()[None])[0]
        pairs.append((decoded, source_frames(mroot, sample, decoded.shape[1], decoded.shape[2])))
        result.keys.append(sample["key"])
        meta = sample["meta"]
        result.sources.append((str(meta.get("source"))[:300], _number(meta.get("clip_start"), 1e7) or 0.0))
        result.with_source.append(pairs[-1][1] is not None)
    side_by_side = any(result.with_source)
    segments = [compose(decoded, source, side_by_side) for decoded, source in pairs]
    fps = _number(samples[0]["meta"].get("fps"), 240.0) or 8.0
    result.size = write_mp4(result.out, segments, fps)
    result.frames = sum(len(s) for s in segments)
    return result
