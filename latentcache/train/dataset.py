"""Stage 4: shards -> model-ready latent tensors for a trainer, refusing anything the model does not expect.

One slot's stream (a slot is one rank x DataLoader worker) is a chain of small generator stages (`stages`):

    shard order (seed, epoch) -> this slot's share (`partition`) -> raw samples, checked against the manifest
    (`shard_sources`) -> [weighted mix over sources] -> buffer shuffle -> groups of one shape -> [skip what a
    resumed run already saw] -> decode + collate

Everything before "decode" works on raw bytes and safetensors headers, so resuming at step k skips k batches
without decoding them. Normalisation (scaling/shift factor or per-channel mean/std, read from the manifest) is
applied exactly once, at decode; `normalize=False` hands back the raw VAE posterior.

The shard reading lives in `latentcache.train.shard_sources`, the transformer guard in `latentcache.train.guard`;
both are re-exported here for code written against earlier versions.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import numbers
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latentcache.errors import ConfigError, LatentMismatchError, ShardFormatError
from latentcache.format.checks import latent_problems, meta_problems
from latentcache.format.manifest import counts_problem
from latentcache.format.reader import decode_sample
from latentcache.format.spec import LatentSpec, image_condition_channels, image_condition_of
from latentcache.format.text import collate_text, item_text
from latentcache.train.guard import bucket_latent_shape, check_transformer, transformer_problems
from latentcache.train.partition import (
    Share,
    Slot,
    check_weights,
    grouped_items,
    mix_sources,
    mixed_draws,
    seed_of,
    shard_order,
    share_counts,
    share_of,
    share_samples,
)
from latentcache.train.resume import ResumeState
from latentcache.train.shard_sources import (
    MANIFEST_SEARCH_DEPTH,
    MAX_SHARD_BYTES,
    PIXEL_SUFFIXES,
    ShardRef,
    expand_urls,
    open_url,
    raw_shape,
    read_bytes,
    read_shard,
    resolve_source,
    resolve_sources,
)
from latentcache.train.stages import grouped, mixed, read_share, resample, shuffled

__all__ = ["LAYOUTS", "MANIFEST_SEARCH_DEPTH", "MAX_SHARD_BYTES", "PIXEL_SUFFIXES", "LatentShardDataset",
           "ResumeState", "ShardRef", "StatefulLoader", "bucket_latent_shape", "expand_urls", "open_url",
           "raw_shape", "read_bytes", "read_shard", "resolve_source", "transformer_problems"]

log = logging.getLogger(__name__)

# What every item holds besides its prompt tensors (`prompt_embeds`... under the family's pipeline names).
_ITEM_KEYS = frozenset({"latents", "key", "meta", "caption", "image_latents"})

LAYOUTS = ("BCTHW", "BTCHW")
# Settings that decide the order of items: a resume position only means something under the same ones.
ORDER_SETTINGS = ("seed", "shards", "batch_size", "shuffle", "shuffle_buffer", "drop_last", "resampled",
                  "epoch_items", "weights")
_seed = seed_of  # the per-sample noise seed below; one definition, in partition


def _number(name: str, value: Any) -> float:
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


def _identity(spelling: str) -> str:
    """What a spelling of an output or shard resolves to: the real path (links and `./` resolved) of local ones,
    the url without repeated or trailing slashes for remote ones (`s3://b/out/` and `s3://b//out` are one)."""
    if "://" in spelling and not spelling.startswith("file://"):
        scheme, rest = spelling.split("://", 1)
        return f"{scheme.lower()}://" + "/".join(part for part in rest.split("/") if part not in ("", "."))
    return os.path.realpath(spelling[len("file://"):] if spelling.startswith("file://") else spelling)


def refuse_duplicates(outputs: Sequence[tuple[str, Any]], shards: Sequence[tuple[str, str]]) -> None:
    """Refuse an output, or a shard, named twice (by any spelling): its samples would come twice per epoch.
    `outputs` and `shards` are (spelling, label) pairs; the error names both spellings."""
    for kind, items in (("output", outputs), ("shard", shards)):
        seen: dict[str, str] = {}
        for spelling, label in items:
            key = _identity(str(spelling))
            if key in seen:
                raise ShardFormatError(f"{label}: the same {kind} is given twice ({seen[key]!r} and {spelling!r} are "
                                       f"both {key}); its samples would come twice per epoch: name it once")
            seen[key] = str(spelling)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass(slots=True, frozen=True)
class Source:
    """One output directory of a multi-source dataset: its shards are `dataset.shards[first:first + count]`."""

    root: Path
    manifest: dict[str, Any]
    first: int
    count: int


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
        if not isinstance(source, str | os.PathLike):
            source = list(source)  # read twice: resolved, and its spellings named when one repeats
        resolved = resolve_sources(source, manifest)
        if weights is not None:
            weights = [_number("weights", w) for w in weights]
            check_weights(weights, len(resolved))
        self.weights = weights
        self.sources: list[Source] = []
        self.shards: list[ShardRef] = []
        for data, root, refs in resolved:
            self.sources.append(Source(root, data, len(self.shards), len(refs)))
            self.shards.extend(refs)
        refuse_duplicates([(str(d), str(d)) for d in source] if len(self.sources) > 1 else [],
                          [(s.url, s.url) for s in self.shards])
        # A weighted source with no samples at all is never drawn (`_mix_weights`); all of them empty: nothing to
        # draw from.
        if weights is not None and not any(w > 0 and self._source_total(i) for i, w in enumerate(weights)):
            raise ConfigError(f"weights {weights}: every source with a weight > 0 holds no samples")
        if not any(self._source_total(i) for i in range(len(self.sources))):
            # A trainer started on it would run zero steps without a word.
            raise ShardFormatError(f"{', '.join(str(s.root) for s in self.sources)}: no samples in "
                                   f"{len(self.shards)} shard(s): every input was skipped or failed when it was "
                                   "encoded (see failures.jsonl there, or `latentcache info`)")
        for s in self.sources:  # what `verify` refuses in a manifest, the dataset refuses too
            if counts_problem(s.manifest, s.root):
                raise ShardFormatError(f"{counts_problem(s.manifest, s.root)}: damaged or edited; rebuild it with "
                                       "`latentcache finalize DIR`")
        self.manifest, self.root = self.sources[0].manifest, self.sources[0].root
        self.spec = LatentSpec.from_dict(self.manifest["latent_spec"])
        if expected_channels is not None and self.spec.channels != expected_channels:
            raise LatentMismatchError(
                f"{self.root}: latents have {self.spec.channels} channels ({self.manifest['vae'].get('class_name')}), "
                f"the model expects {expected_channels}. Encode with the VAE your model was trained with, or fix "
                "the model's in_channels."
            )
        self.expected_channels = self.spec.channels
        # Normalisation is affine per channel: applied in place with the spec's own gain and offset.
        self._gain, self._offset = self.spec.affine()
        self.sample_posterior, self.normalize = sample_posterior, normalize
        self.batch_size, self.layout, self.dtype, self.drop_last = batch_size, layout, dtype, drop_last
        self.seed, self.shuffle, self.shuffle_buffer, self.resampled = seed, shuffle, shuffle_buffer, resampled
        self.check_sha256 = check_sha256
        # Items (samples, or batches) each rank x worker slot yields per epoch: with resampled=True, every DDP rank
        # then takes the same number of steps, and no rank waits forever in a collective at the end of an epoch.
        self.epoch_items = epoch_items
        self.rank, self.world_size = rank, world_size
        self.num_workers = whole_number("num_workers", num_workers, 0)  # the DataLoader's: only len() reads it
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
        cached = (dataset.manifest.get("settings") or {}).get("image_latents")
        check_transformer(transformer_or_config, dataset.spec, {s.bucket for s in dataset.shards}, dataset.root,
                          image_to_video=image_to_video, pad_frames=pad_frames,
                          image_channels=image_condition_channels(dataset.spec) if cached else None)
        return dataset

    @property
    def vae_identity(self) -> dict[str, Any]:
        """Which VAE made these latents, from the manifest: class, source, hub commit, sha256 of each weights file,
        config hash. Log it next to checkpoints: a model trained on these latents decodes with that VAE only."""
        return copy.deepcopy(self.manifest.get("vae") or {})

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
            self._shards_hash = hashlib.sha1("\n".join(f"{s.path}:{s.sha256}" for s in self.shards).encode()
                                             ).hexdigest()[:16]
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
        mine = self.order_settings()
        for name in ORDER_SETTINGS:
            if state.get(name) != mine[name]:
                raise ConfigError(f"resume state has {name}={state.get(name)!r:.80}, this dataset {mine[name]!r}: "
                                  "build the dataset with the settings and shards of the saved run")
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
        buffer = bytearray()  # this pass's shard buffer, reused shard after shard (never shared between passes)
        multi = len(self.sources) > 1

        def read(shard: ShardRef, data: memoryview | None = None) -> Iterator[dict[str, Any]]:
            for raw in read_shard(shard, check_sha256=self.check_sha256, buffer=buffer, data=data):
                if multi:  # the same key in two outputs still gets its own posterior noise
                    raw["__draw__"] = f"s{shard.source}"
                yield raw

        raws = self._raws(slot, read)
        if self.shuffle:
            raws = shuffled(raws, self.shuffle_buffer, random.Random(_seed(self.seed, self.epoch, "buffer",
                                                                           slot.index)))
        for index, group in enumerate(grouped(raws, self.batch_size, self.drop_last)):
            if self.epoch_items is not None and index >= self.epoch_items:
                return
            if index < skip:
                continue  # delivered before the restart: not decoded, not yielded again
            samples = [self._decode(raw) for raw in group]
            yield index, (self._collate(samples) if self.batch_size else samples[0])

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

    def _source_shards(self, i: int) -> list[ShardRef]:
        source = self.sources[i]
        return self.shards[source.first:source.first + source.count]

    def _shares(self, slot: Slot, repeat: int) -> list[tuple[list[ShardRef], Any]]:
        """(shards, this slot's share of them) per part: the whole list unweighted, each source weighted."""
        if self.weights is None:
            parts = [(self.shards, self.seed)]
        else:  # each source split on its own; a repeat (a source drawn past its end) gets a fresh order
            parts = [(self._source_shards(i), seed_of(self.seed, "source", i, repeat))
                     for i in range(len(self.sources))]
        return [(shards, share_of(shard_order(len(shards), seed=seed, epoch=self.epoch, shuffle=self.shuffle), slot))
                for shards, seed in parts]

    def _raws(self, slot: Slot, read: Any) -> Iterator[dict[str, Any]]:
        """This slot's raw samples for the epoch, before the buffer shuffle."""
        if self.weights is None:
            if self.resampled:
                rng = random.Random(_seed(self.seed, self.epoch, "resample", slot.index))
                return resample(self.shards, rng, read, str(slot.index))
            ((shards, share),) = self._shares(slot, 0)
            return read_share(shards, share, read)

        def source_pass(i: int, repeat: int) -> Iterator[dict[str, Any]]:
            if self.resampled:
                rng = random.Random(_seed(self.seed, self.epoch, "resample", slot.index, i))
                yield from resample(self._source_shards(i), rng, read, f"{slot.index}:{i}")
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
                if tag is not None:
                    raw["__draw__"] = tag
                yield raw

        streams = [lambda repeat, i=i: source_pass(i, repeat) for i in range(len(self.sources))]
        draws = self.slot_samples(slot)
        return mixed(streams, mix_sources(self._mix_weights(), draws, seed=self.seed, epoch=self.epoch,
                                          slot=slot.index))

    def _source_total(self, i: int) -> int:
        return sum(s.samples for s in self._source_shards(i))

    def _mix_weights(self) -> list[float]:
        """The weights the draw uses: a source that holds no samples at all is never drawn (weight 0)."""
        assert self.weights is not None
        return [w if self._source_total(i) else 0.0 for i, w in enumerate(self.weights)]

    # ------------------------------------------------------------------------------------ decode one sample

    def _latents(self, sample: dict[str, Any]) -> torch.Tensor:
        mean, logvar = sample["mean"], sample["logvar"]
        if mean.ndim != 4:
            raise LatentMismatchError(f"{sample['url']}: sample {sample['key']} has shape {tuple(mean.shape)}, "
                                      "expected [C, T, H, W]")
        if mean.shape[0] != self.expected_channels:
            hint = (" These are 3-channel pixels, not latents (what SAT with latent_input: true feeds its DiT from "
                    "a pixel dataset): run `latentcache encode` first." if mean.shape[0] == 3 else "")
            raise LatentMismatchError(f"{sample['url']}: sample {sample['key']} has {mean.shape[0]} channels, "
                                      f"the manifest says {self.expected_channels}.{hint}")
        # The check `latentcache verify` applies: dtype, the bucket's shape, finite, and finite once sampled and
        # normalised in float32. A sample that fails it never reaches the trainer.
        label = f"{sample['url']}: sample {sample['key']}"
        problems = (latent_problems(mean, logvar, self.spec, sample["bucket"], label)
                    or meta_problems(sample["meta"], sample["bucket"], label))
        if problems:
            raise ShardFormatError(f"{problems[0]}. Run `latentcache verify` on the dataset and re-encode the shard")
        # In-place arithmetic on tensors this sample owns (decoded just now): a 49x480x720 clip's latents are 4.5 MB
        # in float32, and every temporary costs a pass over them.
        if self.sample_posterior and logvar is not None:
            # Fresh noise every epoch, yet reproducible (and the same after a resume): seeded by (seed, epoch, key).
            gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, sample["key"], *sample["draw"]) >> 1)
            std = logvar.float().mul_(0.5).exp_()
            z = torch.randn(mean.shape, generator=gen).mul_(std).add_(mean)
        else:
            z = mean.float()
        if self.normalize:
            z = z.mul_(self._gain).add_(self._offset)
        return z.to(self.dtype)

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        sample = decode_sample(raw, raw.get("__url__", "?"))
        sample["draw"] = (raw["__draw__"],) if "__draw__" in raw else ()
        sample["bucket"] = raw.get("__bucket__")
        latents = self._latents(sample)
        if self.layout == "BTCHW":
            latents = latents.permute(1, 0, 2, 3)
        out = {"latents": latents, "key": sample["key"], "meta": sample["meta"], "caption": sample["caption"]}
        if sample.get("image_mean") is not None:
            image = self._image_latents(sample)
            out["image_latents"] = image.permute(1, 0, 2, 3) if self.layout == "BTCHW" else image
        if sample["text"] is not None:
            out.update(item_text(sample["text"]))
        return out

    def _image_latents(self, sample: dict[str, Any]) -> torch.Tensor:
        """`--image-latents` -> the I2V pipeline's conditioning for this clip, [C', T, H, W], to concatenate to the
        (noisy) video latents along channels, exactly as the family's pipeline builds it in `prepare_latents`:

        CogVideoX: the first frame's latent (sampled from its posterior like `retrieve_latents`, or its mean with
        sample_posterior=False) times `scaling_factor` (divided by it for `invert_scale_latents`, CogVideoX 1.5),
        followed by T-1 zero frames: C channels. Wan: `cat([mask, (z - latents_mean) / latents_std])`, z the mode
        of the first frame plus zero frames encoded as one clip, mask `temporal_compression` channels that are 1 on
        the first latent frame and 0 after: C + 4 channels. `normalize=False` leaves z unscaled.
        """
        mean, logvar = sample["image_mean"], sample["image_logvar"]
        c, t, h, w = sample["mean"].shape
        mode = image_condition_of(self.spec.family)
        if mean.shape[1] != (1 if mode == "image" else t):
            raise LatentMismatchError(f"{sample['url']}: sample {sample['key']} has image_mean {list(mean.shape)}, "
                                      f"the {self.spec.family} image-to-video conditioning is "
                                      f"{[c, 1 if mode == 'image' else t, h, w]}; re-encode with --image-latents")
        if self.sample_posterior and logvar is not None:
            gen = torch.Generator().manual_seed(
                _seed(self.seed, self.epoch, sample["key"], "image", *sample["draw"]) >> 1)
            z = torch.randn(mean.shape, generator=gen).mul_(logvar.float().mul(0.5).exp_()).add_(mean)
        else:
            z = mean.float()
        if mode == "image":
            if self.normalize:
                # The pipeline's own arithmetic (a Python float times the latents), so the result is bit-identical.
                scale = self.spec.scaling_factor if self.spec.scaling_factor is not None else 1.0
                z = 1 / scale * z if self.spec.invert_scale_latents else scale * z
            return torch.cat([z, z.new_zeros(c, t - 1, h, w)], dim=1).to(self.dtype)
        if self.normalize and self.spec.latents_mean is not None and self.spec.latents_std is not None:
            # As WanImageToVideoPipeline: (z - latents_mean) * (1 / latents_std), float32 per-channel tensors.
            z = (z - torch.tensor(self.spec.latents_mean).view(-1, 1, 1, 1)) * (
                1.0 / torch.tensor(self.spec.latents_std).view(-1, 1, 1, 1))
        mask = z.new_zeros(self.spec.temporal_compression, t, h, w)
        mask[:, 0] = 1.0
        return torch.cat([mask, z], dim=0).to(self.dtype)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {"latents": torch.stack([s["latents"] for s in samples]), "key": [s["key"] for s in samples],
                 "meta": [s["meta"] for s in samples], "caption": [s["caption"] for s in samples]}
        if all("image_latents" in s for s in samples):
            batch["image_latents"] = torch.stack([s["image_latents"] for s in samples])
        # The prompt tensors (`--text-encoder`): whatever else an item holds, under the pipeline's names.
        batch.update(collate_text([{k: v for k, v in s.items() if k not in _ITEM_KEYS} for s in samples]))
        return batch


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
