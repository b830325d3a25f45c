"""Stage 4: shards -> model-ready latent tensors for a trainer, refusing anything the model does not expect.

One slot's stream (a slot is one rank x DataLoader worker) is a chain of small generator stages (`stages`):

    shard order (seed, epoch) -> this slot's share (`partition`) -> raw samples, checked against the manifest
    (`shard_sources`) -> [weighted mix over sources] -> buffer shuffle -> groups of one shape -> [skip what a
    resumed run already saw] -> decode + collate

Everything before "decode" works on raw bytes and safetensors headers, so resuming at step k skips k batches
without decoding them. Normalisation (scaling/shift factor or per-channel mean/std, read from the manifest) is
applied exactly once, at decode; `normalize=False` hands back the raw VAE posterior.

The parts live beside it: what is read and its checks (`selection`, over `shard_sources`), the user's options
(`options`), the raw sample (`raw`) and its decoding (`decoder`), the resume position and `StatefulLoader` (`resume`),
the transformer guard (`guard`). Their public names are re-exported by `latentcache.dataset`.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from latentcache.errors import LatentMismatchError
from latentcache.format.spec import LatentSpec, image_condition_channels
from latentcache.train.decoder import SampleDecoder, collate
from latentcache.train.guard import bucket_latent_shape, check_transformer
from latentcache.train.options import StreamOptions
from latentcache.train.partition import (
    Share,
    Slot,
    grouped_items,
    mix_sources,
    mixed_draws,
    seed_of,
    shard_order,
    share_counts,
    share_of,
    share_samples,
)
from latentcache.train.raw import RawSample
from latentcache.train.resume import ResumeState, check_order, shards_fingerprint
from latentcache.train.selection import Selection, select
from latentcache.train.shard_sources import ShardRef, read_shard
from latentcache.train.stages import grouped, mixed, read_share, resample, shuffled

__all__ = ["LatentShardDataset"]

_seed = seed_of  # the per-sample noise seed below; one definition, in partition


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class LatentShardDataset(IterableDataset):
    """Streams latents written by `latentcache encode`.

    `source` is an output directory, a list of output directories (one dataset over all of them; with
    `weights=[...]`, mixed in those proportions), or shard urls: a path, a glob, a brace list
    (`shards/{000000..000099}.tar`), a list of shard paths, `file://...`, or anything webdataset's gopen opens
    (then pass `manifest=`; for local shards it is found above them). Yields dicts with `latents` (float tensor
    [C, T, H, W], normalised for the model), `key`, `meta`, `caption` and, when cached, the prompt tensors under
    the family's pipeline names (`prompt_embeds`...). With `batch_size=B`, yields batches of one bucket:
    `latents` is [B, C, T, H, W] (or [B, T, C, H, W] with `layout="BTCHW"`, what diffusers' CogVideoX transformer
    takes).

    Every sample is seen exactly once per epoch across DDP ranks and DataLoader workers (`latentcache.train.partition`):
    shards are split between them when there are enough, samples otherwise. `shuffle=True` permutes shards per
    (seed, epoch) and shuffles samples in a buffer of `shuffle_buffer`; `resampled=True` draws shards with
    replacement forever (step-based training: every rank gets an endless stream, so DDP ranks never run out
    unevenly). Several sources must share the latent spec and the VAE (class, revision, weights); with `weights`,
    each slot draws its samples' sources by weight, deterministically per (seed, epoch): every rank x worker slot
    draws the same number, ceil(num_samples / slots), so a weighted epoch is as long as the unweighted one (up to
    slots - 1 more) and equal on every rank. A source drawn past its end starts over; a slot whose share of a source
    is empty (a source with fewer samples than slots) reads that whole source. Weights are finite numbers >= 0, at
    least one > 0. The same output or shard named twice (any spelling, links resolved) is refused.
    """

    def __init__(
        self,
        source: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        manifest: str | os.PathLike | None = None,
        weights: Sequence[float] | None = None,
        expected_channels: int | None = None,
        sample_posterior: bool = True,
        normalize: bool = True,
        batch_size: int | None = None,
        layout: str = "BCTHW",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        shuffle: bool = False,
        shuffle_buffer: int = 64,
        resampled: bool = False,
        epoch_items: int | None = None,
        drop_last: bool = False,
        check_sha256: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        options = StreamOptions.checked(layout=layout, batch_size=batch_size, epoch_items=epoch_items, seed=seed,
                                        shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size,
                                        num_workers=num_workers)
        self.selection: Selection = select(source, manifest, weights)
        self.sources, self.shards, self.weights = self.selection.sources, self.selection.shards, self.selection.weights
        self.manifest, self.root = self.sources[0].manifest, self.sources[0].root
        self.spec = LatentSpec.from_dict(self.manifest.latent_spec)
        if expected_channels is not None and self.spec.channels != expected_channels:
            raise LatentMismatchError(
                f"{self.root}: latents have {self.spec.channels} channels ({self.manifest.vae.get('class_name')}), "
                f"the model expects {expected_channels}. Encode with the VAE your model was trained with, or fix "
                "the model's in_channels."
            )
        self.expected_channels = self.spec.channels
        self.decoder = SampleDecoder(self.spec, sample_posterior=sample_posterior, normalize=normalize,
                                     layout=layout, dtype=dtype, seed=seed)
        self.sample_posterior, self.normalize = sample_posterior, normalize
        self.batch_size, self.layout, self.dtype, self.drop_last = options.batch_size, layout, dtype, drop_last
        self.seed, self.shuffle, self.shuffle_buffer, self.resampled = seed, shuffle, shuffle_buffer, resampled
        self.check_sha256 = check_sha256
        # Items (samples, or batches) each rank x worker slot yields per epoch: with resampled=True, every DDP rank
        # then takes the same number of steps, and no rank waits forever in a collective at the end of an epoch.
        self.epoch_items = options.epoch_items
        self.rank, self.world_size = rank, world_size
        self.num_workers = options.num_workers  # the DataLoader's: only len() reads it
        self.epoch = 0
        # Direct iteration's resume state: where the next pass starts (load_state_dict), and what the last pass
        # delivered. A StatefulLoader keeps its own.
        self._start: ResumeState | None = None
        self._position = ResumeState()
        self._shards_hash: str | None = None

    @classmethod
    def for_transformer(cls, transformer_or_config: Any, source: str | os.PathLike | Iterable[str], *,
                        image_to_video: bool = False, pad_frames: bool = False, **kwargs: Any
                        ) -> LatentShardDataset:
        """Read the transformer's config (in_channels, patch sizes, sample sizes, positional embedding) and refuse
        shards that do not fit it, naming each number."""
        dataset = cls(source, **kwargs)
        # With --image-latents the concatenated channel count is known exactly: 2C (CogVideoX), 2C + 4 (Wan).
        cached = (dataset.manifest.settings or {}).get("image_latents")
        check_transformer(transformer_or_config, dataset.spec, {s.bucket for s in dataset.shards}, dataset.root,
                          image_to_video=image_to_video, pad_frames=pad_frames,
                          image_channels=image_condition_channels(dataset.spec) if cached else None)
        return dataset

    @property
    def vae_identity(self) -> dict[str, Any]:
        """Which VAE made these latents, from the manifest: class, source, hub commit, sha256 of each weights file,
        config hash. Log it next to checkpoints: a model trained on these latents decodes with that VAE only."""
        return copy.deepcopy(self.manifest.vae or {})

    @property
    def num_samples(self) -> int:
        """Samples in the selected shards, all ranks together.

        `len(dataset)` is this rank's items instead (`rank_items`).
        """
        return sum(s.samples for s in self.shards)

    def __len__(self) -> int:  # this rank's items over the `num_workers` given (docs/trainer.md#length)
        return self.rank_items(self.num_workers)

    def rank_items(self, num_workers: int = 0) -> int:
        """Items (samples; batches with batch_size: one bucket each, a bucket's last short unless drop_last) this
        rank yields in the current epoch over `num_workers` DataLoader workers, from the manifest's counts alone
        (shards split by rank and worker, so both change it). TypeError where no count holds before drawing."""
        rank, world = self._rank_world()
        workers = max(1, num_workers)
        if self.resampled or (self.weights is not None and self.batch_size):
            if self.epoch_items is None or not self.resampled:
                raise TypeError("no len(): the stream is endless (resampled) or its batches depend on weighted "
                                "draws; pass resampled=True, epoch_items=N: each worker then yields N items")
            return self.epoch_items * workers
        shapes = [(s.samples, bucket_latent_shape(self.spec, s.bucket)) for s in self.shards]
        total = 0
        for worker in range(workers):
            slot = Slot.of(rank, world, worker, workers)
            n = (self.slot_samples(slot) or 0) if self.weights is not None else grouped_items(
                share_counts(self._shares(slot, 0)[0][1], shapes).values(), self.batch_size, self.drop_last)
            total += n if self.epoch_items is None else min(n, self.epoch_items)
        return total

    def set_epoch(self, epoch: int) -> None:
        """A new pass: new shard order, new buffer shuffle, new posterior noise.

        A resume position loaded for this same epoch is kept, so the usual `load_state_dict(...)` then
        `for epoch in range(start, n): set_epoch(epoch)` continues mid-epoch instead of replaying it.
        """
        if epoch != self.epoch:
            self._start = None
        self.epoch = epoch
        start = self._start
        self._position = ResumeState(epoch, self._position.slots, dict(start.consumed) if start else {})

    # -------------------------------------------------------------------------------------------- resume

    def _fingerprint(self) -> str:
        # Computed once: torchdata's StatefulDataLoader asks a worker's dataset for its state after every item.
        if self._shards_hash is None:
            self._shards_hash = shards_fingerprint(self.shards)
        return self._shards_hash

    def order_settings(self) -> dict[str, Any]:
        """The settings that decide the order of items; a resume position is valid only under the same ones."""
        return {"seed": self.seed, "shards": self._fingerprint(), "batch_size": self.batch_size,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "drop_last": self.drop_last,
                "resampled": self.resampled, "epoch_items": self.epoch_items, "weights": self.weights}

    def check_state(self, state: dict[str, Any]) -> ResumeState:
        """The position in `state`, refused when it was saved under other order settings (the skip count would
        then point at other samples)."""
        position = ResumeState.from_dict(state)  # every field's type and range, before any is used
        check_order(state, self.order_settings())
        position.bound_consumed(lambda slot, slots: self._most_items(position.epoch, slot, slots))
        return position

    def _most_items(self, epoch: int, slot: int, slots: int | None) -> int | None:
        """The most items `slot` of `slots` can deliver in `epoch` (None: endless): each item holds a sample."""
        limits = [] if self.epoch_items is None else [self.epoch_items]
        if not self.resampled:
            if slots is None or self.weights is not None:
                limits.append(self.num_samples if slots is None else mixed_draws(self.num_samples, slots))
            else:
                order = shard_order(len(self.shards), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
                limits.append(share_samples(share_of(order, Slot(slot, slots)), [s.samples for s in self.shards]))
        return min(limits, default=None)

    def state_dict(self) -> dict[str, Any]:
        """Where this pass stands: JSON-able, for the trainer's checkpoint. With DataLoader workers, take it from
        `StatefulLoader` (the workers' copies of the dataset count, not this one)."""
        return {**self.order_settings(), **self._position.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a pass where `state` left it: the next iteration skips what was delivered before."""
        position = self.check_state(state)
        self.epoch = position.epoch
        self._start = position
        self._position = ResumeState(position.epoch, position.slots, dict(position.consumed))

    # ------------------------------------------------------------------------------------------ streaming

    def current_slot(self) -> Slot:
        """This process's slot: its rank (the constructor's, else torch.distributed's, else RANK/WORLD_SIZE) and
        DataLoader worker."""
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return Slot.of(rank, world, worker, workers)

    def _rank_world(self) -> tuple[int, int]:
        rank, world = _rank_and_world()
        return (self.rank if self.rank is not None else rank, self.world_size if self.world_size is not None else world)

    def slot_samples(self, slot: Slot) -> int | None:
        """Samples `slot` reads in the current epoch, from the manifest's counts alone (None: endless)."""
        if self.resampled:
            return None
        if self.weights is not None:  # the same on every slot: unequal counts per rank hang DDP
            return mixed_draws(self.num_samples, slot.count)
        return sum(share_samples(share, [s.samples for s in shards]) for shards, share in self._shares(slot, 0))

    def iter_slot(self, slot: Slot, skip: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, item) of `slot`'s pass through the current epoch, from item `skip` on: the items before it are
        grouped from headers and passed over, never decoded."""
        # This pass's shard buffers, reused shard after shard (never shared between passes): one per source, since a
        # weighted mix reads a shard of one source while another source's shard is still being parsed from its own.
        buffers: dict[int, bytearray] = {}
        multi = len(self.sources) > 1

        def read(shard: ShardRef, data: memoryview | None = None) -> Iterator[RawSample]:
            # The same key in two outputs still gets its own posterior noise.
            draw = f"s{shard.source}" if multi else None
            buffer = buffers.setdefault(shard.source, bytearray())
            for members in read_shard(shard, check_sha256=self.check_sha256, buffer=buffer, data=data):
                yield RawSample(members["__key__"], shard.url, shard.bucket, members, draw)

        raws = self._raws(slot, read)
        if self.shuffle:
            raws = shuffled(raws, self.shuffle_buffer, random.Random(_seed(self.seed, self.epoch, "buffer",
                                                                           slot.index)))
        for index, group in enumerate(grouped(raws, self.batch_size, self.drop_last)):
            if self.epoch_items is not None and index >= self.epoch_items:
                return
            if index < skip:
                continue  # delivered before the restart: not decoded, not yielded again
            samples = [self.decoder.decode(raw, self.epoch) for raw in group]
            yield index, (collate(samples) if self.batch_size else samples[0])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot = self.current_slot()
        skip = 0
        if self._start is not None and self._start.epoch == self.epoch:
            self._start.check_slots(slot.count)
            skip = self._start.consumed.pop(slot.index, 0)  # the skip applies to one pass only
        # A new pass: what was delivered is what this pass skips, never counts left over from the previous pass.
        position = self._position = ResumeState(self.epoch, slot.count, {slot.index: skip} if skip else {})
        for index, item in self.iter_slot(slot, skip):
            position.consumed[slot.index] = index + 1
            yield item

    # ----------------------------------------------------------------------------------------- internals

    def _shares(self, slot: Slot, repeat: int) -> list[tuple[list[ShardRef], Any]]:
        """(shards, this slot's share of them) per part: the whole list unweighted, each source weighted."""
        if self.weights is None:
            parts = [(self.shards, self.seed)]
        else:  # each source split on its own; a repeat (a source drawn past its end) gets a fresh order
            parts = [(self.selection.source_shards(i), seed_of(self.seed, "source", i, repeat))
                     for i in range(len(self.sources))]
        return [(shards, share_of(shard_order(len(shards), seed=seed, epoch=self.epoch, shuffle=self.shuffle), slot))
                for shards, seed in parts]

    def _raws(self, slot: Slot, read: Any) -> Iterator[RawSample]:
        """This slot's raw samples for the epoch, before the buffer shuffle."""
        if self.weights is None:
            if self.resampled:
                rng = random.Random(_seed(self.seed, self.epoch, "resample", slot.index))
                return resample(self.shards, rng, read, str(slot.index))
            ((shards, share),) = self._shares(slot, 0)
            return read_share(shards, share, read)

        def source_pass(i: int, repeat: int) -> Iterator[RawSample]:
            if self.resampled:
                rng = random.Random(_seed(self.seed, self.epoch, "resample", slot.index, i))
                yield from resample(self.selection.source_shards(i), rng, read, f"{slot.index}:{i}")
                return
            shards, share = self._shares(slot, repeat)[i]
            tag = f"s{i}:{repeat}" if repeat else None  # a repeated sample gets fresh noise
            if not share_samples(share, [s.samples for s in shards]):
                # A source smaller than the slot count leaves this slot's share empty: the slot reads the whole
                # source instead, so that the weights hold on every slot and no slot's epoch ends early. Other
                # slots read these samples too: the slot in the tag gives each its own noise.
                share = Share(share.shards)
                tag = f"s{i}:{repeat}:b{slot.index}"
            for raw in read_share(shards, share, read):
                yield raw if tag is None else raw.drawn(tag)

        streams = [lambda repeat, i=i: source_pass(i, repeat) for i in range(len(self.sources))]
        draws = self.slot_samples(slot)
        return mixed(streams, mix_sources(self.selection.mix_weights(), draws, seed=self.seed, epoch=self.epoch,
                                          slot=slot.index))
