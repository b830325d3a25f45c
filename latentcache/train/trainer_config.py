"""`latentcache check-config`: does a CogVideo SAT-style training YAML fit these latent shards?

What SAT does with `batch["mp4"]` (CogVideo sat/diffusion_video.py): `latent_input = model_config.get("latent_input",
False)`. With False (the default) `encode_first_stage` runs SAT's own VAE (`first_stage_config`) on the batch, then
multiplies by `scale_factor`: the data must be RGB video, and latents there fail on the encoder's first (3-channel)
convolution. With True it skips the VAE and returns `x * self.scale_factor  # already encoded`: the data must be raw,
unscaled latents (`latentcache.sat.SATLatentDataset`); a pixel dataset such as SAT's SFTDataset then feeds the DiT
3-channel RGB, and latents already normalised (LatentShardDataset's default) are scaled twice. Channel, frame, size,
fps and scaling-factor mismatches are as silent, so each is reported with its consequence and fix.

Keys are looked up by name, in `network_config` first for model keys and in `data` for data keys, and never inside
`first_stage_config` (the VAE's own `in_channels: 3`) or `conditioner_config`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentcache.errors import ConfigError
from latentcache.format.manifest import Manifest
from latentcache.format.spec import LatentSpec

log = logging.getLogger(__name__)

NOT_MODEL = ("first_stage_config", "conditioner_config", "loss_fn_config", "denoiser_config", "sampler_config")


@dataclass(slots=True)
class TrainerConfig:
    """What a training config says about its input; None where it does not say. `where` maps field -> YAML path."""

    path: str
    latent_input: bool | None = None
    in_channels: int | None = None
    num_frames: int | None = None
    time_compressed_rate: int | None = None
    latent_height: int | None = None
    latent_width: int | None = None
    patch_size: int | None = None
    scale_factor: float | None = None
    z_channels: int | None = None
    video_size: tuple[int, int] | None = None
    fps: float | None = None
    data_target: str | None = None  # data.target: the dataset class SAT builds batches with
    data_normalized: bool = False  # data.params.normalize of a LatentShardDataset target (its default: True)
    bucket: str | None = None  # data.params.bucket: the one bucket SATLatentDataset reads
    where: dict[str, str] = field(default_factory=dict)


def _walk(tree: Any, path: str = "") -> list[tuple[str, str, Any]]:
    """Every (dotted path, key, value) in a YAML tree, breadth first so shallower keys come first."""
    found, queue = [], [(path, tree)]
    while queue:
        here, node = queue.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in items:
            dotted = f"{here}.{key}" if here else str(key)
            found.append((dotted, str(key), value))
            if isinstance(value, dict | list):
                queue.append((dotted, value))
    return found


def _lookup(entries: list[tuple[str, str, Any]], names: tuple[str, ...], prefer: str | None) -> tuple[str, Any]:
    candidates = [(p, v) for p, k, v in entries if k in names and not any(f".{n}." in f".{p}." for n in NOT_MODEL)]
    preferred = [(p, v) for p, v in candidates if prefer and f".{prefer}." in f".{p}."]
    return (preferred or candidates or [("", None)])[0]


FIELDS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "latent_input": (("latent_input",), None),
    "in_channels": (("in_channels",), "network_config"),
    "num_frames": (("num_frames", "max_num_frames"), "network_config"),
    "time_compressed_rate": (("time_compressed_rate",), "network_config"),
    "latent_height": (("latent_height",), "network_config"),
    "latent_width": (("latent_width",), "network_config"),
    "patch_size": (("patch_size",), "network_config"),
    "scale_factor": (("scale_factor", "scaling_factor"), None),
    "video_size": (("video_size",), "data"),
    "fps": (("fps",), "data"),
}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """SAT's `--base a.yaml b.yaml`: later files override earlier ones, mapping by mapping."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# A trainer config has hundreds of keys; these bounds refuse YAML bombs (a recursive alias, "billion laughs") in
# milliseconds instead of looping or expanding until memory runs out.
YAML_MAX_BYTES = 4 << 20
YAML_MAX_NODES = 100_000


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml  # PyYAML: a dependency of accelerate, so always installed with latentcache

    try:
        size = Path(path).stat().st_size
        if size > YAML_MAX_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a trainer config is far smaller (at most {YAML_MAX_BYTES})")
        loader = yaml.SafeLoader(Path(path).read_text(encoding="utf-8"))
        try:
            # Compose the node graph first (aliases stay shared nodes, cheap), check it, and only then build objects.
            node = loader.get_single_node()
            if node is not None:
                _check_yaml_graph(node, path, set(), [0])
            tree = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read it as YAML ({e})") from e
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a trainer config") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top, found {type(tree).__name__}")
    return tree


