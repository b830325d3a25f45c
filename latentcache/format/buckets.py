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


def frame_rule(temporal_compression: int) -> str:
    """How a VAE that compresses time by k counts frames: 'kk+1' (4k+1: 1, 5, 9, ..., 49)."""
    return f"{temporal_compression}k+1"


def nearest_frame_counts(frames: int, temporal_compression: int) -> tuple[int, int] | None:
    """None when `frames` fits the frame rule (k*n + 1 frames); else the valid counts just below and above it."""
    k = temporal_compression
    if frames >= 1 and (frames - 1) % k == 0:
        return None
    lower = max(1, (frames - 1) // k * k + 1)
    return lower, lower + k
