"""The split of shards and samples over ranks x DataLoader workers, as pure functions: no file is opened."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from latentcache.train.partition import (
    Share,
    Slot,
    check_weights,
    mix_sources,
    mixed_draws,
    shard_order,
    share_of,
    share_samples,
)


def deal(samples: list[int], slots: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True
         ) -> list[list[tuple[int, int]]]:
    """(shard, sample) pairs each slot reads, following its Share exactly as stages.read_share does."""
    order = shard_order(len(samples), seed=seed, epoch=epoch, shuffle=shuffle)
    out = []
    for index in range(slots):
        share = share_of(order, Slot(index, slots))
        pairs = [(s, i) for s in share.shards for i in range(samples[s])]
        out.append([p for n, p in enumerate(pairs) if share.keeps(n)])
    return out


@pytest.mark.parametrize("shards", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("slots", [1, 2, 3, 4, 6, 8])
def test_every_sample_goes_to_exactly_one_slot(shards: int, slots: int) -> None:
    samples = [2 + (i * 5) % 7 for i in range(shards)]  # uneven shards, as rare buckets leave them
    dealt = deal(samples, slots)
    assert Counter(itertools.chain.from_iterable(dealt)) == Counter((s, i) for s in range(shards)
                                                                    for i in range(samples[s]))
    order = shard_order(shards, seed=0, epoch=0, shuffle=True)
    for index, got in enumerate(dealt):
        assert share_samples(share_of(order, Slot(index, slots)), samples) == len(got)


def test_whole_shards_when_there_are_enough_samples_otherwise() -> None:
    order = [3, 1, 0, 2]
    assert share_of(order, Slot(1, 2)) == Share((1, 2))
    assert share_of(order, Slot(5, 6)) == Share((3, 1, 0, 2), stride=6, offset=5)
    assert share_samples(Share((3, 1, 0, 2), 6, 5), [2, 2, 2, 2]) == 1  # of running numbers 0..7: 5
    assert share_samples(Share((3, 1, 0, 2), 6, 0), [2, 2, 2, 2]) == 2  # 0 and 6


def test_shard_order_is_a_permutation_seeded_by_seed_and_epoch() -> None:
    base = shard_order(50, seed=1, epoch=0, shuffle=True)
    assert sorted(base) == list(range(50))
    assert base == shard_order(50, seed=1, epoch=0, shuffle=True)
    assert base != shard_order(50, seed=1, epoch=1, shuffle=True)
    assert base != shard_order(50, seed=2, epoch=0, shuffle=True)
    assert shard_order(5, seed=1, epoch=3, shuffle=False) == [0, 1, 2, 3, 4]


def test_slot_of_ranks_and_workers() -> None:
    assert Slot.of(1, 2, 2, 3) == Slot(5, 6, 3)
    assert {Slot.of(r, 2, w, 3).index for r in range(2) for w in range(3)} == set(range(6))
    with pytest.raises(ValueError, match="out of range"):
        Slot.of(2, 2, 0, 1)


def test_weighted_mix_is_deterministic_and_follows_the_weights() -> None:
    draws = list(mix_sources([3.0, 1.0, 0.0], 20000, seed=4, epoch=2, slot=1))
    assert draws == list(mix_sources([3.0, 1.0, 0.0], 20000, seed=4, epoch=2, slot=1))
    assert draws != list(mix_sources([3.0, 1.0, 0.0], 20000, seed=4, epoch=3, slot=1))
    assert draws != list(mix_sources([3.0, 1.0, 0.0], 20000, seed=4, epoch=2, slot=0))
    counts = Counter(draws)
    assert counts[2] == 0 and abs(counts[0] / 20000 - 0.75) < 0.02
    endless = mix_sources([1.0, 1.0], None, seed=0, epoch=0, slot=0)
    assert len(list(itertools.islice(endless, 50000))) == 50000
    with pytest.raises(ValueError, match="positive sum"):
        list(mix_sources([0.0, 0.0], 3, seed=0, epoch=0, slot=0))
    with pytest.raises(ValueError, match="non-negative"):
        list(mix_sources([1.0, -1.0], 3, seed=0, epoch=0, slot=0))


@pytest.mark.parametrize("weights", [[float("inf"), 1.0], [float("nan"), 1.0], [1.0, -0.5], ["1", 1.0], [True, 1.0]])
def test_bad_weights_are_refused_quoting_the_value(weights) -> None:
    with pytest.raises(ValueError, match=r"weights\[0\]|weights\[1\].*finite, non-negative"):
        check_weights(weights, 2)


def test_huge_weights_are_normalised_before_the_sum() -> None:
    """1e308 twice overflowed the cumulative sum to inf, and source 0 was never drawn."""
    assert check_weights([1e308, 1e308], 2) == [1.0, 1.0]
    counts = Counter(mix_sources([1e308, 1e308], 2000, seed=0, epoch=0, slot=0))
    assert abs(counts[0] / 2000 - 0.5) < 0.05


def test_mixed_draws_are_equal_on_every_slot() -> None:
    assert [mixed_draws(10, s) for s in (1, 2, 3, 4, 11)] == [10, 5, 4, 3, 1]
