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

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from latentcache.encode.decode import Clip, decode_clip
from latentcache.encode.plan import PlannedClip, clip_settings_for
from latentcache.encode.settings import ClipSettings
from latentcache.errors import InputError

log = logging.getLogger(__name__)


def default_workers(world_size_on_node: int | None = None) -> int:
    """Leave a core for the process that drives the accelerator; share the rest between local ranks."""
    if world_size_on_node is None:
        world_size_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, usable_cores() // max(world_size_on_node, 1) - 1))


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
                   decode_check: str = "auto") -> Clip | InputError:
    """Decode one planned clip at its own bucket's frames and size; a bad input is returned, not raised."""
    try:
        return decode_clip(planned.source, planned.start, clip_settings_for(planned.bucket, clip), key=planned.key,
                           nvdec=nvdec, check=decode_check)
    except InputError as e:
        return e


class _DecodeDataset(Dataset):
    def __init__(self, clips: list[PlannedClip], clip: ClipSettings, nvdec: bool, decode_check: str = "auto") -> None:
        self.clips = clips
        self.clip = clip
        self.nvdec = nvdec
        self.decode_check = decode_check

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[int, Clip | InputError]:
        result = decode_planned(self.clips[index], self.clip, self.nvdec, self.decode_check)
        if isinstance(result, Clip) and get_worker_info() is not None:
            # A tensor crosses the worker queue through shared memory; a numpy array would be pickled and copied.
            result.frames = torch.from_numpy(result.frames)
        return index, result


def _keep(items: list) -> list:
    return items


class ClipStream:
    """Ordered, prefetched decoding of a list of planned clips."""

    def __init__(self, clips: list[PlannedClip], clip: ClipSettings, *, workers: int = 0, prefetch: int = 2,
                 nvdec: bool = False, decode_check: str = "auto") -> None:
        self.clips = clips
        self.clip = clip
        self.workers = workers
        self.prefetch = prefetch
        self.nvdec = nvdec
        self.decode_check = decode_check

    def __iter__(self) -> Iterator[tuple[PlannedClip, Clip | InputError]]:
        if not self.clips:
            return
        dataset = _DecodeDataset(self.clips, self.clip, self.nvdec, self.decode_check)
        if self.workers == 0:
            for i in range(len(dataset)):
                _, result = dataset[i]
                yield self.clips[i], result
            return
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
        for index, result in loader:
            if isinstance(result, Clip) and isinstance(result.frames, torch.Tensor):
                result.frames = result.frames.numpy()
            yield self.clips[index], result


def _limit_threads(_: int) -> None:
    torch.set_num_threads(1)