def _check_yaml_graph(node: Any, path: str | os.PathLike, above: set[int], count: list[int]) -> None:
    """Refuse a node that contains itself through an alias, and more than YAML_MAX_NODES nodes once every alias is
    expanded (which is what walking the config would do)."""
    import yaml

    count[0] += 1
    if count[0] > YAML_MAX_NODES:
        raise ConfigError(f"{path}: more than {YAML_MAX_NODES} YAML nodes once its aliases are expanded (an alias "
                          "bomb?); a trainer config is far smaller")
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        return
    if id(node) in above:
        raise ConfigError(f"{path}: line {node.start_mark.line + 1}: a YAML alias refers to a node that contains it "
                          "(a recursive alias); a trainer config cannot be infinite")
    above.add(id(node))
    for child in children:
        _check_yaml_graph(child, path, above, count)
    above.discard(id(node))


def load_trainer_config(*paths: str | os.PathLike) -> TrainerConfig:
    """Read the keys that decide what the DiT is fed, from one YAML or several merged in order (model + sft)."""
    tree: dict[str, Any] = {}
    for path in paths:
        tree = _merge(tree, _read_yaml(path))
    entries = _walk(tree)
    path = " + ".join(str(p) for p in paths)
    config = TrainerConfig(path=path)
    for name, (keys, prefer) in FIELDS.items():
        where, value = _lookup(entries, keys, prefer)
        if value is not None:
            setattr(config, name, _coerce(name, value, path, where))
            config.where[name] = where
    # The VAE the trainer would encode with: its latent channels, for comparison with the shards' VAE.
    z = [(p, v) for p, k, v in entries if k == "z_channels" and ".first_stage_config." in f".{p}."]
    if z:
        config.z_channels, config.where["z_channels"] = _coerce("z_channels", z[0][1], path, z[0][0]), z[0][0]
    data = tree.get("data")
    if isinstance(data, dict) and data.get("target"):
        config.data_target, config.where["data_target"] = str(data["target"]), "data.target"
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        config.data_normalized = (config.data_target.rsplit(".", 1)[-1] == "LatentShardDataset"
                                  and _coerce("latent_input", params.get("normalize", True), path, "normalize"))
        if params.get("bucket") is not None:
            config.bucket, config.where["bucket"] = str(params["bucket"]), "data.params.bucket"
    return config


def _coerce(name: str, value: Any, path: str | os.PathLike, where: str) -> Any:
    try:
        if name == "latent_input":
            if isinstance(value, str):
                return value.strip().lower() in ("true", "1", "yes")
            return bool(value)
        if name == "video_size":
            h, w = value
            return _whole(h), _whole(w)
        if name in ("scale_factor", "fps"):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError("not a finite number")
            return number
        return _whole(value)
    # OverflowError: int(.inf); ValueError: int("sixteen"), int(.nan), 16.5. Every one a problem line, exit 2.
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{path}: {where} = {repr(value)[:200]} is not a valid {name}") from e


def _whole(value: Any) -> int:
    """A count from YAML: an integer (16, "16", 16.0), never a fraction, an infinity or a NaN."""
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("not a whole number")
    return int(value)


