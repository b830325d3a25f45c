"""A resume position (`ResumeState`) and its checks: a state dict comes from a checkpoint, which may come from a
stranger, so every field is checked for its type and range before it decides anything.

A position says how many items each rank x worker slot delivered in one epoch. A count larger than the slot can
deliver would make the resumed epoch yield nothing (every item "already seen"), so counts are bounded by what the
dataset's manifest says the slot holds (`bound_consumed`), and a position is refused under other order settings
(`check_order`).

`StatefulLoader` is the DataLoader that keeps such a position for a `LatentShardDataset` read by worker processes.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, IterableDataset

from latentcache.errors import ConfigError
from latentcache.train.partition import Slot

if TYPE_CHECKING:
    from latentcache.train.dataset import LatentShardDataset
    from latentcache.train.shard_sources import ShardRef

# The largest epoch, slot count or item count a position may hold: int64, what every trainer's counters fit in.
MAX_COUNT = 2**63 - 1
_FIELDS = ("epoch", "slots", "consumed", "next_worker")
# Settings that decide the order of items: a resume position only means something under the same ones.
ORDER_SETTINGS = ("seed", "shards", "batch_size", "shuffle", "shuffle_buffer", "drop_last", "resampled",
                  "epoch_items", "weights")


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


def shards_fingerprint(shards: Sequence[ShardRef]) -> str:
    """What the shards are, in order (path and sha256 of each), in 16 hex digits: an order setting."""
    return hashlib.sha1("\n".join(f"{s.path}:{s.sha256}" for s in shards).encode()).hexdigest()[:16]


def check_order(state: dict[str, Any], mine: dict[str, Any]) -> None:
    """Refuse a saved state whose order settings (ORDER_SETTINGS) are not `mine`: its skip counts would then point
    at other samples."""
    for name in ORDER_SETTINGS:
        if state.get(name) != mine[name]:
            raise ConfigError(f"resume state has {name}={state.get(name)!r:.80}, this dataset {mine[name]!r}: "
                              "build the dataset with the settings and shards of the saved run")


class _Tagged(IterableDataset):
    """What a StatefulLoader's DataLoader iterates: the dataset's items tagged with (slot, index), which the loader
    strips off again, so that the trainer's batches carry no bookkeeping."""

    def __init__(self, dataset: LatentShardDataset) -> None:
        super().__init__()
        self.dataset = dataset
        self.skip: dict[int, int] = {}  # the resume position, read when iteration starts (in each worker)
        self.rotation = 0  # worker w serves the rank's slot (w + rotation) % workers

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        here = self.dataset.current_slot()
        first = here.index - here.index % here.workers
        slot = Slot(first + (here.index - first + self.rotation) % here.workers, here.count, here.workers)
        return self._items(slot, self.skip.get(slot.index, 0))  # the skip taken now, not at the first next()

    def _items(self, slot: Slot, skip: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        for index, item in self.dataset.iter_slot(slot, skip):
            yield slot.index, index, item


class StatefulLoader:
    """A DataLoader over a LatentShardDataset that remembers what each worker delivered, for mid-epoch resume.

    `loader.state_dict()` after k batches, saved with the model; a restarted run builds the same dataset and loader,
    calls `load_state_dict`, and continues with batch k+1 (same world size and num_workers). The loader owns the
    position (`state`, a ResumeState); the dataset only checks that a saved one fits its settings.
    """

    def __init__(self, dataset: LatentShardDataset, num_workers: int = 0, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            # Persistent workers keep their first copy of the dataset: set_epoch and load_state_dict never reach
            # them, so every epoch would repeat the first one's order and noise.
            raise ValueError("StatefulLoader does not support persistent_workers=True: workers must see set_epoch "
                             "and load_state_dict")
        self.dataset = dataset
        self.num_workers = num_workers
        self.state = ResumeState(dataset.epoch)
        self._resume: ResumeState | None = None  # a loaded position, for the next pass of its epoch
        self._tagged = _Tagged(dataset)
        # The dataset batches by bucket itself, so the DataLoader must not batch again.
        self.loader = DataLoader(self._tagged, batch_size=None, num_workers=num_workers, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.dataset.epoch
        # In this process current_slot() counts one worker per rank.
        slots = self.dataset.current_slot().count * max(1, self.num_workers)
        resume, self._resume = self._resume, None
        if resume is not None and resume.epoch != epoch:
            resume = None  # a position of another epoch: this pass starts afresh
        if resume is not None:
            resume.check_slots(slots)
        state = self.state = ResumeState(epoch, slots, dict(resume.consumed) if resume else {},
                                         resume.next_worker if resume else 0)
        workers = max(1, self.num_workers)
        self._tagged.skip, self._tagged.rotation = dict(state.consumed), state.next_worker
        iterator = iter(self.loader)
        # The workers (or the in-process iterator) took their copy; later passes start afresh.
        self._tagged.skip, self._tagged.rotation = {}, 0
        for slot, index, item in iterator:
            state.consumed[int(slot)] = int(index) + 1
            state.next_worker = (int(slot) + 1) % workers
            yield item

    def __len__(self) -> int:
        return self.dataset.rank_items(self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        return {**self.dataset.order_settings(), **self.state.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        position = self.dataset.check_state(state)
        self.dataset.epoch = position.epoch
        self._resume = position
        self.state = ResumeState(position.epoch, position.slots, dict(position.consumed), position.next_worker)
