"""The numbers and names a user passes to `LatentShardDataset`, checked before any shard is looked at.

A float, inf or nan where a count belongs would loop forever (shuffle_buffer=inf holds the whole epoch in memory)
or fail deep inside a DataLoader worker, so each is refused here with a ConfigError that quotes it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from latentcache.errors import ConfigError
from latentcache.train.decoder import LAYOUTS


def number(name: str, value: Any) -> float:
    """A user's number as a float; ValueError naming the argument and the value when it is not one."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name}: {repr(value)[:80]} is not a number") from None


def whole_number(name: str, value: Any, minimum: int) -> int:
    """A user's count or index: an int (not a bool, float, inf or nan) >= minimum; ValueError quoting it."""
    if not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum:
        return int(value)  # numpy's integers too
    raise ConfigError(f"{name} is {repr(value)[:80]}: it must be a whole number >= {minimum}")


@dataclass(slots=True, frozen=True, kw_only=True)
class StreamOptions:
    """The options that shape a dataset's stream, as the user gave them once checked (`checked`). Counts that are
    used as counts are ints; seed, shuffle_buffer, rank and world_size are kept as given (checked only)."""

    layout: str
    batch_size: int | None
    epoch_items: int | None
    seed: Any
    shuffle_buffer: Any
    rank: Any
    world_size: Any
    num_workers: int

    @staticmethod
    def checked(*, layout: str, batch_size: Any, epoch_items: Any, seed: Any, shuffle_buffer: Any, rank: Any,
                world_size: Any, num_workers: Any) -> StreamOptions:
        """The options, or a ConfigError naming the first one that is not of its type and range."""
        if layout not in LAYOUTS:
            raise ConfigError(f"layout {repr(layout)[:80]} is not one of {', '.join(LAYOUTS)}")
        if batch_size is not None:
            batch_size = whole_number("batch_size (or None for single samples)", batch_size, 1)
        if epoch_items is not None:
            epoch_items = whole_number("epoch_items (or None for the whole data)", epoch_items, 1)
        # Every other number a user passes: a float, inf or nan here would loop forever (shuffle_buffer=inf holds
        # the whole epoch in memory) or fail deep inside a DataLoader worker.
        whole_number("seed", seed, -(2**63))
        whole_number("shuffle_buffer", shuffle_buffer, 0)
        if world_size is not None:
            whole_number("world_size", world_size, 1)
        if rank is not None:
            whole_number("rank", rank, 0)
        workers = whole_number("num_workers", num_workers, 0)  # the DataLoader's: only len() reads it
        return StreamOptions(layout=layout, batch_size=batch_size, epoch_items=epoch_items, seed=seed,
                             shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size, num_workers=workers)


def checked_weights(weights: Sequence[Any] | None) -> list[float] | None:
    """`weights=` as floats (their count and range are checked against the sources, `partition.check_weights`)."""
    return None if weights is None else [number("weights", w) for w in weights]
