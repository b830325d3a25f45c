"""The generator stages of one slot's stream, each with explicit arguments and no dataset state:

    read_share (or resample) -> [mixed, over sources] -> shuffled -> grouped -> [skip] -> decode + collate

All of them pass `RawSample`s (bytes and safetensors headers), so a resumed run skips what it saw without decoding.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence

from latentcache.train.partition import Share
from latentcache.train.raw import RawSample, raw_shape
from latentcache.train.shard_sources import ShardRef, prefetched

Reader = Callable[..., Iterable[RawSample]]  # read(shard) or read(shard, prefetched bytes)


def read_share(shards: Sequence[ShardRef], share: Share, read: Reader) -> Iterator[RawSample]:
    """The raw samples of one slot's share: whole shards, or every share.stride-th sample of them. Shards in object
    storage are fetched a few ahead (`prefetched`), `read(shard, data)` then parses the fetched bytes."""
    ordered = prefetched([shards[i] for i in share.shards])
    if share.stride == 1:
        for shard, data in ordered:
            yield from read(shard, data)
        return
    n = 0
    for shard, data in ordered:
        for raw in read(shard, data):
            if share.keeps(n):
                yield raw
            n += 1


def resample(shards: Sequence[ShardRef], rng: random.Random, read: Reader, tag: str) -> Iterator[RawSample]:
    """Shards drawn with replacement, forever. Each draw is numbered (`RawSample.draw`), so a sample drawn twice in
    one epoch gets fresh posterior noise each time, still reproducible."""
    draw = 0
    while shards:
        for raw in read(rng.choice(shards)):
            yield raw.drawn(f"{tag}:{draw}")
            draw += 1


def mixed(streams: Sequence[Callable[[int], Iterator[RawSample]]], choices: Iterable[int]) -> Iterator[RawSample]:
    """Samples of several sources in the order `choices` names them; `streams[i](p)` is source i's p-th pass, and a
    source that runs out starts its next pass (a source weighted above its size repeats within the epoch); one that
    is empty even then is an error, never a short epoch."""
    passes = [0] * len(streams)
    iters = [streams[i](0) for i in range(len(streams))]
    for i in choices:
        for _attempt in range(2):
            raw = next(iters[i], None)
            if raw is not None:
                yield raw
                break
            passes[i] += 1
            iters[i] = streams[i](passes[i])
        else:
            # The dataset never draws a source this slot cannot read (weight 0 for an output with no samples, the
            # whole output for a slot whose share is empty): ending the epoch early here would hang DDP.
            raise RuntimeError(f"source {i} yielded no sample in two passes; weighted epochs must not end early")


def shuffled(raws: Iterable[RawSample], size: int, rng: random.Random) -> Iterator[RawSample]:
    """A buffer shuffle of `size` items (size <= 1: unchanged)."""
    if size <= 1:
        yield from raws
        return
    buffer: list[RawSample] = []
    for raw in raws:
        buffer.append(raw)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def grouped(raws: Iterable[RawSample], batch_size: int | None, drop_last: bool) -> Iterator[list[RawSample]]:
    """Samples grouped by latent shape (one bucket per batch), decided from headers alone; batch_size None: one
    sample per group."""
    if not batch_size:
        for raw in raws:
            yield [raw]
        return
    pending: dict[tuple[int, ...], list[RawSample]] = {}
    for raw in raws:
        shape = raw_shape(raw)
        group = pending.setdefault(shape, [])
        group.append(raw)
        if len(group) == batch_size:
            yield pending.pop(shape)
    if not drop_last:
        yield from pending.values()
