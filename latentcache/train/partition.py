"""Which shards and samples each rank x DataLoader-worker slot reads: pure functions of counts, seeds and ids.

No I/O and no torch state: the dataset, SAT's map-style wrapper and the tests all call the same functions, so what
one slot reads, and how many samples that is, is known from the manifest's counts alone.

The rule: shards are permuted per (seed, epoch) when shuffling, then dealt out round-robin, whole, when there are at
least as many shards as slots; with fewer shards than slots every slot reads every shard and keeps every
`count`-th sample instead. Either way, every sample goes to exactly one slot per epoch.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from latentcache.errors import ConfigError


def seed_of(*parts: Any) -> int:
    """A 64-bit seed from any parts; the same on every machine and Python (unlike hash())."""
    return int.from_bytes(hashlib.sha1(":".join(map(str, parts)).encode()).digest()[:8], "little")


@dataclass(slots=True, frozen=True)
class Slot:
    """One reader among all ranks x DataLoader workers."""

    index: int  # global id: rank * workers + worker
    count: int  # ranks x workers
    workers: int = 1  # DataLoader workers per rank

    @staticmethod
    def of(rank: int, world: int, worker: int = 0, workers: int = 1) -> Slot:
        if not (0 <= rank < world and 0 <= worker < workers):
            raise ConfigError(f"rank {rank} of {world}, worker {worker} of {workers}: out of range")
        return Slot(rank * workers + worker, world * workers, workers)


@dataclass(slots=True, frozen=True)
class Share:
    """What one slot reads in one epoch: these shards (indices into the shard list), in this order, keeping the
    samples whose running number n (over these shards) has n % stride == offset."""

    shards: tuple[int, ...]
    stride: int = 1
    offset: int = 0

    def keeps(self, n: int) -> bool:
        return n % self.stride == self.offset


def shard_order(shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's order of shard indices: a permutation seeded by (seed, epoch) when shuffling, else 0..n-1."""
    order = list(range(shards))
    if shuffle:
        random.Random(seed_of(seed, epoch, "shards")).shuffle(order)
    return order


def share_of(order: Sequence[int], slot: Slot) -> Share:
    """Whole shards, round-robin, when there are enough for every slot; every slot.count-th sample otherwise."""
    if len(order) >= slot.count:
        return Share(tuple(order[slot.index::slot.count]))
    return Share(tuple(order), slot.count, slot.index)


def share_samples(share: Share, samples: Sequence[int]) -> int:
    """How many samples a share yields, from the per-shard counts (`samples[i]` for shard i) alone."""
    total = sum(samples[i] for i in share.shards)
    return total if share.stride == 1 else len(range(share.offset, total, share.stride))


def share_counts(share: Share, shards: Sequence[tuple[int, Hashable]]) -> Counter[Hashable]:
    """Samples a share yields per group (e.g. latent shape), from each shard's (samples, group) alone."""
    counts: Counter[Hashable] = Counter()
    n = 0
    for i in share.shards:
        samples, group = shards[i]
        counts[group] += len(range(share.offset, n + samples, share.stride)) - len(range(share.offset, n,
                                                                                         share.stride))
        n += samples
    return counts


def grouped_items(counts: Iterable[int], batch_size: int | None, drop_last: bool) -> int:
    """Items `stages.grouped` makes of these per-group sample counts: samples, or batches of one group each (the
    last of a group short, or dropped with drop_last)."""
    if not batch_size:
        return sum(counts)
    return sum(c // batch_size if drop_last else -(-c // batch_size) for c in counts)


def check_weights(weights: Sequence[float], sources: int) -> list[float]:
    """The weights as fractions of their largest (so 1e308s do not overflow a sum); ValueError, quoting the bad
    value, unless there is one finite number >= 0 per source and at least one is > 0."""
    if len(weights) != sources:
        raise ConfigError(f"{len(weights)} weights for {sources} sources")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"weights[{i}] is {w!r}: each weight must be a finite, non-negative number "
                             f"(weights {list(weights)})")
    top = max(weights, default=0)
    if not top > 0:
        raise ConfigError(f"weights {list(weights)} must be non-negative numbers with a positive sum")
    return [w / top for w in weights]  # each in [0, 1]: their sum is at most `sources`, always finite


def mixed_draws(samples: int, slots: int) -> int:
    """Samples each slot draws per weighted epoch: the same for every rank x worker slot (unequal counts hang DDP),
    ceil(samples / slots) so that every slot draws at least one while there is any sample at all."""
    return -(-samples // slots)


def mix_sources(weights: Sequence[float], draws: int | None, *, seed: int, epoch: int, slot: int) -> Iterator[int]:
    """The source each of `draws` samples (None: endless) comes from, for weighted mixing: source i with
    probability weights[i] / sum(weights), the same sequence for the same (seed, epoch, slot) on every machine.

    The dataset draws `mixed_draws` samples per slot, the same number on every slot; a source drawn more often than
    it holds samples starts over, and a slot whose share of a source is empty reads the whole source
    (`stages.mixed`, `LatentShardDataset`)."""
    rng = random.Random(seed_of(seed, epoch, "mix", slot))
    cumulative = list(itertools.accumulate(check_weights(weights, len(weights))))
    for _ in itertools.count() if draws is None else range(draws):
        yield bisect.bisect(cumulative, rng.random() * cumulative[-1], 0, len(cumulative) - 1)
