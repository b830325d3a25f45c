"""The latent spec: what a stored latent of a VAE looks like and how a trainer normalises it.

Part of the on-disk format (the manifest's `latent_spec`): the write side builds it from the loaded VAE
(`encode.vae`), the read side rebuilds it from the manifest, so it lives here and imports no VAE code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from latentcache.errors import ConfigError
from latentcache.format.buckets import FrameRule


class ClipShape(Protocol):
    """What `check_clip` reads of a clip's settings (encode.settings.ClipSettings has it): the format layer names
    no write-side type."""

    frames: int
    height: int
    width: int
    buckets: tuple[str, ...]  # "HxW" sizes that replace height x width when given (checked by the plan)


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
    # The frame rule where it is not `k*n+1 -> n+1` for `temporal_compression` k, as `FrameRule` writes it
    # ("17k+5->5k+2", MiniMax-H3); None: that usual rule. The manifest states the rule either way as `frame_rule`.
    frame_mapping: str | None = None

    @property
    def rule(self) -> FrameRule:
        if self.frame_mapping is not None:
            return FrameRule.parse(self.frame_mapping)
        return FrameRule(self.temporal_compression)

    @property
    def frame_rule(self) -> str:
        return str(self.rule)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (
            self.channels,
            self.rule.latent_frames(frames),
            height // self.spatial_compression,
            width // self.spatial_compression,
        )

    def check_clip(self, clip: ClipShape) -> None:
        """Refuse frame counts and sizes this VAE cannot encode exactly, offering the nearest valid values."""
        nearest = self.rule.nearest(clip.frames)
        if nearest is not None:
            raise ConfigError(
                f"--frames {clip.frames} does not fit the {self.family} VAE, which needs {self.frame_rule} frames; "
                f"nearest valid: {nearest[0]} or {nearest[1]}"
            )
        s = self.spatial_compression
        # --buckets replace --height/--width: their sizes are checked instead (encode.chunk_plan.check_buckets).
        for name, value in (() if clip.buckets else (("height", clip.height), ("width", clip.width))):
            if value < s or value % s:
                lower = max(s, value // s * s)
                raise ConfigError(
                    f"--{name} {value} is not a multiple of the {self.family} VAE's spatial compression {s}; "
                    f"nearest valid: {lower} or {lower + s}"
                )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["frame_mapping"]  # `frame_rule` states it, in the words older manifests already use
        d["frame_rule"] = self.frame_rule
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> LatentSpec:
        names = {f.name for f in dataclasses.fields(LatentSpec)} - {"frame_mapping"}
        kwargs = {k: v for k, v in d.items() if k in names}
        # Manifests before general frame rules state "Kk+1" for their temporal_compression K: no mapping to keep.
        stated = d.get("frame_rule")
        if stated is not None and FrameRule.parse(stated) != FrameRule(int(d.get("temporal_compression") or 1)):
            kwargs["frame_mapping"] = str(FrameRule.parse(stated))
        for k in ("latents_mean", "latents_std"):
            if kwargs.get(k) is not None:
                kwargs[k] = tuple(kwargs[k])
        return LatentSpec(**kwargs)

    def describe_normalization(self) -> str:
        """How `normalize` maps raw latents to model space, in words, for reports."""
        scale = "" if self.scaling_factor in (None, 1.0) else f" * {self.scaling_factor:g}"
        if self.latents_mean is not None and self.latents_std is not None:
            return f"per-channel (z - mean) / std{scale} ({len(self.latents_mean)} channels)"
        shift = f"(z - {self.shift_factor:g})" if self.shift_factor else "z"
        return f"{shift}{scale}" if scale else f"{shift} (no scaling)"

    def _scale(self) -> float:
        # Video latents are always multiplied by the scaling factor (every CogVideoX pipeline decodes
        # `latents / scaling_factor`). `invert_scale_latents` (CogVideoX 1.5) only changes how the image-to-video
        # pipeline scales the *conditioning image* latents, so it is recorded but not applied here.
        return float(self.scaling_factor) if self.scaling_factor is not None else 1.0  # float(): JSON may give an int

    def affine(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(gain, offset), each [C, 1, 1, 1]: model-space latents are `z * gain + offset`, per channel."""
        scale = self._scale()
        if self.latents_mean is not None and self.latents_std is not None:
            mean = torch.tensor([float(v) for v in self.latents_mean], dtype=torch.float64)
            gain = scale / torch.tensor([float(v) for v in self.latents_std], dtype=torch.float64)
            offset = -mean * gain
        else:
            gain = torch.full((self.channels,), scale, dtype=torch.float64)
            offset = torch.full((self.channels,), -float(self.shift_factor or 0.0) * scale, dtype=torch.float64)
        return gain.to(dtype).view(-1, 1, 1, 1), offset.to(dtype).view(-1, 1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents [..., C, T, H, W] -> what the transformer trains on. Apply exactly once."""
        gain, offset = self.affine(z.dtype)
        return z * gain + offset

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`, for decoding model-space latents back to video."""
        gain, offset = self.affine(z.dtype)
        return (z - offset) / gain


# How each family's image-to-video pipeline conditions on its first frame (`--image-latents`), which fixes what a
# sample's `image_mean` holds and how a reader rebuilds the conditioning: "image" (the first frame alone as a 1-frame
# video, CogVideoXImageToVideoPipeline), "video" (the first frame followed by zero frames, encoded as one clip,
# WanImageToVideoPipeline). A family not listed has no cached image-to-video conditioning.
IMAGE_CONDITIONS: dict[str, str] = {"cogvideox": "image", "wan": "video"}


def image_condition_of(family: str) -> str:
    """The family's image-to-video conditioning ("image" or "video"); ConfigError when it is not cached."""
    mode = IMAGE_CONDITIONS.get(family)
    if mode is None:
        raise ConfigError(f"--image-latents: the {family} family's image-to-video conditioning is not cached by "
                          f"latentcache (supported: {', '.join(IMAGE_CONDITIONS)}); drop --image-latents")
    return mode


def image_condition_problem(spec: LatentSpec) -> str | None:
    """Why `--image-latents` cannot cache this VAE's image-to-video conditioning, or None when it can."""
    try:
        image_condition_of(spec.family)
    except ConfigError as e:
        return str(e)
    if spec.family == "wan" and spec.channels != 16:
        # WanImageToVideoPipeline with expand_timesteps (Wan 2.2 TI2V-5B, the 48-channel VAE) encodes the image
        # alone and puts it in place of the first latent frame, with no mask channels: not the "video" layout.
        return (f"--image-latents: this {spec.channels}-channel Wan VAE (Wan 2.2 TI2V-5B) conditions by replacing "
                "the first latent frame with the image's own latents (expand_timesteps), which latentcache does not "
                "cache; the first frame is already the first latent frame of the stored video latents: drop "
                "--image-latents")
    return None


def image_condition_channels(spec: LatentSpec) -> int:
    """Channels of the conditioning a dataset yields as `image_latents`, concatenated to the video latents along
    channels by the I2V pipeline: C (CogVideoX), or a mask of `temporal_compression` channels plus C (Wan)."""
    mode = image_condition_of(spec.family)
    return spec.channels + (spec.temporal_compression if mode == "video" else 0)