def config_problems(config: TrainerConfig, manifest: Manifest) -> list[str]:
    """One line per mismatch between the training config and the latent shards, each with its fix."""
    spec = LatentSpec.from_dict(manifest.latent_spec)
    clip = manifest.clip
    # Buckets (FxHxW in pixels) say what the shards hold, also when one encode wrote several sizes.
    buckets = sorted(manifest.buckets or {s.bucket for s in manifest.shards})
    w = config.where
    problems = _input_problems(config, spec)
    if config.bucket is not None:  # the dataset reads that bucket alone: the others are no concern of this config
        if config.bucket not in buckets:
            problems.append(f"{w['bucket']}: {config.bucket}, the shards hold {', '.join(buckets)}. Fix: set bucket "
                            "to one of those, or encode that size")
        buckets = [config.bucket] if config.bucket in buckets else buckets
    if config.in_channels is not None and config.in_channels != spec.channels:
        if config.in_channels == 2 * spec.channels:
            problems.append(
                f"{w['in_channels']}: {config.in_channels} is twice the latents' {spec.channels} channels: an "
                "image-to-video model (noisy video latents concatenated with image latents). Fix: concatenate the "
                "image latents in the training step, or use the text-to-video config")
        else:
            problems.append(f"{w['in_channels']}: {config.in_channels}, the shards hold {spec.channels}-channel "
                            f"latents ({manifest.vae.get('class_name')}). Fix: encode with the VAE this model uses")
    if config.z_channels is not None and config.z_channels != spec.channels:
        problems.append(f"{w['z_channels']}: {config.z_channels}, the shards' VAE has {spec.channels} latent channels. "
                        "Fix: the trainer's first_stage_config must be the VAE the shards were encoded with")
    for bucket in buckets:
        frames, height, width = (int(v) for v in bucket.split("x"))
        for problem in _frame_problems(config, spec, frames) + _size_problems(config, spec, height, width):
            problem = problem if len(buckets) == 1 else f"bucket {bucket}: {problem}"
            if problem not in problems:
                problems.append(problem)
    problems += _scale_problems(config, spec)
    if config.fps is not None and clip.get("fps") is not None and not math.isclose(config.fps, clip["fps"]):
        problems.append(f"{w['fps']}: {config.fps:g}, the shards were sampled at {clip['fps']:g} fps: motion would "
                        f"play at the wrong speed. Fix: set fps: {clip['fps']:g}, or encode with --fps {config.fps:g}")
    return problems


def _frame_problems(config: TrainerConfig, spec: LatentSpec, frames: int) -> list[str]:
    w, problems = config.where, []
    rate = config.time_compressed_rate
    if rate is not None and rate != spec.temporal_compression:
        problems.append(f"{w['time_compressed_rate']}: {rate}, the shards' VAE compresses time by "
                        f"{spec.temporal_compression}. Fix: set time_compressed_rate: {spec.temporal_compression}")
    if config.num_frames is not None and config.num_frames != frames:
        latent, want = spec.rule.latent_frames(frames), spec.rule.latent_frames(config.num_frames)
        problems.append(f"{w['num_frames']}: {config.num_frames} frames ({want} latent frames), the shards hold "
                        f"{frames}-frame clips ({latent} latent frames). Fix: set {w['num_frames'].split('.')[-1]}: "
                        f"{frames}, or encode with --frames {config.num_frames}")
    return problems


def _size_problems(config: TrainerConfig, spec: LatentSpec, height: int, width: int) -> list[str]:
    w, problems, s = config.where, [], spec.spatial_compression
    lh, lw = height // s, width // s
    for name, have, want in (("latent_height", config.latent_height, lh), ("latent_width", config.latent_width, lw)):
        if have is not None and have != want:
            problems.append(f"{w[name]}: {have}, the shards' latents are {want} ({height}x{width} pixels / {s}). "
                            f"Fix: set {name}: {want}, or encode with --{name.split('_')[1]} {have * s}")
    if config.video_size is not None and config.video_size != (height, width):
        problems.append(f"{w['video_size']}: {list(config.video_size)}, the shards were encoded at "
                        f"{height}x{width}. Fix: set video_size: [{height}, {width}], or encode with --height "
                        f"{config.video_size[0]} --width {config.video_size[1]}")
    p = config.patch_size
    if p and (lh % p or lw % p):
        problems.append(f"{w['patch_size']}: {p} does not divide the {lh}x{lw} latents. Fix: encode at a height and "
                        f"width that are multiples of {p * s} pixels")
    return problems


# SAT's own datasets (CogVideo sat/data_video.py): they decode videos into RGB pixels in [-1, 1].
PIXEL_DATASETS = ("SFTDataset", "VideoDataset")
RAW_LATENT_DATASET = "latentcache.sat.SATLatentDataset"


def _data_kind(config: TrainerConfig) -> str | None:
    """"pixels", "raw" or "normalized" latents, from data.target; None for a dataset this does not know."""
    name = (config.data_target or "").rsplit(".", 1)[-1]
    if name in PIXEL_DATASETS:
        return "pixels"
    if name == "SATLatentDataset" or (name == "LatentShardDataset" and not config.data_normalized):
        return "raw"
    return "normalized" if name == "LatentShardDataset" else None


