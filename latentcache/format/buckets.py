"""The bucket name `FRAMESxHEIGHTxWIDTH` and the VAE frame rule: the two small contracts every stage shares.

A bucket names a clip size in pixels (`49x480x720`); it is a folder under shards/, a key of the manifest's
`buckets`, and each sample's `bucket`. Plans, chunk plans, manifests and samples may come from strangers, so every
reader parses it here, with the same bounds. No latentcache imports: the reader side (dataset, checks) and the
writer side (plan, chunks) both use it without pulling in each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# 1 to 6 digits without a leading zero: a bucket is a folder name, so nothing but digits and the two x's.
_BUCKET = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")


@dataclass(slots=True, frozen=True, order=True)
class Bucket:
    """Frames x height x width in pixels of every clip in one bucket; `str(b)` is its name, `Bucket.parse` the way
    back."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 999_999):
                raise ValueError(f"bucket {name} {value!r}: expected a whole number from 1 to 999999")

    @staticmethod
    def parse(text: Any) -> Bucket:
        """'49x480x720' -> Bucket(49, 480, 720). Raises ValueError quoting the text otherwise."""
        match = _BUCKET.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            shown = repr(text) if len(repr(text)) <= 80 else repr(text)[:80] + "..."
            raise ValueError(f"bucket {shown} is not FRAMESxHEIGHTxWIDTH such as 49x480x720")
        return Bucket(int(match[1]), int(match[2]), int(match[3]))

    @staticmethod
    def parse_or_none(text: Any) -> Bucket | None:
        """`parse`, or None for anything that is not a bucket name (for checks that list problems)."""
        try:
            return Bucket.parse(text)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


# "4k+1" (k*n+1 frames -> n+1 latent frames) or "17k+5->5k+2" (a*n+b frames -> c*n+d latent frames).
_RULE = re.compile(r"([1-9][0-9]{0,3})k\+([0-9]{1,4})(?:->([1-9][0-9]{0,3})k\+([0-9]{1,4}))?")


@dataclass(slots=True, frozen=True)
class FrameRule:
    """How a VAE counts frames: `frames_step * n + frames_offset` pixel frames (n = 0, 1, 2, ...) encode to
    `latents_step * n + latents_offset` latent frames. Most VAEs compress time by k with one leading frame of their
    own (`k*n+1 -> n+1`, written "4k+1"); MiniMax-H3 encodes 17-frame chunks into 5 latent frames and drops 3 at
    the end (`17n+5 -> 5n+2`, written "17k+5->5k+2"). A single frame (an image) is one latent frame under every
    rule."""

    frames_step: int
    frames_offset: int = 1
    latents_step: int = 1
    latents_offset: int = 1

    @staticmethod
    def parse(text: Any) -> FrameRule:
        """"4k+1" or "17k+5->5k+2" -> FrameRule. Raises ValueError quoting the text otherwise."""
        match = _RULE.fullmatch(text) if isinstance(text, str) else None
        if match is None or int(match[2]) < 1 or (match[4] is not None and int(match[4]) < 1):
            raise ValueError(f"frame rule {str(text)[:80]!r} is not 'Ak+B' (such as 4k+1) or 'Ak+B->Ck+D' (such as "
                             "17k+5->5k+2) with B, D >= 1")
        if match[3] is None:
            return FrameRule(int(match[1]), int(match[2]))
        return FrameRule(int(match[1]), int(match[2]), int(match[3]), int(match[4]))

    def __str__(self) -> str:
        text = f"{self.frames_step}k+{self.frames_offset}"
        if (self.latents_step, self.latents_offset) != (1, 1):
            text += f"->{self.latents_step}k+{self.latents_offset}"
        return text

    def fits(self, frames: int) -> bool:
        return frames == 1 or (frames >= self.frames_offset and (frames - self.frames_offset) % self.frames_step == 0)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of `frames` frames that `fits` the rule."""
        if frames == 1:
            return 1
        return (frames - self.frames_offset) // self.frames_step * self.latents_step + self.latents_offset

    def nearest(self, frames: int) -> tuple[int, int] | None:
        """None when `frames` fits; else the valid counts just below and above it."""
        if self.fits(frames):
            return None
        a, b = self.frames_step, self.frames_offset
        lower = max(b, (frames - b) // a * a + b) if frames >= b else (1 if b > 1 else b)
        upper = lower + a if lower >= b else b
        return lower, upper


def frame_rule(temporal_compression: int) -> str:
    """How a VAE that compresses time by k counts frames: 'kk+1' (4k+1: 1, 5, 9, ..., 49)."""
    return str(FrameRule(temporal_compression))


def nearest_frame_counts(frames: int, temporal_compression: int) -> tuple[int, int] | None:
    """None when `frames` fits the frame rule (k*n + 1 frames); else the valid counts just below and above it."""
    return FrameRule(temporal_compression).nearest(frames)
