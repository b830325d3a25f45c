"""One tree of settings, built once by the CLI (or a test) and passed down; nothing reads settings elsewhere.

`fingerprint()` hashes the fields that change what is written, so a rerun with other settings is refused instead
of mixing two kinds of latents in one directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True, slots=True, frozen=True)
class ClipSettings:
    frames: int = 49
    fps: float = 8.0
    height: int = 480
    width: int = 720
    # "first", "uniform:K", "sliding:STRIDE_S" or "all" (non-overlapping clips).
    strategy: str = "first"
    # "crop": scale to fill then center-crop; "fit": scale to fit then pad with black.
    resize: str = "crop"
    # What to do with a video shorter than one clip: "skip" (reported) or "pad" (repeat the last frame).
    short: str = "skip"
    seed: int = 0

    @property
    def bucket(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(kw_only=True, slots=True, frozen=True)
class TilingSettings:
    """Spatial tiling of the VAE encoder, in pixels. Validated against the VAE before any clip is encoded."""

    tile_height: int
    tile_width: int
    overlap: float


@dataclass(kw_only=True, slots=True, frozen=True)
class VAESettings:
    # A built-in name (tiny-random-cogvideox), a local directory or a hub id such as THUDM/CogVideoX-2b.
    source: str = "THUDM/CogVideoX-2b"
    family: str = "cogvideox"
    subfolder: str | None = "vae"
    revision: str | None = None
    # "auto": fp16 on a GPU, fp32 on CPU.
    dtype: str = "auto"
    tiling: TilingSettings | None = None
    # Frames fed to the encoder per step (CogVideoX: a multiple of 8; None keeps the VAE's own default).
    frame_chunk: int | None = None


@dataclass(kw_only=True, slots=True, frozen=True)
class EncodeSettings:
    clip: ClipSettings = field(default_factory=ClipSettings)
    vae: VAESettings = field(default_factory=VAESettings)
    samples_per_shard: int = 64
    # Runtime knobs: they change how fast the work goes, never what is written.
    device: str = "auto"
    batch_size: int = 1
    strict: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def output_affecting(self) -> dict[str, Any]:
        d = self.to_dict()
        for runtime_only in ("device", "batch_size", "strict"):
            d.pop(runtime_only)
        return d

    def fingerprint(self) -> str:
        return hash_json(self.output_affecting())


def hash_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
