"""A resume position (`ResumeState`) and its checks: a state dict comes from a checkpoint, which may come from a
stranger, so every field is checked for its type and range before it decides anything.

A position says how many items each rank x worker slot delivered in one epoch. A count larger than the slot can
deliver would make the resumed epoch yield nothing (every item "already seen"), so counts are bounded by what the
dataset's manifest says the slot holds (`bound_consumed`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from latentcache.errors import ConfigError

# The largest epoch, slot count or item count a position may hold: int64, what every trainer's counters fit in.
MAX_COUNT = 2**63 - 1
_FIELDS = ("epoch", "slots", "consumed", "next_worker")


def _count(name: str, value: Any, minimum: int, maximum: int = MAX_COUNT) -> int:
    """An int (not a bool, float or string) in [minimum, maximum]; ConfigError quoting it otherwise."""
    if not isinstance(value, bool) and isinstance(value, numbers.Integral) and minimum <= value <= maximum:
        return int(value)
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ConfigError(f"resume state: {name} is {shown}, expected a whole number from {minimum} to {maximum}; "
                      "load the state a StatefulLoader or LatentShardDataset of this dataset saved")


def _slot_key(key: Any, slots: int | None) -> int:
    """A `consumed` key: a slot index as to_dict writes it (a decimal string), or an int."""
    if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 19:
        key = int(key)
    return _count("a consumed slot", key, 0, (slots - 1) if slots is not None else MAX_COUNT)


@dataclass(slots=True)
class ResumeState:
    """Where a pass stands: for one epoch, the items each slot (global worker id) delivered, and how many slots
    there were (a position only means something with the same world size x num_workers)."""

    epoch: int = 0
    slots: int | None = None
    consumed: dict[int, int] = field(default_factory=dict)
    # The DataLoader worker (of this rank) the next item would have come from: workers take turns, so a resumed
    # loader's first worker must serve that slot for the items to come in the uninterrupted run's order.
    next_worker: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "slots": self.slots, "next_worker": self.next_worker,
                "consumed": {str(k): v for k, v in sorted(self.consumed.items())}}

    @staticmethod
    def from_dict(state: Any) -> ResumeState:
        """The position in a saved state; ConfigError naming the field unless each is of the type and range
        `to_dict` writes (a damaged or crafted state never reaches the loader)."""
        if not isinstance(state, dict):
            raise ConfigError(f"resume state is a {type(state).__name__}, expected the dict state_dict() returned")
        missing = [name for name in ("epoch", "consumed") if name not in state]
        if missing:
            raise ConfigError(f"resume state has no {' or '.join(missing)}: expected the dict state_dict() "
                              f"returned, with {', '.join(_FIELDS)}")
        epoch = _count("epoch", state["epoch"], 0)
        slots = None if state.get("slots") is None else _count("slots", state["slots"], 1)
        consumed = state["consumed"]
        if not isinstance(consumed, dict):
            raise ConfigError(f"resume state: consumed is a {type(consumed).__name__}, expected an object of "
                              "slot -> items delivered")
        if slots is not None and len(consumed) > slots:
            raise ConfigError(f"resume state: consumed lists {len(consumed)} slots, the state says {slots}")
        counts = {_slot_key(k, slots): _count(f"consumed[{k!r}]", v, 0) for k, v in consumed.items()}
        if len(counts) != len(consumed):
            raise ConfigError("resume state: consumed names a slot twice (as '1' and 1?)")
        next_worker = _count("next_worker", state.get("next_worker", 0), 0,
                             (slots - 1) if slots is not None else MAX_COUNT)
        return ResumeState(epoch, slots, counts, next_worker)

    def check_slots(self, slots: int) -> None:
        if self.consumed and self.slots not in (None, slots):
            raise ConfigError(f"resume state was saved with {self.slots} rank x worker slots, this run has {slots}: "
                              "resume with the same world size and num_workers")

    def bound_consumed(self, most: Callable[[int, int | None], int | None]) -> None:
        """Refuse a count past what its slot can deliver: `most(slot, slots)` is that number of items (None: no
        bound, an endless resampled stream)."""
        for slot, count in self.consumed.items():
            limit = most(slot, self.slots)
            if limit is not None and count > limit:
                raise ConfigError(f"resume state: slot {slot} delivered {count} items, yet it holds at most {limit} "
                                  f"in an epoch of this dataset; the state belongs to another dataset or is damaged")
