"""A plain `latentcache encode` on every visible accelerator: one process per device, as `accelerate launch` starts.

The command's process becomes a launcher: it starts N copies of the same command line, each told its rank through
the environment variables torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), waits
for them and returns the main one's exit code. Each copy joins a process group (NCCL on GPUs, gloo on CPUs) and runs
`job.run(settings, World)` exactly as `jobs/encode.py` does under `accelerate launch` or a SLURM array: the same plan,
the same shards per rank, the same bytes. `CUDA_VISIBLE_DEVICES` chooses the GPUs; `--processes N` the count.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta

from latentcache.encode.job import EXIT_CRASH, World
from latentcache.errors import ConfigError

log = logging.getLogger(__name__)

# Set in every process this launcher starts: it runs its share and never launches again.
CHILD_ENV = "LATENTCACHE_LAUNCHED"
# A rank that finishes early waits at the final barrier for the slowest one, which can be hours behind.
BARRIER_TIMEOUT = timedelta(days=7)
# After one process exits non-zero, the others get this long to exit on their own (a refusal reaches every rank
# through the planning collective, and the rank that refused prints why) before they are stopped.
GRACE_SECONDS = 10.0


def visible_accelerators() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES applies), 0 without any."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def process_count(requested: int | None, device: str, accelerators: int) -> int:
    """How many processes a plain `latentcache encode` runs: `--processes` when given; else one per visible
    accelerator for `--device auto` or `cuda`, and one for a CPU or a named device (`cuda:3`)."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--processes must be at least 1, got {requested}")
        return requested
    if device in ("auto", "cuda") and accelerators > 1:
        return accelerators
    return 1


def is_child(env: Mapping[str, str] = os.environ) -> bool:
    return env.get(CHILD_ENV) == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: Sequence[str], processes: int) -> int:
    """Run `latentcache <argv>` in `processes` processes on this machine; the main (rank 0) one's exit code, or 1
    when any process crashed."""
    port = _free_port()
    children: list[subprocess.Popen] = []

    def forward(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # a SLURM preemption: the processes below are stopped, then this one

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for rank in range(processes):
            env = {**os.environ, CHILD_ENV: "1", "RANK": str(rank), "WORLD_SIZE": str(processes),
                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
            children.append(subprocess.Popen([sys.executable, "-m", "latentcache.cli", *argv], env=env))
        codes = _wait_all(children)
    except BaseException:
        _stop(children)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if any(c < 0 or c == EXIT_CRASH for c in codes):  # a bug's traceback, or a process killed by a signal
        return EXIT_CRASH
    return codes[0] or next((c for c in codes if c), 0)


def _wait_all(children: list[subprocess.Popen]) -> list[int]:
    """Wait for every child; once one has exited non-zero, stop the rest after GRACE_SECONDS (they would otherwise
    wait at a collective for a rank that is gone)."""
    failed_at: float | None = None
    while True:
        codes = [c.poll() for c in children]
        if all(code is not None for code in codes):
            return [int(code) for code in codes]  # type: ignore[arg-type]
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
            _stop([c for c, code in zip(children, codes, strict=True) if code is None])
        time.sleep(0.2)


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def child_world(device_setting: str, cpu_threads: int | None, env: Mapping[str, str] = os.environ) -> World:
    """This launched process's World: its rank from the environment, joined to the others (NCCL on GPUs, process i
    on visible GPU i, or all on the one `--device cuda:N` names; gloo on the CPU, each process with an equal share of
    the cores unless --cpu-threads says how many)."""
    import torch
    import torch.distributed as dist

    rank, size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    gpus = visible_accelerators() if device_setting != "cpu" else 0
    device: str | None = None
    if gpus:
        device = device_setting if device_setting.startswith("cuda:") else f"cuda:{local % gpus}"
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads or max(1, len(os.sched_getaffinity(0)) // int(env["LOCAL_WORLD_SIZE"])))
    dist.init_process_group("nccl" if gpus else "gloo", rank=rank, world_size=size, timeout=BARRIER_TIMEOUT)
    where = torch.device(device or "cpu")

    def reduce_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=where)
        dist.all_reduce(t)
        return t.tolist()

    return World(rank=rank, world_size=size, is_main=rank == 0, barrier=dist.barrier, reduce_sum=reduce_sum,
                 device=device, local_rank=local)


def close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
