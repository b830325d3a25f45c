"""Decode ahead of the VAE in DataLoader worker processes, so the accelerator never waits for the CPU.

`ClipStream` yields `(PlannedClip, Clip | InputError)` in plan order. With `workers > 0`, worker processes decode and
resize clips while the main process encodes earlier ones; host memory stays bounded by
`workers * prefetch` decoded clips (a clip is only its sampled, resized frames, never a whole video).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from latentcache.encode.chunk_plan import PlannedClip, clip_settings_for
from latentcache.encode.decoding import decoded_identity
from latentcache.encode.decoding.decode import decode_clip
from latentcache.encode.decoding.frames import Clip
from latentcache.encode.input_stats import Stat
from latentcache.encode.settings import ClipSettings
from latentcache.errors import ConfigError, InputError

log = logging.getLogger(__name__)


def default_workers(world_size_on_node: int | None = None) -> int:
    """Leave a core for the process that drives the accelerator; share the rest between local ranks."""
    if world_size_on_node is None:
        world_size_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, usable_cores() // max(world_size_on_node, 1) - 1))


def decoder_threads(workers: int, world_size_on_node: int | None = None) -> int:
    """Threads for each decoder: this rank's share of the cores split between its decode workers (the main process
    when `workers` is 0), at least one.

    Frame threads are not free: on 1080p h264 one decoder thread costs 0.27-0.30 CPU-s a clip and FFmpeg's own
    choice (a thread per core, plus one) 0.34-0.39 (bench/RESULTS.md), so a worker gets only what the others leave.
    FFmpeg's choice also counts the host's cores, not a container's CPU quota: eight workers in a 2-CPU container on
    a 64-core host would run 8 x 65 threads."""
    if world_size_on_node is None:
        world_size_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, usable_cores() // max(world_size_on_node, 1) // max(workers, 1))


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU quota (`docker --cpus`, a
    Kubernetes limit), which the affinity does not show: a 2-CPU container on a 64-core host would otherwise
    start dozens of workers that fight over 2 CPUs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, int(quota))) if quota else cores


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, else v1 cfs quota/period), or None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(float(quota) / float(period), 1.0)
    except (ValueError, ZeroDivisionError):
        return None


def decode_planned(planned: PlannedClip, clip: ClipSettings, nvdec: bool = False,
                   decode_check: str = "auto", threads: int = 0, out: np.ndarray | None = None,
                   recorded: Stat = None) -> Clip | InputError:
    """Decode one planned clip at its own bucket's frames and size; a bad input is returned, not raised.
    `out`: the buffer the frames are written into (`decode_clip`). `recorded`: what its chunk plan recorded of the
    source, checked before and after decoding (`decoded_identity`)."""
    try:
        if recorded is not None:
            decoded_identity.check(planned.source, recorded, "before it was decoded")
        decoded = decode_clip(planned.source, planned.start, clip_settings_for(planned.bucket, clip), key=planned.key,
                              nvdec=nvdec, check=decode_check, threads=threads, out=out)
        if recorded is not None:
            decoded_identity.check(planned.source, recorded, "while it was decoded")
        return decoded
    except InputError as e:
        return e


SHM_DIR = "/dev/shm"


def shm_free_bytes() -> int | None:
    """Free bytes of the tmpfs torch's shared memory lives in; None where there is none to ask (not Linux)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class FrameRing:
    """Shared-memory slots decoded frames travel in from the workers to the main process.

    A tensor returned by a DataLoader worker travels through a new shared-memory file per clip, which the main
    process maps afresh: one page fault per 4 KiB, ~15 ms per 49x480x720 clip, on the accelerator's critical path.
    These slots are made once, before the workers fork, so they are mapped in every process from the start and
    their pages stay mapped after the first lap. The clip at stream position i travels in slot i % len(ring).
    A worker decodes straight into its slot (`slot`), so a clip is neither written into a fresh array (its page
    faults: ~40 ms of CPU per 49x480x720 clip) nor copied again; `put` copies what was decoded elsewhere.
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        # torch puts shared memory in /dev/shm, 64 MB by default in a Docker container: checked first, so a short
        # one is a usage error that says what to change, never a traceback (or a SIGBUS) mid-run.
        free = shm_free_bytes()
        if free is not None and slots * slot_bytes > free:
            raise ConfigError(self._short_message(free))
        try:
            self.memory = torch.empty((slots, slot_bytes), dtype=torch.uint8).share_memory_()
        except RuntimeError as e:  # another process took the space since: the same advice
            if "shared memory" not in str(e):
                raise
            raise ConfigError(self._short_message(shm_free_bytes())) from None

    def _short_message(self, free: int | None) -> str:
        have = f"{SHM_DIR} has {free / 2**20:.0f} MiB free" if free is not None else f"{SHM_DIR} is too small"
        return (f"decode workers need {self.slots * self.slot_bytes / 2**20:.0f} MiB of shared memory for their "
                f"frame ring ({self.slots} slots of {self.slot_bytes / 2**20:.1f} MiB, one clip each: the clips "
                f"--workers have in flight plus a batch), and {have}. Give it more (Docker: --shm-size 8g or "
                "--ipc=host; Kubernetes: an emptyDir of medium Memory on /dev/shm), or lower --workers or "
                "--batch-size; --workers 0 decodes in the main process, without shared memory")

    @staticmethod
    def size_for(workers: int, prefetch: int, held: int) -> int:
        """Slots enough that none is written while its clip is still in use. A DataLoader has dispatched at most
        `workers * prefetch` positions beyond those it has yielded, and the consumer is done with a clip once it
        has taken at most `held` - 1 more (its batch is then staged): position i + slots is dispatched only after
        that."""
        return workers * prefetch + held + 2

    def slot(self, position: int) -> np.ndarray:
        """The slot of `position` as a flat uint8 array to decode into; `holds` tells whether frames are in it."""
        return self.memory[position % self.slots].numpy()

    def holds(self, position: int, frames: np.ndarray) -> bool:
        """Whether `frames` were written at the start of the slot of `position` (decoded into it, not elsewhere)."""
        return (frames.dtype == np.uint8 and frames.flags.c_contiguous
                and frames.__array_interface__["data"][0] == self.memory[position % self.slots].data_ptr())

    def put(self, position: int, frames: np.ndarray) -> tuple[int, ...] | None:
        """Copy `frames` into the slot of `position`; their shape, or None when they do not fit in a slot."""
        if frames.nbytes > self.slot_bytes or frames.dtype != np.uint8:
            return None
        slot = self.memory[position % self.slots, : frames.nbytes]
        slot.copy_(torch.from_numpy(np.ascontiguousarray(frames)).reshape(-1))
        return frames.shape

    def get(self, position: int, shape: tuple[int, ...]) -> np.ndarray:
        """The frames `put` left at `position`: a view, valid until the ring comes round to its slot again."""
        numel = int(np.prod(shape))
        return self.memory[position % self.slots, :numel].numpy().reshape(shape)


class _DecodeDataset(Dataset):
    def __init__(self, clips: list[PlannedClip], clip: ClipSettings, nvdec: bool, decode_check: str = "auto",
                 ring: FrameRing | None = None, threads: int = 0, recorded: dict[str, Stat] | None = None) -> None:
        self.recorded = recorded or {}
        self.clips = clips
        self.clip = clip
        self.nvdec = nvdec
        self.decode_check = decode_check
        self.ring = ring
        self.threads = threads

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[int, Clip | InputError, tuple[int, ...] | None]:
        in_worker = get_worker_info() is not None
        out = self.ring.slot(index) if in_worker and self.ring is not None else None
        planned = self.clips[index]
        result = decode_planned(planned, self.clip, self.nvdec, self.decode_check, self.threads, out,
                                self.recorded.get(planned.source))
        if isinstance(result, Clip) and in_worker:
            if self.ring is None:
                shape = None
            elif self.ring.holds(index, result.frames):
                shape = result.frames.shape
            else:  # a still image, decoded into an array of its own
                shape = self.ring.put(index, result.frames)
            if shape is not None:
                return index, Clip(result.key, _EMPTY, result.meta), shape
            # A tensor crosses the worker queue through shared memory; a numpy array would be pickled and copied.
            result.frames = torch.from_numpy(result.frames)
        return index, result, None


_EMPTY = np.empty(0, np.uint8)


def _keep(items: list) -> list:
    return items


def slot_bytes(clips: list[PlannedClip], clip: ClipSettings) -> int:
    """The largest clip of `clips` in bytes, at its own bucket's frames and size."""
    sizes = {clip_settings_for(p.bucket, clip) for p in clips}
    return max(c.frames * c.height * c.width * 3 for c in sizes)