def _input_problems(config: TrainerConfig, spec: LatentSpec) -> list[str]:
    """latent_input against what the data class yields, each with what SAT would do (sat/diffusion_video.py)."""
    w, kind = config.where, _data_kind(config)
    target = f"data.target: {config.data_target}"
    use = (f"Fix: set data.target: {RAW_LATENT_DATASET} (raw latents from these shards) and model.latent_input: "
           "true")
    if not config.latent_input:
        said = (f"{w['latent_input']}: {config.latent_input}" if "latent_input" in w
                else "model.latent_input is not set (SAT defaults to False)")
        if kind == "pixels":
            return [f"{said} with {target}, which decodes videos: SAT encodes them with its own VAE and never "
                    f"reads these {spec.channels}-channel latent shards. {use}"]
        return [f"{said}, so SAT's encode_first_stage runs its own VAE encoder (first_stage_config) on batch['mp4']: "
                f"its first convolution takes 3 RGB channels and gets {spec.channels}-channel latents, a conv error "
                "at the first step. Fix: set model.latent_input: true (SAT then skips its VAE and multiplies the "
                "latents by scale_factor)"]
    if kind == "pixels":
        return [f"{w['latent_input']}: {config.latent_input} with {target}, which yields RGB video: SAT skips its "
                "VAE ('already encoded') and the DiT gets 3-channel RGB pixels times scale_factor where it expects "
                f"{spec.channels}-channel latents. {use}"]
    return []


def _scale_problems(config: TrainerConfig, spec: LatentSpec) -> list[str]:
    """SAT multiplies batch['mp4'] by scale_factor (default 1.0) whether it encoded it or not."""
    if spec.latents_mean is not None and spec.latents_std is not None:
        return _per_channel_problems(config, spec)
    s = spec.scaling_factor
    if s is None:
        return []
    problems = []
    factor = config.scale_factor if config.scale_factor is not None else 1.0
    said = (f"{config.where['scale_factor']}: {factor:g}" if config.scale_factor is not None
            else "model.scale_factor is not set (SAT defaults to 1.0)")
    if not math.isclose(factor, s, rel_tol=1e-4):
        problems.append(f"{said}, the shards' VAE scaling factor is {s:g}: SAT multiplies the raw latents by "
                        f"scale_factor, so the DiT would get z x {factor:g} where it was trained on z x {s:g}. Fix: "
                        f"set scale_factor: {s:g}, or encode with the VAE this model was trained with")
    if _data_kind(config) == "normalized":
        problems.append(f"data.target: {config.data_target} yields latents already multiplied by the scaling factor "
                        f"(normalize: true), and SAT multiplies them by scale_factor again: the DiT would get z x "
                        f"{factor * s:.4g} where it expects z x {s:g}. Fix: set data.target: {RAW_LATENT_DATASET} "
                        "(raw latents, scaled once by SAT), or data.params.normalize: false")
    return problems


def _per_channel_problems(config: TrainerConfig, spec: LatentSpec) -> list[str]:
    """A per-channel normalisation (Wan, LTX-Video, LTX-2, Mochi) is no single factor: SAT's scale_factor cannot
    produce it from raw latents, so only latents the dataset already normalised fit, and then scale_factor must be 1."""
    factor = config.scale_factor if config.scale_factor is not None else 1.0
    kind = _data_kind(config)
    norm = spec.describe_normalization()
    if kind == "raw":
        return [f"data.target: {config.data_target} yields raw latents, and the shards' {spec.family} VAE normalises "
                f"them per channel ({norm}), which SAT's single scale_factor cannot do: the DiT would get "
                f"z x {factor:g} where a {spec.family} model expects normalised latents. Fix: set data.target: "
                "latentcache.LatentShardDataset (normalize: true, the default) and scale_factor: 1.0"]
    if kind == "normalized" and not math.isclose(factor, 1.0, rel_tol=1e-4):
        said = f"{config.where['scale_factor']}: {factor:g}"
        return [f"{said}: data.target: {config.data_target} already applies the {spec.family} VAE's per-channel "
                f"normalisation ({norm}), and SAT multiplies by scale_factor again. Fix: set scale_factor: 1.0"]
    return []
