"""Encode videos into latent shards on every device you have: the entry point for `accelerate launch` and SLURM.

Same arguments as `latentcache encode` (see `python jobs/encode.py --help`). Run from the repository root. On one
machine a plain `latentcache encode` already starts one process per visible GPU (latentcache/encode/launch.py);
this entry point is for several machines, SLURM, or an accelerate config of your own.

One GPU (or the CPU):
    python jobs/encode.py /data/videos --out /data/latents --vae THUDM/CogVideoX-2b

One node, 8 GPUs:
    accelerate launch --multi_gpu --num_processes 8 jobs/encode.py /data/videos --out /data/latents \\
        --vae THUDM/CogVideoX-2b

Two nodes, 8 GPUs each (run on both nodes, with NODE_RANK 0 and 1; OUT on a filesystem both see):
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $NODE_RANK \\
        --main_process_ip $MAIN_NODE --main_process_port 29500 \\
        jobs/encode.py /data/videos --out /shared/latents --vae THUDM/CogVideoX-2b

SLURM, 8 nodes as an array: one task per node, each an `accelerate launch` over its node's GPUs. The tasks never
rendezvous, so they may start, fail and be requeued independently (see jobs/slurm/encode.sbatch):
    sbatch --array=0-7 jobs/slurm/encode.sbatch /data/videos --out /shared/latents --vae THUDM/CogVideoX-2b
    sbatch --dependency=afterany:<jobid> jobs/slurm/finalize.sbatch /shared/latents   # if the last task died

CPU, 2 processes (what the tests run; `accelerate launch --cpu` alone starts one process, multi-CPU wants mpirun):
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 jobs/encode.py videos/ --out /tmp/latents \\
        --vae tiny-random-cogvideox --frames 17 --fps 8 --height 64 --width 96

Each process takes the shards i with i % world_size == its global rank. In a SLURM array the global rank is
(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) * processes per task + the local process index, and the world size is
SLURM_ARRAY_TASK_COUNT * processes per task. After a crash, a kill or a preemption, run the same command again:
finished shards are skipped, half-written ones are redone, and the result is byte-identical to an uninterrupted run.

Exit status of each process: 0 when the work is done, including when some inputs failed (they are in the summary
and OUT/failures.jsonl; under torchrun any other status tears the job down) unless --strict; 2 for a configuration
error such as other settings than OUT was made with; 1 for a bug. `accelerate launch` itself exits 1 when any
process does not exit 0.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from datetime import timedelta

import torch
from accelerate import PartialState

from latentcache import cli
from latentcache.encode import job
from latentcache.errors import ConfigError

BARRIER_TIMEOUT = timedelta(days=7)


def global_slice(process_index: int, num_processes: int, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(global rank, world size) of this process. Outside a SLURM array that is accelerate's own view."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return process_index, num_processes
    task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
    if not 0 <= task < count:
        raise ConfigError(f"SLURM array task {env['SLURM_ARRAY_TASK_ID']} is outside 0..{count - 1} "
                          f"(SLURM_ARRAY_TASK_MIN {env.get('SLURM_ARRAY_TASK_MIN', '0')}, COUNT {count}); submit a "
                          "contiguous range such as --array=0-7, not a stepped one")
    return task * num_processes + process_index, count * num_processes


def limit_cpu_threads(state: PartialState, requested: int | None = None) -> None:
    """CPU processes on one machine would each start one thread per core and fight; share the cores instead, unless
    --cpu-threads says how many (the encode applies it again; here it also covers planning)."""
    if state.device.type != "cpu":
        return
    if requested is not None:
        torch.set_num_threads(requested)
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))


def sum_over_processes(state: PartialState) -> Callable[[list[float]], list[float]]:
    def reduce(values: list[float]) -> list[float]:
        if state.num_processes == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=state.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    return reduce


def world_of(state: PartialState, env: Mapping[str, str] = os.environ) -> job.World:
    """This process's place in the job: its global slice of the shards, and the collectives of its launch."""
    rank, world_size = global_slice(state.process_index, state.num_processes, env)
    return job.World(rank=rank, world_size=world_size, is_main=state.is_main_process,
                     barrier=state.wait_for_everyone, reduce_sum=sum_over_processes(state), device=str(state.device),
                     local_rank=state.local_process_index)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_encode_arguments(parser)
    args = parser.parse_args(argv)
    if args.processes is not None:
        # The launcher (accelerate's --num_processes, the SLURM array) decides how many processes run here; a count
        # given twice would be taken silently for one that is not.
        parser.error("--processes is for a plain `latentcache encode`; under jobs/encode.py the launcher decides the "
                     "processes (accelerate launch --num_processes N, or the SLURM array's tasks)")
    cli.configure_logging(args.verbose)
    # Without cpu=True accelerate leaves processes on a GPU-less machine unconnected (each one thinks it is alone).
    # A rank that finishes early waits at the final barrier for the slowest one, which can be hours behind: the
    # default collective timeout (minutes) would kill the whole job there.
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
                         or not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    limit_cpu_threads(state, args.cpu_threads)
    try:
        code = cli.guarded(lambda: job.run(cli.settings_from_args(args), world_of(state)))
        # torchrun treats any non-zero exit as a crash (a traceback, the other ranks killed) and SLURM marks the task
        # failed; a few unreadable inputs among many are a normal outcome, reported in the summary and failures.jsonl.
        return cli.EXIT_OK if code == cli.EXIT_SOME_FAILED and not args.strict else code
    finally:
        if state.use_distributed:
            state.destroy_process_group()


if __name__ == "__main__":
    cli.exit_with(main())
