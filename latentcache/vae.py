"""Stage 2: uint8 clips -> the VAE posterior (mean, log-variance), checked for shape and finiteness.

Everything that differs between VAE families (class, normalisation, compression, frame rule, a tiny config for
tests) lives in `FAMILIES`; the rest of latentcache only sees a `LatentSpec` and a `VideoVAE`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentcache.errors import ConfigError, InputError
from latentcache.settings import ClipSettings, TilingSettings, VAESettings, hash_json

log = logging.getLogger(__name__)

TINY_RANDOM_SUFFIX = "tiny-random-"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(slots=True, frozen=True)
class LatentSpec:
    """What a latent of this VAE looks like and how a trainer normalises it. Written into the manifest."""

    family: str
    channels: int
    temporal_compression: int
    spatial_compression: int
    # Normalisation, read from the VAE config: z_model = (z - shift) * scale, or per channel (z - mean) / std.
    scaling_factor: float | None = None
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # CogVideoX 1.5 image-to-video divides by the scaling factor instead of multiplying.
    invert_scale_latents: bool = False

    @property
    def frame_rule(self) -> str:
        return f"{self.temporal_compression}k+1"

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (
            self.channels,
            (frames - 1) // self.temporal_compression + 1,
            height // self.spatial_compression,
            width // self.spatial_compression,
        )

    def check_clip(self, clip: ClipSettings) -> None:
        """Refuse frame counts and sizes this VAE cannot encode exactly, offering the nearest valid values."""
        k = self.temporal_compression
        if clip.frames < 1 or (clip.frames - 1) % k:
            lower = max(1, (clip.frames - 1) // k * k + 1)
            raise ConfigError(
                f"--frames {clip.frames} does not fit the {self.family} VAE, which needs {self.frame_rule} frames; "
                f"nearest valid: {lower} or {lower + k}"
            )
        s = self.spatial_compression
        for name, value in (("height", clip.height), ("width", clip.width)):
            if value < s or value % s:
                lower = max(s, value // s * s)
                raise ConfigError(
                    f"--{name} {value} is not a multiple of the {self.family} VAE's spatial compression {s}; "
                    f"nearest valid: {lower} or {lower + s}"
                )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["frame_rule"] = self.frame_rule
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> LatentSpec:
        names = {f.name for f in dataclasses.fields(LatentSpec)}
        kwargs = {k: v for k, v in d.items() if k in names}
        for k in ("latents_mean", "latents_std"):
            if kwargs.get(k) is not None:
                kwargs[k] = tuple(kwargs[k])
        return LatentSpec(**kwargs)

    def _scale(self) -> float:
        scale = self.scaling_factor if self.scaling_factor is not None else 1.0
        return 1.0 / scale if self.invert_scale_latents else scale

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents [..., C, T, H, W] -> what the transformer trains on. Apply exactly once."""
        if self.latents_mean is not None and self.latents_std is not None:
            shape = (-1, 1, 1, 1)
            mean = torch.tensor(self.latents_mean, dtype=z.dtype).view(shape)
            std = torch.tensor(self.latents_std, dtype=z.dtype).view(shape)
            return (z - mean) * self._scale() / std
        return (z - (self.shift_factor or 0.0)) * self._scale()

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`, for decoding model-space latents back to video."""
        if self.latents_mean is not None and self.latents_std is not None:
            shape = (-1, 1, 1, 1)
            mean = torch.tensor(self.latents_mean, dtype=z.dtype).view(shape)
            std = torch.tensor(self.latents_std, dtype=z.dtype).view(shape)
            return z * std / self._scale() + mean
        return z / self._scale() + (self.shift_factor or 0.0)


@dataclass(slots=True, frozen=True)
class VAEFamily:
    name: str
    class_name: str
    default_source: str
    default_subfolder: str | None
    tiny_config: dict[str, Any]
    spec_from_config: Callable[[Any], LatentSpec]


def _optional_tuple(value: Any) -> tuple[float, ...] | None:
    return tuple(float(v) for v in value) if value is not None else None


def _cogvideox_spec(config: Any) -> LatentSpec:
    return LatentSpec(
        family="cogvideox",
        channels=int(config.latent_channels),
        temporal_compression=int(config.temporal_compression_ratio),
        spatial_compression=2 ** (len(config.block_out_channels) - 1),
        scaling_factor=float(config.scaling_factor),
        shift_factor=None if config.shift_factor is None else float(config.shift_factor),
        latents_mean=_optional_tuple(config.latents_mean),
        latents_std=_optional_tuple(config.latents_std),
        invert_scale_latents=bool(getattr(config, "invert_scale_latents", False)),
    )


FAMILIES: dict[str, VAEFamily] = {
    "cogvideox": VAEFamily(
        name="cogvideox",
        class_name="AutoencoderKLCogVideoX",
        default_source="THUDM/CogVideoX-2b",
        default_subfolder="vae",
        # The real architecture (4 down blocks: 8x spatial, 4x temporal, 16 channels), ~0.7M parameters.
        tiny_config=dict(
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=16,
            temporal_compression_ratio=4,
            sample_height=64,
            sample_width=96,
        ),
        spec_from_config=_cogvideox_spec,
    ),
}


def family_of(name: str) -> VAEFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown VAE family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp16 is what users of these VAEs run on GPUs; CPUs are slow and inexact in half precision.
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}") from None


def tile_problem(tiling: TilingSettings, spatial: int) -> str | None:
    """Why these tile settings would give latents of the wrong size, or None when they are exact.

    diffusers steps through the input by int(tile * (1 - overlap)) pixels but keeps
    (tile/spatial - int(tile/spatial * overlap)) latents per tile; unless the two agree exactly, the blended
    result is too wide (e.g. tile 32, overlap 0.2 on a 96-wide clip gives 14 latents instead of 12).
    """
    for name, tile in (("height", tiling.tile_height), ("width", tiling.tile_width)):
        if tile % spatial or tile < 2 * spatial:
            return f"tile {name} {tile} must be a multiple of {spatial} and at least {2 * spatial}"
        if not 0.0 <= tiling.overlap < 1.0:
            return f"tile overlap {tiling.overlap} must be in [0, 1)"
        stride_pixels = int(tile * (1 - tiling.overlap))
        latent_tile = tile // spatial
        kept_latents = latent_tile - int(latent_tile * tiling.overlap)
        if stride_pixels != kept_latents * spatial:
            good = [o for o in (0.125, 0.25, 1 / 3, 0.5) if _tile_exact(tile, o, spatial)]
            return (
                f"tile {name} {tile} with overlap {tiling.overlap:g} steps {stride_pixels} pixels but keeps "
                f"{kept_latents} latents ({kept_latents * spatial} pixels) per tile, so the latents come out the "
                f"wrong size; exact overlaps for this tile: {', '.join(f'{o:g}' for o in good) or 'none'}"
            )
    return None


def _tile_exact(tile: int, overlap: float, spatial: int) -> bool:
    latent_tile = tile // spatial
    return int(tile * (1 - overlap)) == (latent_tile - int(latent_tile * overlap)) * spatial


@dataclass(slots=True, frozen=True)
class VAEIdentity:
    class_name: str
    source: str
    subfolder: str | None
    revision: str | None
    config_hash: str
    random_weights: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class VideoVAE:
    """A loaded diffusers video VAE plus what latentcache needs to know about it."""

    def __init__(self, model: Any, spec: LatentSpec, identity: VAEIdentity, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model = model
        self.spec = spec
        self.identity = identity
        self.device = device
        self.dtype = dtype

    def configure(self, tiling: TilingSettings | None, frame_chunk: int | None) -> None:
        if tiling is not None:
            problem = tile_problem(tiling, self.spec.spatial_compression)
            if problem:
                raise ConfigError(f"--tiling: {problem}")
            self.model.enable_tiling(
                tile_sample_min_height=tiling.tile_height,
                tile_sample_min_width=tiling.tile_width,
                tile_overlap_factor_height=tiling.overlap,
                tile_overlap_factor_width=tiling.overlap,
            )
            # diffusers treats overlap 0 as "unset" (`or` default); force the value we validated.
            self.model.tile_overlap_factor_height = self.model.tile_overlap_factor_width = tiling.overlap
        else:
            self.model.disable_tiling()
        if frame_chunk is not None:
            if frame_chunk % (2 * self.spec.temporal_compression):
                raise ConfigError(
                    f"--frame-chunk {frame_chunk} must be a multiple of {2 * self.spec.temporal_compression} "
                    f"(the {self.spec.family} encoder keeps a causal cache across chunks of that size)"
                )
            self.model.num_sample_frames_batch_size = frame_chunk

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor, *, sources: list[str] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [B, T, H, W, 3] -> (mean, logvar), each [B, C, T', H', W'] on the CPU in the VAE's dtype.

        A batch with NaN/Inf is re-encoded in fp32; if it is still not finite the clips are refused, never written.
        Raises InputError (stage "encode") naming the sources.
        """
        x = torch.as_tensor(frames)
        b, t, h, w, _ = x.shape
        expected = (b, *self.spec.latent_shape(t, h, w))
        params = self._encode(x, self.dtype)
        if not torch.isfinite(params).all() and self.dtype != torch.float32:
            log.warning("non-finite latents in %s for %s; re-encoding in fp32", self.dtype, sources or "a batch")
            self.model.to(torch.float32)
            try:
                params = self._encode(x, torch.float32)
            finally:
                self.model.to(self.dtype)
            if torch.isfinite(params).all():
                params = params.to(self.dtype)
        what = ", ".join(sources) if sources else "batch"
        if not torch.isfinite(params).all():
            raise InputError(what, "encode", f"the VAE produced NaN/Inf latents even in fp32 (dtype {self.dtype})")
        mean, logvar = params.chunk(2, dim=1)
        # DiagonalGaussianDistribution clamps the log-variance the same way before sampling.
        logvar = logvar.clamp(-30.0, 20.0)
        if tuple(mean.shape) != expected:
            raise InputError(what, "encode", f"latents came out {tuple(mean.shape)}, expected {expected} "
                             "(tile or chunk settings do not divide the clip evenly)")
        return mean.contiguous().cpu(), logvar.contiguous().cpu()

    def _encode(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        non_blocking = self.device.type == "cuda"
        if non_blocking:
            x = x.pin_memory()
        # uint8 crosses the bus (4x fewer bytes than fp32), then [B,T,H,W,3] -> [B,3,T,H,W] in [-1, 1] on device.
        x = x.to(self.device, non_blocking=non_blocking).permute(0, 4, 1, 2, 3).to(dtype) / 127.5 - 1.0
        posterior = self.model.encode(x).latent_dist
        return posterior.parameters

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Raw (unscaled) latents [B, C, T, H, W] -> uint8 frames [B, T, H, W, 3], for previews."""
        z = latents.to(self.device, self.dtype)
        video = self.model.decode(z).sample
        video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return video.permute(0, 2, 3, 4, 1).cpu().numpy()


def load_vae(settings: VAESettings, device: str = "auto") -> VideoVAE:
    """Load from a local directory, a hub id (with `subfolder`), or the built-in `tiny-random-<family>`."""
    import diffusers

    family = family_of(settings.family)
    cls = getattr(diffusers, family.class_name)
    dev = resolve_device(device)
    dtype = resolve_dtype(settings.dtype, dev)
    random_weights = settings.source == TINY_RANDOM_SUFFIX + family.name
    if random_weights:
        # Fixed seed: every rank and every rerun builds identical weights, so shards are reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls(**family.tiny_config)
        subfolder = revision = None
        log.warning("using %s: random weights, for demos and tests only; its latents mean nothing", settings.source)
    elif settings.source.startswith(TINY_RANDOM_SUFFIX):
        raise ConfigError(f"--vae {settings.source}: built-in tiny VAEs are "
                          f"{', '.join(TINY_RANDOM_SUFFIX + f for f in FAMILIES)}")
    else:
        subfolder = settings.subfolder
        if subfolder and Path(settings.source).is_dir() and not (Path(settings.source) / subfolder).is_dir():
            subfolder = None  # a local directory that is the VAE itself, not a pipeline
        revision = settings.revision
        try:
            model = cls.from_pretrained(settings.source, subfolder=subfolder, revision=revision)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"could not load {family.class_name} from {settings.source!r} (subfolder {subfolder!r}): {e}. "
                "Pass a local directory holding config.json and weights, or a hub id reachable from here."
            ) from e
    model = model.to(dev, dtype).eval().requires_grad_(False)
    spec = family.spec_from_config(model.config)
    identity = VAEIdentity(
        class_name=family.class_name,
        source=settings.source,
        subfolder=subfolder,
        revision=revision,
        config_hash=hash_json(dict(model.config)),
        random_weights=random_weights,
    )
    vae = VideoVAE(model, spec, identity, dev, dtype)
    vae.configure(settings.tiling, settings.frame_chunk)
    return vae
