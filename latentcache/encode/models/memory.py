"""The out-of-memory policy: a batch that runs out of accelerator memory is retried with spatial tiles, ever smaller,
each with an overlap that keeps the latents exactly the planned size (`fallback_tilings`); the configured tiling is
restored afterwards. The VAE is reconfigured only through `VideoVAE.configure`; the pipeline calls
`encode_with_fallback` and nothing else of this module."""

from __future__ import annotations

import logging

import numpy as np
import torch

from latentcache.encode.models.families import tile_problem
from latentcache.encode.models.vae import VideoVAE
from latentcache.encode.settings import TilingSettings
from latentcache.errors import InputError

log = logging.getLogger(__name__)

# Tile overlaps tried on an out-of-memory retry, most blending first; 0 is always exact (see families.tile_problem).
FALLBACK_OVERLAPS = (0.25, 0.5, 1 / 3, 0.125, 0.0)


def fallback_tilings(height: int, width: int, spatial: int,
                     configured: TilingSettings | None = None) -> list[TilingSettings]:
    """Ever smaller valid tilings for a clip that ran out of memory: halve the tile (from the configured one, or from
    the clip) down to two latents a side. Each has an overlap that keeps the latents exactly the right size."""
    th, tw = (min(configured.tile_height, height), min(configured.tile_width, width)) if configured else (height, width)
    smallest = 2 * spatial
    found: list[TilingSettings] = []
    while th > smallest or tw > smallest:
        th, tw = max(smallest, th // 2 // spatial * spatial), max(smallest, tw // 2 // spatial * spatial)
        for overlap in FALLBACK_OVERLAPS:
            tiling = TilingSettings(tile_height=th, tile_width=tw, overlap=overlap)
            if tile_problem(tiling, spatial) is None:
                found.append(tiling)
                break
    return found


def is_out_of_memory(error: BaseException) -> bool:
    # cuDNN and some kernels report an allocation failure as a plain RuntimeError.
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def release_cached_memory(vae: VideoVAE) -> None:
    if vae.device.type == "cuda":
        torch.cuda.empty_cache()


def encode_with_fallback(vae: VideoVAE, frames: np.ndarray, sources: list[str]
                         ) -> tuple[torch.Tensor, torch.Tensor, TilingSettings | None]:
    """`vae.encode`, retried with tiling and then smaller tiles when it runs out of memory.

    Returns (mean, logvar, the tiling that was needed, or None). The configured tiling is restored afterwards, so
    whether a clip is tiled depends on that clip alone, never on which clips a process happened to encode before.
    Raises InputError (stage "encode") when even the smallest tiles do not fit.
    """
    configured = vae.tiling
    smaller = fallback_tilings(frames.shape[2], frames.shape[3], vae.spec.spatial_compression, configured)
    last: BaseException | None = None
    try:
        for tiling in [None, *smaller]:  # None: as configured
            if tiling is not None:
                release_cached_memory(vae)
                log.warning("%s: out of memory; retrying with %dx%d tiles, overlap %g", ", ".join(sources),
                            tiling.tile_height, tiling.tile_width, tiling.overlap)
                vae.configure(tiling, None)
            try:
                mean, logvar = vae.encode(frames, sources=sources)
                return mean, logvar, tiling
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                # Keep the message, drop the traceback: its frames hold the activations that filled the memory.
                last = e.with_traceback(None)
    finally:
        if last is not None:
            vae.configure(configured, None)
            release_cached_memory(vae)
    raise InputError(", ".join(sources), "encode", f"out of memory even with the smallest tiles ({last}); use a "
                     "bigger GPU, fewer --frames or a smaller --height/--width") from last
