"""A VAE's config and loaded weights checked before anything is encoded, so a degenerate one is refused (exit 2,
naming the file and the field) before OUT is claimed, not after an encode of hours that every reader then refuses.

- The config (`check_config`), where it is first read (a local directory, the hub cache, a downloaded config): a
  `_class_name` that is not a name; counts (`latent_channels`, `z_dim`, compression ratios, block widths) that are
  not positive whole numbers of a believable size (2**31 channels would allocate 14 TB before any message);
  `scaling_factor` 0, NaN or null; `latents_mean`/`latents_std` that are not one finite number per latent channel,
  or a `latents_std` holding a value <= 0; more blocks or layers than any released VAE comes near (building a
  module takes time even on torch's meta device: a million layers would take over an hour).
- The model's size (`check_model_size`), before diffusers builds it for real: the class built from the config on
  the meta device (no memory, milliseconds), its parameters counted against `MAX_PARAMETERS`, and the weights files
  of a local directory against that count, so a crafted config (100000-wide blocks) is refused in a moment, not
  after the process has taken every byte of memory.
- The loaded model (`checked_spec`): every parameter and buffer has a value (a weights file missing a tensor leaves
  it on the meta device: "Cannot copy out of meta tensor" later), and its latent spec (normalisation read from the
  config or, for LTX-Video, from buffers in the weights) passes the very check every reader runs on a manifest
  (`format.checks.spec_problems`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from latentcache.errors import ConfigError
from latentcache.format.checks import spec_problems
from latentcache.format.spec import LatentSpec

# Believable sizes: the largest VAEs known have 128 latent channels, 1024-wide blocks and 32x compression.
_MAX_CHANNELS = 1 << 16
_MAX_COMPRESSION = 64
# Structure, about twice to four times the released VAEs' (diffusers 0.42.1's class defaults, which are the released
# configs): at most 6 blocks (MiniMax-H3), 6 layers in a block (LTX-2, Mochi) and 36 transformer layers (MiniMax-H3's
# decoder). On the meta device a CogVideoX of 16 blocks of 64 layers takes 3 s to build; these caps keep it < 1 s.
_MAX_BLOCKS = 12
_MAX_LAYERS = 16
_MAX_TRANSFORMER_LAYERS = 144
_LAYERS = ("layers_per_block", "decoder_layers_per_block", "num_res_blocks")
_COUNTS = ("in_channels", "out_channels", "latent_channels", "z_dim", "base_dim", "decoder_base_dim", *_LAYERS,
           "decoder_num_layers", "temporal_compression_ratio", "spatial_compression_ratio", "patch_size",
           "patch_size_t")
_COUNT_LISTS = ("block_out_channels", "decoder_block_out_channels", "encoder_block_out_channels", "dim_mult",
                *_LAYERS)
# Parameters (and buffers) a VAE's config may build. The largest released video VAEs, counted on the meta device
# from their configs: MiniMax-H3 2.60 billion, HunyuanVideo 1.5 1.26 B, LTX-2 1.22 B, Wan 2.2 0.70 B, Mochi 0.46 B,
# LTX-Video 0.42 B, HunyuanVideo 0.25 B, CogVideoX 0.22 B, Wan 2.1 0.13 B. About 4x the largest (40 GB in fp32):
# room for a bigger release, while a crafted config cannot ask for a model of any size.
MAX_PARAMETERS = 10_000_000_000
# Weights bytes a checkpoint may hold per parameter its config builds: fp64 (twice an fp32 copy), plus per file the
# largest header safetensors itself reads (100 MB). A larger checkpoint holds tensors the model does not take, which
# diffusers would still read into memory.
_BYTES_PER_PARAMETER = 8
_HEADER_BYTES = 100_000_000


def _most(key: str) -> int:
    if "compression" in key or key.startswith("patch"):
        return _MAX_COMPRESSION
    if key in _LAYERS:
        return _MAX_LAYERS
    return _MAX_TRANSFORMER_LAYERS if key == "decoder_num_layers" else _MAX_CHANNELS


def _real(value: Any) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int past a float's range (10**400 in a config.json)
        return False


def _count(value: Any, most: int, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most


def config_problems(config: dict[str, Any]) -> list[str]:
    """Why this VAE config cannot give usable latents; [] when it can."""
    problems = []
    name = config.get("_class_name")
    if name is not None and not isinstance(name, str):
        problems.append(f"_class_name is {str(name)[:100]}, expected a class name such as AutoencoderKLWan")
    for key in _COUNTS:
        most, least = _most(key), 0 if key in ("num_res_blocks", "decoder_num_layers") else 1
        if key in config and config[key] is not None and not isinstance(config[key], list | tuple) \
                and not _count(config[key], most, least):
            problems.append(f"{key} is {str(config[key])[:60]}, expected a whole number from {least} to {most}")
    for key in _COUNT_LISTS:
        values, least = config.get(key), 0 if key in _LAYERS else 1  # a block may have no layers
        if isinstance(values, list | tuple) and not all(_count(v, _most(key), least) for v in values):
            problems.append(f"{key} is {str(values)[:100]}, expected whole numbers from {least} to {_most(key)}")
    for key, values in config.items():
        # Every list but the per-channel normalisation has one entry per block (or per layer kind of a block).
        if isinstance(values, list | tuple) and not key.startswith("latents_") and len(values) > _MAX_BLOCKS:
            problems.append(f"{key} has {len(values)} entries, expected at most {_MAX_BLOCKS} (one per block; the "
                            "released VAEs have at most 6)")
    if "scaling_factor" in config and not (_real(config["scaling_factor"]) and config["scaling_factor"] > 0):
        shown = "NaN or null" if config["scaling_factor"] is None else repr(config["scaling_factor"])
        problems.append(f"scaling_factor is {shown}, expected a finite number > 0 (0 makes every latent zero)")
    if "shift_factor" in config and config["shift_factor"] is not None and not _real(config["shift_factor"]):
        problems.append(f"shift_factor is {config['shift_factor']!r}, expected a finite number or null")
    channels = config.get("z_dim", config.get("latent_channels"))
    for key in ("latents_mean", "latents_std"):
        values = config.get(key)
        if values is None:
            continue
        if not (isinstance(values, list | tuple) and all(_real(v) for v in values)):
            problems.append(f"{key} is {str(values)[:100]}, expected a list of finite numbers")
        elif _count(channels, _MAX_CHANNELS) and len(values) != channels:
            problems.append(f"{key} has {len(values)} values for {channels} latent channels")
        elif key == "latents_std" and not all(v > 0 for v in values):
            problems.append(f"latents_std holds {min(values)!r}, expected every value > 0 (latents are divided by it)")
    return problems


def check_config(config: Any, where: str) -> None:
    """Refuse, naming `where` (the config file) and each bad field, a config that cannot give usable latents."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: a VAE config is a JSON object, found {type(config).__name__}")
    problems = config_problems(config)
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}. Fix the VAE's config.json (or pass the VAE it was "
                          "copied from)")


