"""What a dataset reads (`Selection`): its output directories (`Source`s), their shards in one list, and the weights
of a mix, refused when the same data is named twice, when nothing holds a sample, or when a manifest's counts do not
add up. Where shards are and how they are read is `shard_sources`; this module only combines and checks them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentcache.errors import ConfigError, ShardFormatError
from latentcache.format.manifest import Manifest
from latentcache.storage import location
from latentcache.train.options import checked_weights
from latentcache.train.partition import check_weights
from latentcache.train.shard_sources import ShardRef, resolve_sources


def refuse_duplicates(outputs: Sequence[tuple[str, Any]], shards: Sequence[tuple[str, str]]) -> None:
    """Refuse an output, or a shard, named twice (by any spelling): its samples would come twice per epoch.
    `outputs` and `shards` are (spelling, label) pairs; the error names both spellings."""
    for kind, items in (("output", outputs), ("shard", shards)):
        seen: dict[str, str] = {}
        for spelling, label in items:
            key = location.identity(str(spelling))
            if key in seen:
                raise ShardFormatError(f"{label}: the same {kind} is given twice ({seen[key]!r} and {spelling!r} are "
                                       f"both {key}); its samples would come twice per epoch: name it once")
            seen[key] = str(spelling)


@dataclass(slots=True, frozen=True)
class Source:
    """One output directory of a multi-source dataset: its shards are `dataset.shards[first:first + count]`."""

    root: Path
    manifest: Manifest
    first: int
    count: int


@dataclass(slots=True, frozen=True)
class Selection:
    """The sources of a dataset, all their shards in one list (each source's a slice of it), and the weights a
    weighted mix draws them by (None: one stream over all shards)."""

    sources: list[Source]
    shards: list[ShardRef]
    weights: list[float] | None

    def source_shards(self, i: int) -> list[ShardRef]:
        source = self.sources[i]
        return self.shards[source.first:source.first + source.count]

    def source_total(self, i: int) -> int:
        return sum(s.samples for s in self.source_shards(i))

    def mix_weights(self) -> list[float]:
        """The weights the draw uses: a source that holds no samples at all is never drawn (weight 0)."""
        assert self.weights is not None
        return [w if self.source_total(i) else 0.0 for i, w in enumerate(self.weights)]


def select(source: str | os.PathLike | Iterable[str | os.PathLike], manifest: str | os.PathLike | None,
           weights: Sequence[float] | None) -> Selection:
    """The dataset's sources and shards (see LatentShardDataset for what `source` may be), checked."""
    if not isinstance(source, str | os.PathLike):
        source = list(source)  # read twice: resolved, and its spellings named when one repeats
    resolved = resolve_sources(source, manifest)
    weights = checked_weights(weights)
    if weights is not None:
        check_weights(weights, len(resolved))
    sources: list[Source] = []
    shards: list[ShardRef] = []
    for data, root, refs in resolved:
        sources.append(Source(root, data, len(shards), len(refs)))
        shards.extend(refs)
    selection = Selection(sources, shards, weights)
    refuse_duplicates([(str(d), str(d)) for d in source] if len(sources) > 1 else [],
                      [(s.url, s.url) for s in shards])
    # A weighted source with no samples at all is never drawn (`mix_weights`); all of them empty: nothing to
    # draw from.
    if weights is not None and not any(w > 0 and selection.source_total(i) for i, w in enumerate(weights)):
        raise ConfigError(f"weights {weights}: every source with a weight > 0 holds no samples")
    if not any(selection.source_total(i) for i in range(len(sources))):
        # A trainer started on it would run zero steps without a word.
        raise ShardFormatError(f"{', '.join(str(s.root) for s in sources)}: no samples in "
                               f"{len(shards)} shard(s): every input was skipped or failed when it was "
                               "encoded (see failures.jsonl there, or `latentcache info`)")
    for s in sources:  # what `verify` refuses in a manifest, the dataset refuses too
        if s.manifest.counts_problem(s.root):
            raise ShardFormatError(f"{s.manifest.counts_problem(s.root)}: damaged or edited; rebuild it with "
                                   "`latentcache finalize DIR`")
    return selection
