"""CogVideo SAT trains on latentcache shards: `data: target: latentcache.sat.SATLatentDataset` in its config.

What SAT does with a batch (CogVideo `sat/diffusion_video.py`, `SATVideoDiffusionEngine`):

    latent_input = model_config.get("latent_input", False)
    shared_step:           x = self.get_input(batch)                  # batch["mp4"]
                           x = x.permute(0, 2, 1, 3, 4).contiguous()
                           x = self.encode_first_stage(x, batch)
                           x = x.permute(0, 2, 1, 3, 4).contiguous()
    encode_first_stage:    if frame > 1 and self.latent_input:
                               x = x.permute(0, 2, 1, 3, 4).contiguous()
                               return x * self.scale_factor  # already encoded
                           ... z = self.first_stage_model.encode(x) ...
                           z = self.scale_factor * z

So with `latent_input: true` SAT skips its VAE, takes `batch["mp4"]` as latents [B, C, T, H, W], multiplies them by
its `scale_factor` and gives the DiT [B, T, C, H, W]. This dataset yields exactly that: *raw* (unscaled) latents
[C, T, H, W] under "mp4", which SAT scales once. With `latent_input: false` (SAT's default) SAT would run its own VAE
encoder on the latents and fail on the encoder's first 3-channel convolution.

SAT's loader (SwissArmyTransformer `sat/data_utils/configure_data.py`) takes a map-style Dataset: it wraps it in
ConcatDataset and RandomDataset / RandomMappingDataset and draws indices with its DistributedBatchSampler (an
IterableDataset is accepted only with `--iterable-dataset`, and then only SAT's own webdataset types). Shards are
streams, read front to back with their sha256 checked, so this is a map-style Dataset on the outside with a
`LatentShardDataset` stream inside: `__getitem__` ignores SAT's (randomly remapped) index and returns the next sample
of this data-parallel rank's and worker's share. As in LatentShardDataset, every sample is seen once per epoch across
ranks and workers, each epoch with a fresh posterior sample (`sample_posterior=False`: the mean); a rank x worker
share that runs out starts the next epoch. SAT's `--resume-dataloader` is honoured: the batches delivered before the
checkpoint (`iteration x gradient_accumulation_steps` per rank) are skipped from safetensors headers, not replayed.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from latentcache.errors import ConfigError, LatentMismatchError
from latentcache.format.buckets import Bucket
from latentcache.format.out_layout import MANIFEST_FILE
from latentcache.train.dataset import LatentShardDataset
from latentcache.train.partition import Slot
from latentcache.train.shard_sources import resolve_source

log = logging.getLogger(__name__)

# What SAT's own video datasets take in `data.params`; accepted so a stock sft.yaml needs only a new `target`.
SAT_PIXEL_PARAMS = ("skip_frms_num",)


class SATLatentDataset(Dataset):
    """Raw latents from `latentcache encode` output, in the item format of SAT's SFTDataset.

    Items: `{"mp4": latents [C, T, H, W] float32, unscaled, "txt": caption ("" when none, as SFTDataset),
    "num_frames": pixel frames of the clip, "fps": frames per second the clips were sampled at}`.
    One bucket (frames x height x width) per dataset, since SAT's collate stacks every item of a batch: chosen by
    `bucket="49x480x720"`, or by `video_size` and `max_num_frames` (SFTDataset's own parameters), or the only one.
    """

    def __init__(self, data_dir: str | os.PathLike, *, video_size: list[int] | tuple[int, int] | None = None,
                 max_num_frames: int | None = None, fps: float | None = None, bucket: str | None = None,
                 sample_posterior: bool = True, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 64,
                 check_sha256: bool = True, rank: int | None = None, world_size: int | None = None,
                 batch_size: int = 1, args: Any = None, **sat_params: Any) -> None:
        unknown = sorted(set(sat_params) - set(SAT_PIXEL_PARAMS))
        if unknown:
            raise ConfigError(f"SATLatentDataset: unknown data.params {', '.join(unknown)}; it takes video_size, "
                              "max_num_frames, fps, bucket, sample_posterior, seed, shuffle, shuffle_buffer, "
                              "check_sha256")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps)
                                or fps <= 0):
            raise ConfigError(f"SATLatentDataset: data.params.fps is {fps!r}: it must be a finite number > 0")
        if video_size is not None and not (isinstance(video_size, list | tuple) and len(video_size) == 2
                                           and None not in video_size):
            raise ConfigError(f"SATLatentDataset: data.params.video_size is {repr(video_size)[:80]}: it must be "
                              "[height, width]")
        for name, value in (("max_num_frames", max_num_frames), ("batch_size", batch_size),
                            *((f"video_size[{i}]", v) for i, v in enumerate(video_size or ()))):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ConfigError(f"SATLatentDataset: data.params.{name} is {value!r}: it must be a whole number >= 1")
        manifest, root, refs = resolve_source(data_dir)
        self.bucket = _choose_bucket(root, sorted({r.bucket for r in refs}), video_size, max_num_frames, bucket)
        self.num_frames = int(self.bucket.split("x")[0])
        clip_fps = manifest.clip.get("fps")
        if fps is not None and clip_fps is not None and not math.isclose(float(fps), float(clip_fps)):
            raise ConfigError(f"{root}: data.params.fps is {fps:g}, the shards were sampled at {clip_fps:g} fps. "
                              f"Set fps: {clip_fps:g}, or encode with --fps {fps:g}")
        self.fps = float(clip_fps if clip_fps is not None else fps or 0)
        shards = [str(root / r.path) for r in refs if r.bucket == self.bucket]
        # Raw latents: SAT multiplies by its own scale_factor; normalising here would scale them twice.
        try:
            self.stream = LatentShardDataset(shards, manifest=root / MANIFEST_FILE, sample_posterior=sample_posterior,
                                            normalize=False, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                                            check_sha256=check_sha256, rank=rank, world_size=world_size)
        except ConfigError as e:  # a data.params value of the training YAML: named as such
            raise ConfigError(f"SATLatentDataset ({root}): data.params: {e}") from None
        self.root, self.manifest = root, manifest
        self.batch_size, self.args = batch_size, args
        self._items: Iterator[dict[str, Any]] | None = None

    @classmethod
    def create_dataset_function(cls, path: str, args: Any, **params: Any) -> SATLatentDataset:
        """What SAT's train_video.py calls, through `partial(data_class.create_dataset_function, **data.params)`.

        Reads SAT's `args`: the data-parallel rank and size (ranks of one model-parallel group share data), the
        per-rank batch size, iteration and gradient accumulation (for `--resume-dataloader`), and `args.base`, the
        training YAMLs, which are checked against the shards exactly as `latentcache check-config` does: a mismatch
        stops the run before the first step.
        """
        rank, world = _data_parallel()
        dataset = cls(path, rank=rank, world_size=world, batch_size=int(getattr(args, "batch_size", 1) or 1),
                      args=args, **params)
        base = getattr(args, "base", None)
        if base:
            from latentcache.train.trainer_config import config_problems, load_trainer_config

            problems = config_problems(load_trainer_config(*base), dataset.manifest)
            if problems:
                raise ConfigError(f"{' + '.join(map(str, base))} does not fit {dataset.root}:\n  - "
                                  + "\n  - ".join(problems))
        return dataset

    def __len__(self) -> int:
        return self.stream.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        # SAT's index is a random remapping of a position in a list we stream; the stream decides the sample.
        if self._items is None:
            self._items = self._stream()
        sample = next(self._items)
        return {"mp4": sample["latents"], "txt": sample["caption"] or "", "num_frames": self.num_frames,
                "fps": self.fps}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_items"] = None  # a generator does not pickle; each worker process starts its own stream
        return state

    def resume_batches(self) -> int:
        """Batches this rank consumed before the checkpoint SAT resumed from, when it resumes its dataloader."""
        args = self.args
        if args is None or not getattr(args, "resume_dataloader", False):
            return 0
        return int(getattr(args, "iteration", 0) or 0) * int(getattr(args, "gradient_accumulation_steps", 1) or 1)

    def _slot(self, worker_slot: int, workers: int) -> Slot:
        """This rank's slot for worker slot `worker_slot` (not torch's worker id: see `_stream`)."""
        here = self.stream.current_slot()
        rank, world = here.index // here.workers, here.count // here.workers
        return Slot.of(rank, world, worker_slot, workers)

    def _pass_items(self, slot: Slot) -> int | None:
        """Samples `slot` yields in the current epoch, from the manifest's counts alone (None: endless)."""
        n = self.stream.slot_samples(slot)
        limit = self.stream.epoch_items
        return limit if n is None else n if limit is None else min(n, limit)

    def _stream(self) -> Iterator[dict[str, Any]]:
        # torch's DataLoader hands batch j of an iterator to worker j % num_workers, and a resumed SAT run starts a
        # new iterator at its checkpoint's batch k. Giving worker w the slot (k + w) % num_workers keeps each slot
        # on the same global batches (those congruent to it) across any number of restarts, so a slot's position
        # is a pure function of k.
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        done = self.resume_batches()
        worker_slot = (done + worker) % workers
        slot = self._slot(worker_slot, workers)
        # Global batches slot s served so far: those below `done` congruent to s modulo the worker count.
        skip = len(range(worker_slot, done, workers)) * self.batch_size
        epoch = 0
        while True:
            self.stream.set_epoch(epoch)
            n = self._pass_items(slot)
            if n is not None and skip >= n:
                if n == 0:
                    raise LatentMismatchError(
                        f"{self.root}: bucket {self.bucket} has {self.stream.num_samples} samples, fewer than data-"
                        f"parallel ranks x DataLoader workers; this rank's worker {worker} would get none. Use fewer "
                        "workers (num_workers) or more data")
                skip -= n
                epoch += 1
                continue
            if skip:
                log.info("resuming SAT data at batch %d: slot %d skips %d samples of epoch %d", done, slot.index,
                         skip, epoch)
            delivered = 0
            for _, item in self.stream.iter_slot(slot, skip):
                delivered += 1
                yield item
            if not delivered and not skip:
                raise LatentMismatchError(f"{self.root}: rank x worker slot {slot.index} of {slot.count} got no sample "
                                          f"of bucket {self.bucket}; use fewer DataLoader workers or more data")
            skip = 0
            epoch += 1