def check_model_size(cls: Any, config: dict[str, Any], where: str) -> int:
    """The parameters and buffers `cls` built from `config` would hold, counted on the meta device (no memory);
    ConfigError naming `where` when past `MAX_PARAMETERS`, or when the config cannot build the class at all."""
    import torch

    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except (RuntimeError, NotImplementedError) as e:  # diffusers' own errors (TypeError...) are the caller's
        raise ConfigError(f"{where}: its config cannot build a {cls.__name__} ({str(e)[:200]})") from None
    count = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    if count > MAX_PARAMETERS:
        raise ConfigError(f"{where}: the config builds a model of {count:,} parameters ({cls.__name__}), past "
                          f"the {MAX_PARAMETERS:,} latentcache accepts (the largest released video VAE, MiniMax-H3's, "
                          "has 2.6 billion). Fix the VAE's config.json (or pass the VAE it was copied from)")
    return count


def check_weights_size(files: list[Path], count: int, where: str) -> None:
    """Refuse, naming `where`, weights files larger than a model of `count` parameters can be (see
    `_BYTES_PER_PARAMETER`), before diffusers reads them into memory."""
    total = sum(path.stat().st_size for path in files)
    most = count * _BYTES_PER_PARAMETER + len(files) * _HEADER_BYTES
    if total > most:
        raise ConfigError(f"{where}: the weights ({', '.join(p.name for p in files)}) hold {total:,} bytes, past "
                          f"the {most:,} a model of {count:,} parameters can fill ({_BYTES_PER_PARAMETER} bytes "
                          "each, plus headers): they hold tensors of another model. Pass the weights that belong "
                          "to this config.json")


def default_type_problems(config: dict[str, Any], cls: Any) -> list[str]:
    """Fields of `config` whose JSON type is not the type of the class's own default (`num_res_blocks` an object
    where the class takes an int): diffusers would fail building the model with a TypeError, or worse build it.
    Fields whose default is None, and fields the class does not take, are left to the checks above."""
    import inspect

    try:
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty and p.default is not None}
    except (TypeError, ValueError):
        return []
    problems = []
    for key, default in defaults.items():
        value = config.get(key)
        if value is None or key not in config:
            continue
        if isinstance(default, bool):
            fits = isinstance(value, bool)
        elif isinstance(default, int):
            fits = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_CHANNELS
        elif isinstance(default, float):
            fits = _real(value) or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53)
        elif isinstance(default, str):
            fits = isinstance(value, str)
        elif isinstance(default, list | tuple):
            fits = isinstance(value, list | tuple) and bool(value) >= bool(default) and len(value) <= 64 and all(
                isinstance(v, bool | str) or _real(v) and abs(v) <= _MAX_CHANNELS for v in value)
        else:
            continue
        if not fits:
            problems.append(f"{key} is {str(value)[:60]}, expected a value like {default!r}")
    return problems


def checked_spec(model: Any, family: Any, where: str) -> LatentSpec:
    """`family.spec_from_model(model)`, after refusing a model with tensors its weights did not fill, and before one
    whose latent spec a reader would refuse."""
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        found = sorted(p.name for p in Path(where).glob("*.safetensors")) if Path(where).is_dir() else []
        files = f" ({', '.join(found)})" if found else ""
        raise ConfigError(f"--vae {where}: the weights{files} hold no value for {len(empty)} tensor(s) its config "
                          f"needs, e.g. {', '.join(empty[:3])}: the weights file is incomplete or belongs to another "
                          "config")
    try:
        spec = family.spec_from_model(model)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"--vae {where}: cannot read the VAE's latent spec from its config ({e})") from None
    problems = spec_problems(json.loads(json.dumps(spec.to_dict())))  # as the manifest will hold it: lists, not tuples
    if problems:
        raise ConfigError(f"--vae {where}: {'; '.join(problems)}; no reader could use these latents. Fix the VAE's "
                          "config (or weights), or pass another VAE")
    return spec
