"""Stage 2: uint8 clips -> the VAE posterior (mean, log-variance), checked for shape and finiteness.

Everything that differs between VAE families (class, normalisation, compression, frame rule, a tiny config for
tests) lives in `FAMILIES`; the rest of latentcache only sees a `LatentSpec` and a `VideoVAE`. What a `--vae` names
(its family, its config's early spec), found without loading it, is encode/models/vae_source.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentcache.encode.models import vae_checks
from latentcache.encode.models.families import FAMILIES, UNSUPPORTED, VAEFamily, family_of, tile_problem
from latentcache.encode.models.provenance import weight_files, weights_provenance
from latentcache.encode.models.vae_source import TINY_RANDOM_SUFFIX, check_hub_reachable
from latentcache.encode.settings import TilingSettings, VAESettings, hash_json
from latentcache.errors import ConfigError, InputError
from latentcache.format.spec import LatentSpec, image_condition_of, image_condition_problem

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, *, gpu_default: torch.dtype = torch.float16,
                  flag: str = "--dtype") -> torch.dtype:
    if dtype == "auto":
        # fp16 is what users of these VAEs run on GPUs; CPUs are slow and inexact in half precision.
        return gpu_default if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"{flag} {dtype!r} is not one of auto, {', '.join(DTYPES)}") from None


@dataclass(slots=True, frozen=True)
class VAEIdentity:
    class_name: str
    source: str
    subfolder: str | None
    revision: str | None
    config_hash: str
    random_weights: bool
    # The sha256 of every weights file loaded (latentcache.encode.models.provenance; None for built-in random
    # weights). With the rest of the identity it is part of the plan's fingerprint, so other weights are refused.
    weights: dict[str, str] | None = None

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
        # The tiling in force, so an out-of-memory retry with smaller tiles can restore it afterwards.
        self.tiling: TilingSettings | None = None
        # The class's own tile settings, for a family whose released latents are tiled (see `_released_tiling`).
        self._released: dict[str, Any] | None = None
        # The host buffer batches are gathered into (`stage`), kept between batches: page-locked on CUDA, where a
        # fresh pinned allocation per batch costs more than the copy, and a fresh one on any device faults in its
        # pages (~140 ms a 49x480x720 clip against ~4 ms to copy into a buffer already touched).
        self._staging: torch.Tensor | None = None

    def configure(self, tiling: TilingSettings | None, frame_chunk: int | None) -> None:
        family = family_of(self.spec.family)
        if tiling is not None:
            problem = tile_problem(tiling, self.spec.spatial_compression, family.tiling.style)
            if problem:
                raise ConfigError(f"--tiling: {problem}")
            family.tiling.enable(self.model, tiling)
        elif family.tiled_as_released:
            self._released_tiling()
        else:
            self.model.disable_tiling()
        self.tiling = tiling
        if frame_chunk is not None:
            if family.frame_chunk_attr is None:
                raise ConfigError(
                    f"--frame-chunk {frame_chunk}: the {family.name} VAE ({family.class_name}) has no frames-per-step "
                    "setting (it chunks time its own way); drop --frame-chunk, or use --tiling to save memory"
                )
            if frame_chunk % (2 * self.spec.temporal_compression):
                raise ConfigError(
                    f"--frame-chunk {frame_chunk} must be a multiple of {2 * self.spec.temporal_compression} "
                    f"(the {self.spec.family} encoder keeps a causal cache across chunks of that size)"
                )
            setattr(self.model, family.frame_chunk_attr, frame_chunk)

    def _released_tiling(self) -> None:
        """The tiling the family was released with (its diffusers class's defaults), restored after an out-of-memory
        retry with smaller tiles: a fresh instance's tile settings, not this one's, which a retry may have changed."""
        fresh = self._released
        if fresh is None:
            with torch.device("meta"):
                model = type(self.model).from_config(self.model.config)
            fresh = self._released = {k: v for k, v in vars(model).items() if k.startswith(("use_tiling", "tile_"))}
        for name, value in fresh.items():
            setattr(self.model, name, value)

    def tune(self, *, compile_encoder: bool = False) -> None:
        """GPU speed options users of these VAEs reach for; each leaves the latents' values as they are."""
        if self.device.type != "cuda":
            return
        # Fixed clip shapes: let cuDNN pick the fastest 3D convolution once per shape.
        torch.backends.cudnn.benchmark = True
        self.model.to(memory_format=torch.channels_last_3d)
        if compile_encoder:
            self.model.encoder = torch.compile(self.model.encoder, dynamic=False)

    @torch.inference_mode()
    def auto_batch_size(self, frames: int, height: int, width: int, *, limit: int = 16) -> int:
        """Clips per VAE call for this clip size on this device: the same number every time on the same machine.

        Byte-identical restarts need the same batch size (batched convolutions round differently in the last bits),
        so nothing that changes between runs (free memory, load) enters. On a GPU: one clip's measured peak against
        80% of the device's total memory, less what is already allocated (the weights). On a CPU: an estimate of one
        clip's activations at full resolution against a quarter of the RAM, at most `CPU_BATCH_LIMIT`: batching
        saves the per-call overhead, which matters for small clips, while big clips gain little and cost memory.
        Rounded down to a power of two, so a near-tie cannot flip between runs.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self.encode(torch.zeros(1, frames, height, width, 3, dtype=torch.uint8))
            per_clip = max(torch.cuda.max_memory_allocated() - before, 1)
            budget = 0.8 * torch.cuda.get_device_properties(self.device).total_memory - before
        else:
            limit = min(limit, CPU_BATCH_LIMIT)
            per_clip = _cpu_bytes_per_clip(self.model, frames, height, width, self.dtype)
            budget = _ram_bytes() / 4
        batch = _power_of_two_at_most(max(1, min(limit, int(budget / per_clip))))
        log.info("batch size %d (auto) on %s: one %dx%dx%d clip takes ~%.2f GiB of %.1f GiB", batch, self.device.type,
                 frames, height, width, per_clip / 2**30, budget / 2**30)
        return batch

    def check_image_condition(self) -> None:
        """ConfigError when `--image-latents` cannot cache this VAE's image-to-video conditioning (see
        `format.spec.image_condition_problem`); the job calls it before any work."""
        problem = image_condition_problem(self.spec)
        if problem:
            raise ConfigError(problem)

    @torch.inference_mode()
    def encode_image_condition(self, frames: np.ndarray | torch.Tensor, *, sources: list[str] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 clips [B, T, H, W, 3] -> the raw posterior of their first frame, encoded the way the family's
        image-to-video pipeline encodes its conditioning image (`--image-latents`).

        CogVideoX (`CogVideoXImageToVideoPipeline.prepare_latents`): the first frame alone as a 1-frame video ->
        (mean, logvar), each [B, C, 1, H', W']; the pipeline samples this posterior (`retrieve_latents`).
        Wan (`WanImageToVideoPipeline.prepare_latents`): the first frame followed by T-1 zero frames (0 in the VAE's
        [-1, 1] input range), encoded as one clip -> (mean, None), mean [B, C, T', H', W']; the pipeline takes the
        mode (`sample_mode="argmax"`), so no log-variance is returned. Scaling, padding and the mask are the
        dataset's job (`LatentShardDataset` yields `image_latents`), since they depend on nothing encoded.
        """
        self.check_image_condition()
        mode = image_condition_of(self.spec.family)
        mean, logvar = self.encode(frames, sources=sources, condition=mode)
        return mean, (logvar if mode == "image" else None)

    def stage(self, clips: list[np.ndarray]) -> torch.Tensor:
        """Clips of one shape (uint8 [T, H, W, 3] each) gathered into one [B, T, H, W, 3] batch in the reused host
        buffer, ready for `encode`. The batch is valid until the next call: `encode` has copied it to the device
        by the time it returns."""
        shape = (len(clips), *clips[0].shape)
        numel = int(np.prod(shape))
        if self._staging is None or self._staging.numel() < numel:
            self._staging = torch.empty(numel, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        batch = self._staging[:numel].view(shape)
        for i, frames in enumerate(clips):
            batch[i].copy_(torch.from_numpy(frames))
        return batch

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor, *, sources: list[str] | None = None,
               condition: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [B, T, H, W, 3] -> (mean, logvar), each [B, C, T', H', W'] on the CPU in the VAE's dtype.

        A batch with NaN/Inf is re-encoded in fp32; if it is still not finite the clips are refused, never written.
        Raises InputError (stage "encode") naming the sources. `condition` ("image" or "video", see
        `encode_image_condition`) encodes the image-to-video conditioning of the frames instead of the frames.
        """
        x = torch.as_tensor(frames)
        b, t, h, w, _ = x.shape
        expected = (b, *self.spec.latent_shape(1 if condition == "image" else t, h, w))
        params = self._encode(x, self.dtype, condition)
        if not torch.isfinite(params).all() and self.dtype != torch.float32:
            log.warning("non-finite latents in %s for %s; re-encoding in fp32", self.dtype, sources or "a batch")
            cast_keeping_fp32_modules(self.model, torch.float32)
            try:
                params = self._encode(x, torch.float32, condition)
            finally:
                cast_keeping_fp32_modules(self.model, self.dtype)
            if torch.isfinite(params).all():
                cast = params.to(self.dtype)
                if not torch.isfinite(cast).all():
                    # The intermediate activations were the trouble, but the latents themselves exceed the dtype too.
                    raise InputError(", ".join(sources) if sources else "batch", "encode",
                                     f"the latents are finite in fp32 (largest {params.abs().max().item():.3g}) but "
                                     f"exceed {self.dtype}: encode with --dtype bf16 or fp32")
                params = cast
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

    def _encode(self, x: torch.Tensor, dtype: torch.dtype, condition: str | None = None) -> torch.Tensor:
        frames = x.shape[1]
        if condition is not None:
            x = x[:, :1]  # only the first frame enters the conditioning; the rest is zeros or absent
        non_blocking = self.device.type == "cuda"
        if non_blocking and not x.is_pinned():
            x = x.pin_memory()
        # uint8 crosses the bus (4x fewer bytes than fp32), then [B,T,H,W,3] -> [B,3,T,H,W] in the family's pixel
        # convention on device: [-1, 1], or (x / 255 - mean) / std in fp32 as MiniMax-H3's pipeline computes it.
        x = x.to(self.device, non_blocking=non_blocking).permute(0, 4, 1, 2, 3)
        pixels = family_of(self.spec.family).pixels
        if pixels is None:
            x = x.to(dtype) / 127.5 - 1.0
        else:
            mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1, 1) for v in (pixels.mean, pixels.std))
            x = ((x.to(torch.float32) / 255.0 - mean) / std).to(_encoder_dtype(self.model, dtype))
        if condition == "video":
            # WanImageToVideoPipeline: cat([image, zeros(num_frames - 1)]) in the VAE's input range, where 0 is mid
            # grey (not representable in uint8, hence built here).
            b, c, _, h, w = x.shape
            x = torch.cat([x, x.new_zeros(b, c, frames - 1, h, w)], dim=2)
        if len(x) > 1 and not family_of(self.spec.family).batchable:
            # The family record says diffusers' encode cannot take a batch: one clip per call.
            params = torch.cat([self.model.encode(one).latent_dist.parameters for one in x.split(1)])
        else:
            params = self.model.encode(x).latent_dist.parameters
        # An encoder pinned to fp32 (MiniMax-H3) returns fp32: store what --dtype says, as every other family does.
        return params.to(dtype)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Raw (unscaled) latents [B, C, T, H, W] -> uint8 frames [B, T, H, W, 3], for previews."""
        z = latents.to(self.device, self.dtype)
        kwargs = {}
        if self.model.config.get("timestep_conditioning"):
            # LTX-Video 0.9.1+ decoders are timestep-conditioned; LTXPipeline decodes clean latents at timestep 0.
            kwargs["temb"] = torch.zeros(z.shape[0], device=self.device, dtype=self.dtype)
        try:
            video = self.model.decode(z, **kwargs).sample
        except ValueError as e:
            # diffusers 0.42's MiniMax-H3 decoder cannot decode its shortest clips (5 frames: 2 latent frames).
            raise ConfigError(f"the {self.spec.family} VAE's decoder cannot decode latents of shape "
                              f"{tuple(z.shape)} ({e}); preview longer clips") from e
        pixels = family_of(self.spec.family).pixels
        if pixels is None:
            video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        else:
            # MiniMax-H3's decode step: sample * std + mean, clamped to [0, 1].
            mean, std = (torch.tensor(v, device=video.device).view(1, 3, 1, 1, 1) for v in (pixels.mean, pixels.std))
            video = ((video.float() * std + mean).clamp(0, 1) * 255.0).round().to(torch.uint8)
        return video.permute(0, 2, 3, 4, 1).cpu().numpy()


def cast_keeping_fp32_modules(model: Any, dtype: torch.dtype) -> Any:
    """`model.to(dtype)`, keeping in fp32 the parameters and buffers its class pins there (`_keep_in_fp32_modules`:
    MiniMax-H3's encoder), matched by name part as diffusers' from_pretrained(torch_dtype=...) matches them."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if not keep:
        return model.to(dtype)
    # Tensor by tensor: the pinned ones are never rounded to `dtype` on the way (a cast there and back loses bits).
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            pinned = any(part in keep for part in name.split("."))
            tensor.data = tensor.data.to(torch.float32 if pinned else dtype)
    return model


def _encoder_dtype(model: Any, dtype: torch.dtype) -> torch.dtype:
    """The dtype the encoder's weights are in: `dtype`, or fp32 where the class pins it there."""
    first = next(model.encoder.parameters(), None)
    return first.dtype if first is not None else dtype


# On a CPU, clips per VAE call never exceed this: past it the per-call overhead is already paid off.
CPU_BATCH_LIMIT = 8
# Live fp32-sized tensors of one clip at the encoder's first width (input, conv, norm, activation, residual...).
_ACTIVATION_COPIES = 6


def _cpu_bytes_per_clip(model: Any, frames: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Estimated peak activation bytes of one clip: the encoder's first convolution's width at full resolution."""
    conv = next((m for m in model.encoder.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    channels = conv.out_channels if conv is not None else 128
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return frames * height * width * max(channels, 3) * itemsize * _ACTIVATION_COPIES


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30  # no sysconf (Windows): assume a small machine


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _from_pretrained(cls: Any, family: VAEFamily, settings: VAESettings) -> tuple[Any, str | None]:
    """Load a pipeline's VAE subfolder, or a repo or directory that is the VAE itself; refuse another family's."""
    source, subfolder, revision = settings.source, settings.subfolder, settings.revision
    if subfolder and Path(source).is_dir() and not (Path(source) / subfolder).is_dir():
        subfolder = None  # a local directory that is the VAE itself, not a pipeline
    tried = f"{source}/{subfolder}" if subfolder else source
    try:
        try:
            config = cls.load_config(source, subfolder=subfolder, revision=revision)
        except OSError:
            if not subfolder or Path(source).is_dir():
                raise
            subfolder = None  # a hub repo that is the VAE itself
            tried += f" and {source}"
            config = cls.load_config(source, revision=revision)
        vae_checks.check_config(config, f"--vae {tried}: config.json")
        found = config.get("_class_name")
        if not found or found == family.class_name:
            wrong = vae_checks.default_type_problems(config, cls)
            if wrong:
                raise ConfigError(f"--vae {tried}: config.json: {'; '.join(wrong[:3])}. Fix the VAE's config.json")
            _check_size(cls, config, source, subfolder, tried)
            return cls.from_pretrained(source, subfolder=subfolder, revision=revision), subfolder
    except ConfigError:
        raise  # already names the file and the fix (a ConfigError is a ValueError too)
    # A config whose fields disagree (a temperal_downsample shorter than dim_mult) fails inside the model's
    # constructor with whatever error its code meets first: the config's problem, named as such.
    except (OSError, ValueError, TypeError, IndexError, KeyError, NameError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(
            f"could not load {family.class_name} from {tried}: {str(e).rstrip('.')}. Pass a local directory "
            "holding config.json and weights (or a pipeline with a vae/ folder), or a hub id reachable from here "
            "(on an offline machine, download it first)."
        ) from e
    if found in UNSUPPORTED:
        raise ConfigError(f"--vae {source}: found a {found}, which latentcache cannot encode with: "
                          f"{UNSUPPORTED[found]}")
    known = {f.class_name: f.name for f in FAMILIES.values()}
    fix = f"pass --family {known[found]}" if found in known else "point --vae at one of the supported VAEs"
    raise ConfigError(f"--vae {source}: found a {found}, but the {family.name} family expects {family.class_name}; "
                      f"{fix}")


def _check_size(cls: Any, config: dict[str, Any], source: str, subfolder: str | None, tried: str) -> None:
    """Refuse a config that builds a model past any released VAE's size, and a local directory's weights larger than
    that model can be, before diffusers allocates the one or reads the other (vae_checks.check_model_size)."""
    with _quiet("diffusers.configuration_utils"):  # from_pretrained warns about unexpected keys once, below
        count = vae_checks.check_model_size(cls, config, f"--vae {tried}: config.json")
    folder = Path(source) / (subfolder or "")
    if folder.is_dir():
        try:
            files = weight_files(folder)
        except ConfigError:
            return  # no weights file: from_pretrained names what it looked for
        vae_checks.check_weights_size(files, count, f"--vae {tried}")


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
        subfolder = revision = provenance = None
        log.warning("using %s: random weights, for demos and tests only; its latents mean nothing", settings.source)
    elif settings.source.startswith(TINY_RANDOM_SUFFIX):
        other = settings.source[len(TINY_RANDOM_SUFFIX):]
        hint = f"; for that one pass --family {other}" if other in FAMILIES else ""
        raise ConfigError(f"--vae {settings.source} with --family {family.name}: the built-in tiny VAEs are "
                          f"{', '.join(TINY_RANDOM_SUFFIX + f for f in FAMILIES)}{hint}")
    else:
        check_hub_reachable(settings.source, settings.subfolder, settings.revision)
        model, subfolder = _from_pretrained(cls, family, settings)
        provenance = weights_provenance(settings.source, subfolder, settings.revision)
        # What was loaded, not what was asked for: the hub commit the revision (default: main) resolved to; None
        # for a local directory, where diffusers ignores --revision.
        revision = provenance.commit
    # Before the cast to the encode dtype: LTX-Video's latents_mean/latents_std are buffers that `.to(dtype)` would
    # round (bf16 keeps 8 bits), and the manifest's normalisation must not depend on --dtype.
    spec = vae_checks.checked_spec(model, family, str(Path(settings.source) / (subfolder or "")))
    with _quiet("diffusers.models.modeling_utils"):
        # diffusers warns about fp32-only modules even when there are none ("should be kept in float32: []").
        model = cast_keeping_fp32_modules(model.to(dev), dtype).eval().requires_grad_(False)
    identity = VAEIdentity(
        class_name=family.class_name,
        source=settings.source,
        subfolder=subfolder,
        revision=revision,
        # Private keys vary between processes (`_use_default_values` is a set's order, `_name_or_path` a local
        # path) and would make every rank and every restart look like another VAE.
        config_hash=hash_json({k: v for k, v in dict(model.config).items() if not k.startswith("_")}),
        random_weights=random_weights,
        weights=provenance.weights if provenance else None,
    )
    vae = VideoVAE(model, spec, identity, dev, dtype)
    vae.configure(settings.tiling, settings.frame_chunk)
    return vae