class ClipStream:
    """Ordered, prefetched decoding of a list of planned clips.

    `held`: how many clips the consumer keeps in use at once (its batch); frames it takes are valid until it has
    taken `held` more, so a consumer copies (stages) each batch before it asks for the next.

    `prefetch`: clips dispatched ahead per worker; None: enough that the workers hold the whole next batch while
    the consumer encodes this one (`prefetch_for`).

    `threads`: each decoder's threads; None: its share of the cores (`decoder_threads`).

    `recorded`: each source's stat as its chunk plan recorded it: a source that differs before or after its clip is
    decoded gives a `decoded_identity.ChangedWhileEncoding` (None: not checked)."""

    def __init__(self, clips: list[PlannedClip], clip: ClipSettings, *, workers: int = 0, prefetch: int | None = None,
                 nvdec: bool = False, decode_check: str = "auto", held: int = 1, threads: int | None = None,
                 recorded: dict[str, Stat] | None = None) -> None:
        self.recorded = recorded
        self.clips = clips
        self.clip = clip
        self.workers = workers
        self.prefetch = prefetch if prefetch is not None else prefetch_for(held, workers)
        self.nvdec = nvdec
        self.decode_check = decode_check
        self.held = held
        self.threads = decoder_threads(workers) if threads is None else threads

    def __iter__(self) -> Iterator[tuple[PlannedClip, Clip | InputError]]:
        if not self.clips:
            return
        if self.workers == 0:
            dataset = _DecodeDataset(self.clips, self.clip, self.nvdec, self.decode_check, threads=self.threads,
                                     recorded=self.recorded)
            for i in range(len(dataset)):
                _, result, _ = dataset[i]
                yield self.clips[i], result
            return
        ring = FrameRing(FrameRing.size_for(self.workers, self.prefetch, self.held), slot_bytes(self.clips, self.clip))
        dataset = _DecodeDataset(self.clips, self.clip, self.nvdec, self.decode_check, ring, self.threads,
                                 self.recorded)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=self.prefetch,
            collate_fn=_keep,
            worker_init_fn=_limit_threads,
            # fork is fast and safe here: workers only run PyAV and numpy.
            multiprocessing_context="fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None,
        )
        for index, result, shape in loader:
            if isinstance(result, Clip):
                if shape is not None:
                    result.frames = ring.get(index, shape)
                elif isinstance(result.frames, torch.Tensor):
                    result.frames = result.frames.numpy()
            yield self.clips[index], result


def prefetch_for(batch: int, workers: int) -> int:
    """Clips a DataLoader worker is given ahead (`prefetch_factor`) so that all of the next batch is being decoded
    while the consumer encodes this one. The loader keeps `workers * prefetch` positions dispatched beyond those it
    has yielded: once a batch is taken, those are the next batch's clips only if there are at least `batch` of them.
    With fewer (the default 2 per worker, batch 4 on one worker), the consumer waited after each batch for the
    clips that were never dispatched (`bench/encode.py --null-vae --vae-seconds 0.3`: 64 ms a clip)."""
    return max(2, -(-batch // max(1, workers)))


def _limit_threads(_: int) -> None:
    torch.set_num_threads(1)
