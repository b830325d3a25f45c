"""What a shard read yields on the read side: one sample's undecoded members with where it came from (`RawSample`).

Every stage before decoding (`stages`: share, mix, shuffle, group, skip) passes these, so a resumed run skips what it
saw from safetensors headers alone; `decoder.SampleDecoder` turns one into the trainer's tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from latentcache.errors import ShardFormatError
from latentcache.format.layout import LATENTS
from latentcache.format.reader import safetensors_header


@dataclass(slots=True, frozen=True)
class RawSample:
    """One sample as read from a shard, not decoded.

    `members`: the tar's members by extension, as `format.reader.iter_tar` groups them (with its `__key__`), which
    `format.reader.decode_sample` decodes. `draw` tells apart the draws of one sample within an epoch (another
    source, a resampled or repeated draw) so that each gets its own posterior noise; None for a sample's only draw.
    """

    key: str
    url: str
    bucket: str
    members: dict[str, Any]
    draw: str | None = None

    def drawn(self, draw: str) -> RawSample:
        """This sample as the draw `draw` (replacing any earlier tag)."""
        return dataclasses.replace(self, draw=draw)

    @property
    def draw_tags(self) -> tuple[str, ...]:
        """What the noise seed takes after the key: () for a sample's only draw."""
        return () if self.draw is None else (self.draw,)


def raw_shape(raw: RawSample) -> tuple[int, ...]:
    """The latent shape of a raw sample, from its safetensors header only (no tensor is built)."""
    where = f"{raw.url}: member {raw.key}.{LATENTS}"
    if LATENTS not in raw.members:
        raise ShardFormatError(f"{raw.url}: sample {raw.key!r} has no {LATENTS} member")
    mean = safetensors_header(raw.members[LATENTS], where).get("mean")
    if not isinstance(mean, dict) or not isinstance(mean.get("shape"), list):
        raise ShardFormatError(f"{where}: no 'mean' tensor")
    return tuple(int(d) for d in mean["shape"])
