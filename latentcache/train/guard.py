"""The guard: refuse latents a diffusers transformer cannot take, naming each number, before the first step."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from latentcache.errors import LatentMismatchError, ShardFormatError
from latentcache.format.buckets import Bucket
from latentcache.format.spec import LatentSpec

log = logging.getLogger(__name__)


# Families whose transformer takes 2C+1 channels even for text-to-video: the pipeline concatenates zero condition
# latents and a zero mask (HunyuanVideo15Pipeline.prepare_cond_latents_and_mask).
ALWAYS_CONDITIONED = frozenset({"hunyuanvideo15"})


def _config_get(transformer_or_config: Any) -> Any:
    config = getattr(transformer_or_config, "config", transformer_or_config)
    if isinstance(config, dict):
        return config.get
    return lambda k, d=None: getattr(config, k, d)


def bucket_latent_shape(spec: LatentSpec, bucket: str) -> tuple[int, int, int, int]:
    """'49x480x720' (frames x height x width in pixels) -> latent (C, T, H, W)."""
    try:
        parsed = Bucket.parse(bucket)
    except ValueError as e:
        raise ShardFormatError(str(e)) from None
    return spec.latent_shape(parsed.frames, parsed.height, parsed.width)


def transformer_problems(transformer_or_config: Any, spec: LatentSpec, buckets: Iterable[str], *,
                         image_to_video: bool = False, pad_frames: bool = False,
                         image_channels: int | None = None) -> list[str]:
    """Why latents of these buckets cannot go into this diffusers transformer (CogVideoX-style config); [] if fine.

    Reads in_channels, patch_size(_t), temporal_compression_ratio, sample_frames/height/width and the kind of
    positional embedding. Learned positional embeddings only fit their own size; sincos ones are recomputed for
    other sizes by diffusers (a warning, not a refusal); rotary ones fit any size.
    """
    get = _config_get(transformer_or_config)
    problems: list[str] = []
    in_channels = int(get("in_channels"))
    c = spec.channels
    # Image-to-video inputs: the noisy latents plus conditioning concatenated along channels. CogVideoX I2V: 2C;
    # HunyuanVideo I2V: 2C+1 (a mask channel); Wan 2.1 I2V: 2C+4 (a 4-channel frame mask); LTX-Video and Wan 2.2
    # TI2V condition in the token sequence or the first latent frame instead, and take C.
    twice = f"twice the VAE's {c} latent channels"
    i2v_layouts = {2 * c: twice, 2 * c + 1: f"{twice} plus a mask channel",
                   2 * c + 4: f"{twice} plus 4 (a frame mask)"}
    if image_to_video and image_channels is not None:
        # The dataset yields `image_latents` (--image-latents): the pipeline's input is exactly latents + those.
        if in_channels != c + image_channels:
            problems.append(f"in_channels={in_channels}, but the latents ({c} channels) concatenated with the "
                            f"cached image_latents ({image_channels} channels, the {spec.family} I2V pipeline's "
                            f"conditioning) give {c + image_channels}: use the {spec.family} image-to-video "
                            "transformer these were made for, or re-encode with its VAE")
    elif image_to_video:
        if in_channels != c and in_channels not in i2v_layouts:
            problems.append(f"in_channels={in_channels} fits no image-to-video layout of {c}-channel latents "
                            f"({c}, {', '.join(str(n) for n in i2v_layouts)}): encode with the VAE this "
                            "transformer was trained with")
    elif spec.family in ALWAYS_CONDITIONED and in_channels == 2 * c + 1:
        # HunyuanVideo15Pipeline (text-to-video too) feeds cat([latents, zeros like latents, a zero mask channel]).
        log.info("in_channels=%d: the %s transformer takes the latents concatenated with zero condition latents "
                 "and a zero mask channel for text-to-video (as its pipeline does); build them in the training step",
                 in_channels, spec.family)
    elif in_channels in i2v_layouts:
        problems.append(
            f"in_channels={in_channels} is {i2v_layouts[in_channels]}: an image-to-video model, whose input "
            "is the noisy video latents concatenated with the image latents (and a mask) along channels. Pass "
            "image_to_video=True and build the conditioning in the training step.")
    elif in_channels != c:
        problems.append(f"in_channels={in_channels}, the latents have {c} channels: encode with the VAE this "
                        "transformer was trained with")
    compression = get("temporal_compression_ratio")
    if compression is not None and int(compression) != spec.temporal_compression:
        problems.append(f"temporal_compression_ratio={compression}, the VAE compresses time by "
                        f"{spec.temporal_compression}")
    for bucket in sorted(set(buckets)):
        problems.extend(_bucket_problems(get, spec, bucket, pad_frames))
    return problems


def check_transformer(transformer_or_config: Any, spec: LatentSpec, buckets: Iterable[str],
                      where: str | os.PathLike, *, image_to_video: bool = False, pad_frames: bool = False,
                      image_channels: int | None = None) -> None:
    """Raise LatentMismatchError listing every reason the latents at `where` do not fit the transformer."""
    problems = transformer_problems(transformer_or_config, spec, buckets, image_to_video=image_to_video,
                                    pad_frames=pad_frames, image_channels=image_channels)
    if problems:
        raise LatentMismatchError(f"{where}: these latents do not fit the transformer:\n  - "
                                  + "\n  - ".join(problems))


def _patch_sizes(get: Any) -> tuple[int | None, int, int]:
    """(time, height, width) patch sizes: CogVideoX/Hunyuan/LTX give patch_size (+ patch_size_t), Wan a tuple."""
    patch = get("patch_size") or 1
    if isinstance(patch, list | tuple):
        t, h, w = patch if len(patch) == 3 else (None, *patch)
        return (int(t) if t else None), int(h), int(w)
    pt = get("patch_size_t")
    return (int(pt) if pt else None), int(patch), int(patch)


def _bucket_problems(get: Any, spec: LatentSpec, bucket: str, pad_frames: bool = False) -> list[str]:
    _, t, h, w = bucket_latent_shape(spec, bucket)
    problems = []
    pt, ph, pw = _patch_sizes(get)
    for name, size, p in (("height", h, ph), ("width", w, pw)):
        if size % p:
            problems.append(f"bucket {bucket}: latent {name} {size} is not a multiple of patch_size {p}; encode at a "
                            f"{name} that is a multiple of {p * spec.spatial_compression} pixels")
    if pt and t % pt and not pad_frames:
        problems.append(f"bucket {bucket}: {t} latent frames is not a multiple of patch_size_t {pt}; pad the latents "
                        "to a multiple in the training step (as CogVideoX 1.5 pipelines do) and pass pad_frames=True, "
                        "or encode other frames")
    frames, sh, sw = get("sample_frames"), get("sample_height"), get("sample_width")
    if frames is None or sh is None or sw is None:
        return problems
    model_t = spec.rule.latent_frames(int(frames))
    mismatch = [f"{n} {have} vs the config's {want}" for n, have, want in
                (("latent frames", t, model_t), ("latent height", h, sh), ("latent width", w, sw)) if have != want]
    if not mismatch:
        return problems
    if get("use_learned_positional_embeddings"):
        problems.append(f"bucket {bucket}: {', '.join(mismatch)} (sample_frames={frames}); this model's learned "
                        "positional embeddings only exist for its own size: encode at "
                        f"{frames}x{int(sh) * spec.spatial_compression}x{int(sw) * spec.spatial_compression}")
    elif not get("use_rotary_positional_embeddings"):
        log.warning("bucket %s: %s; diffusers recomputes the sincos positional embeddings for this size, which "
                    "the model was not trained on", bucket, ", ".join(mismatch))
    return problems