def _choose_bucket(root: Path, buckets: list[str], video_size: Any, frames: int | None,
                   bucket: str | None = None) -> str:
    """The one bucket of the dataset: `bucket` (data.params.bucket), else the one `video_size` and `max_num_frames`
    ask for, else the only one the shards hold. A bucket the shards do not hold is refused, naming those they do."""
    if bucket is not None:
        parsed = Bucket.parse_or_none(bucket)
        if parsed is None:
            raise ConfigError(f"{root}: data.params.bucket is {str(bucket)[:80]!r}, not FRAMESxHEIGHTxWIDTH; the "
                              f"shards hold {', '.join(buckets)}")
        want = str(parsed)
        if want not in buckets:
            raise ConfigError(f"{root}: data.params.bucket {want}: the shards hold {', '.join(buckets)}; set bucket to "
                              "one of those, or encode that size")
        if video_size is not None and frames is not None and want != f"{int(frames)}x{'x'.join(map(str, video_size))}":
            raise ConfigError(f"{root}: data.params.bucket {want} disagrees with video_size {list(video_size)} and "
                              f"max_num_frames {frames}; give one of them, or make them agree")
        return want
    if video_size is not None and frames is not None:
        h, w = (int(v) for v in video_size)
        want = f"{int(frames)}x{h}x{w}"
        if want not in buckets:
            raise ConfigError(f"{root}: data.params video_size {[h, w]} and max_num_frames {frames} ask for bucket "
                              f"{want}; the shards hold {', '.join(buckets)}. Encode with --frames {frames} --height "
                              f"{h} --width {w}, or set video_size and max_num_frames to one of those")
        return want
    if len(buckets) == 1:
        return buckets[0]
    raise ConfigError(f"{root}: the shards hold buckets {', '.join(buckets)}; SAT stacks every item of a batch, so "
                      "pick one: data.params bucket: FRAMESxHEIGHTxWIDTH, or video_size and max_num_frames")


def _data_parallel() -> tuple[int | None, int | None]:
    """(rank, size) of SAT's data-parallel group: model-parallel ranks of one group read the same data."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None, None
    try:
        from sat import mpu
    except ImportError:
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
