"""jobs/slurm/*.sbatch under a real single-node SLURM (Debian's slurmctld, slurmd and munge, started on localhost by
tests/slurm_cluster.py): a 4-task array run one task at a time encodes every clip once; a concurrent array with one
task cancelled mid-run, that index resubmitted and finalize.sbatch run as a dependency ends byte-identical to it.
Skips, saying why, where SLURM is not installed or cannot start (.ci/run installs it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from conftest import ENCODE_SMALL, REPO_ROOT, SMALL_VIDEOS, tree_bytes

from latentcache.encode.chunks import read_chunk_plan
from latentcache.encode.job_plan import chunks_for_rank, read_job_plan
from latentcache.format.manifest import read_manifest
from latentcache.format.out_layout import sidecar_of
from latentcache.format.reader import decode_sample, iter_tar

pytestmark = pytest.mark.slow

TASKS = 4
CANCELLED = 1  # the array index cancelled mid-run: it owns two shards (1 and 5 of 6), so a cancel can split them
RANK_LINE = re.compile(r"\[rank (\d+)\] (\d+) clips in (\d+) shard\(s\) written")
# No GPUs here: the command line overrides the script's `#SBATCH --gpus-per-node=8 --cpus-per-task=64`.
CPU_ONLY = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
# One CPU, not the script's two: on this 2-CPU node a 2-CPU job would wait for run A's tasks to drain.
FINALIZE_OPTIONS = ["--cpus-per-task=1", "--time=5"]
# A task takes ~10 s on an idle 2-core machine (imports, the tiny VAE); a loaded CI box is many times slower.
WAIT_S = 400

# Put on PYTHONPATH of the array task to cancel: that task (and no other) freezes right after its first shard's
# sidecar is written (LATENTCACHE_TEST_PAUSE_AT, see shards.PAUSE_ENV) and stays frozen until it is cancelled, so the
# cancel lands between its two shards every time, however loaded the machine (a sleep could run out first: issue
# 20.8). The bytes written are the same; only timing changes.
PAUSE_AFTER_FIRST_SIDECAR = """
import os

if os.environ.get("SLURM_ARRAY_TASK_ID") == os.environ.get("PAUSE_ARRAY_TASK"):
    os.environ["LATENTCACHE_TEST_PAUSE_AT"] = "sidecar-written#1:" + os.environ["PAUSE_DIR"]
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """The client environment (SLURM_CONF) of a fresh cluster; its jobs are cancelled and daemons stopped after."""
    try:
        env = slurm_cluster.up()
    except (slurm_cluster.SlurmUnavailable, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no SLURM cluster: {e}")
    full = {**os.environ, **env}
    try:
        yield full
    finally:
        subprocess.run(["scancel", "--user", "root"], env=full, capture_output=True, timeout=30)
        # Let slurmctld hear the cancelled steps end before it stops (else they linger, retrying to tell it).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and subprocess.run(["squeue", "--noheader"], env=full, capture_output=True,
                                                              text=True, timeout=30).stdout.strip():
            time.sleep(0.5)
        slurm_cluster.down()


def _job_env(slurm: dict[str, str], **extra: str) -> dict[str, str]:
    # sbatch exports the submitting environment to the job (--export=ALL): CPU processes, one per task, this venv.
    return {**slurm, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "NPROC_PER_NODE": "1",
            "LATENTCACHE_VENV": sys.prefix, **extra}


def sbatch(env: dict[str, str], logs: Path, script: str, *args: str, options: list[str]) -> str:
    """Submit from the repository root (the scripts run jobs/encode.py relative to it); returns the job id."""
    cmd = ["sbatch", "--parsable", f"--output={logs}/%x-%A_%a.out", *options, f"jobs/slurm/{script}", *args]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_states(env: dict[str, str], job: str) -> dict[str, str]:
    """Array index (or the job id, for a plain job) -> JobState, from slurmctld (it keeps ended jobs MinJobAge)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0, shown.stderr
    states = {}
    for line in shown.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        states[fields.get("ArrayTaskId", fields["JobId"])] = fields["JobState"]
    return states


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def wait_ended(env: dict[str, str], job: str, timeout: float = WAIT_S) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = job_states(env, job)
        # A pending array shows its unstarted tasks as one line ("2-3%1"): not ended until each has its own.
        if states and all(s in ENDED for s in states.values()) and not any("-" in k for k in states):
            return states
        assert time.monotonic() < deadline, f"job {job} still not done after {timeout:.0f} s: {states}"
        time.sleep(0.5)


def log_of(logs: Path, name: str, job: str, index: str = "4294967294") -> str:
    # %a of a job that is not an array expands to 4294967294 (NO_VAL) in this SLURM version.
    matches = sorted(logs.glob(f"{name}-{job}_*.out"))
    wanted = [p for p in matches if p.name == f"{name}-{job}_{index}.out"] or matches
    assert wanted, f"no log {name}-{job}_{index}.out in {sorted(p.name for p in logs.iterdir())}"
    return wanted[0].read_text()


def _owned(out: Path, task: int):
    """The shards array task `task` of TASKS owns under OUT's plan."""
    plan = read_job_plan(out)
    # A task plans its chunks when it starts: before that, it owns no planned shard yet.
    return [s for ref in chunks_for_rank(plan, task, TASKS) if (out / ref.plan_name).is_file()
            for s in read_chunk_plan(out, plan, ref).shards]


def _planned_clips(out: Path) -> list:
    plan = read_job_plan(out)
    return [c for ref in plan.chunk_refs() for c in read_chunk_plan(out, plan, ref).clips]


def keys_once(out: Path) -> list[str]:
    manifest = read_manifest(out)
    keys = [decode_sample(raw, s["path"])["key"] for s in manifest["shards"] for raw in iter_tar(out / s["path"])]
    assert len(keys) == len(set(keys)), keys
    return keys


def test_array_one_task_at_a_time_then_a_cancelled_task_resubmitted(slurm: dict[str, str], small_videos: Path,
                                                                    tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    serial_out, resumed_out = tmp_path / "serial", tmp_path / "resumed"
    encode_args = [str(small_videos), *ENCODE_SMALL]
    env = _job_env(slurm)

    # Run A, uninterrupted: --array=0-3%1 runs the four tasks one after another; the last one writes the manifest.
    serial = sbatch(env, logs, "encode.sbatch", *encode_args, "--out", str(serial_out),
                    options=[f"--array=0-{TASKS - 1}%1", *CPU_ONLY])

    # Run B, alongside: the same array unthrottled, index CANCELLED paused after each sidecar and cancelled in the
    # pause after its first; finalize.sbatch waits for the whole array as a dependency.
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    (pause_dir / "sitecustomize.py").write_text(PAUSE_AFTER_FIRST_SIDECAR)
    python_path = os.pathsep.join(p for p in (str(pause_dir), os.environ.get("PYTHONPATH")) if p)
    paused_env = _job_env(slurm, PYTHONPATH=python_path, PAUSE_ARRAY_TASK=str(CANCELLED), PAUSE_DIR=str(pause_dir))
    array = sbatch(paused_env, logs, "encode.sbatch", *encode_args, "--out", str(resumed_out),
                   options=[f"--array=0-{TASKS - 1}", *CPU_ONLY])
    first_finalize = sbatch(env, logs, "finalize.sbatch", str(resumed_out),
                            options=[f"--dependency=afterany:{array}", *FINALIZE_OPTIONS])

    deadline = time.monotonic() + WAIT_S
    while not list(pause_dir.glob("*.reached")):
        assert time.monotonic() < deadline, f"task {CANCELLED} wrote no shard: {job_states(env, array)}"
        time.sleep(0.1)
    cancelled_task = f"{array}_{CANCELLED}"
    assert job_states(env, cancelled_task)[str(CANCELLED)] == "RUNNING"
    subprocess.run(["scancel", cancelled_task], env=env, check=True, timeout=30)

    states = wait_ended(env, array)
    assert states == {**{str(t): "COMPLETED" for t in range(TASKS)}, str(CANCELLED): "CANCELLED"}, states
    owned = _owned(resumed_out, CANCELLED)
    done = [sidecar_of(resumed_out / s.relpath).exists() for s in owned]
    assert sorted(done) == [False, True], "the cancel was to land between the task's two shards"
    # Nobody else takes a cancelled task's shards, so no task found the work finished and wrote the manifest; the
    # dependent finalize ran once the array ended and refused, naming what is missing.
    assert wait_ended(env, first_finalize) == {first_finalize: "FAILED"}
    assert not (resumed_out / "manifest.json").exists()
    missing = next(s for s, d in zip(owned, done, strict=True) if not d)
    assert missing.relpath in log_of(logs, "latentcache-finalize", first_finalize)

    # Resubmit the cancelled index on its own, without the pause, then finalize.sbatch after it.
    again = sbatch(env, logs, "encode.sbatch", *encode_args, "--out", str(resumed_out),
                   options=[f"--array={CANCELLED}", *CPU_ONLY])
    final = sbatch(env, logs, "finalize.sbatch", str(resumed_out), options=[f"--dependency=afterany:{again}",
                                                                            *FINALIZE_OPTIONS])
    assert wait_ended(env, again) == {str(CANCELLED): "COMPLETED"}
    assert wait_ended(env, final) == {final: "COMPLETED"}, log_of(logs, "latentcache-finalize", final)
    # A lone index is a one-task array (SLURM_ARRAY_TASK_COUNT=1): it owns every shard, and writes the one missing.
    assert (f"[encode] 1 clips in 1 shard(s) written (0 left unfinished by an earlier run), {SMALL_VIDEOS - 1} "
            "shard(s) already done") in log_of(logs, "latentcache-encode", again, str(CANCELLED))

    # Run A: every task ran, each wrote exactly its slice, every clip once.
    assert wait_ended(env, serial) == {str(t): "COMPLETED" for t in range(TASKS)}
    for task in range(TASKS):
        mine = _owned(serial_out, task)
        clips = sum(len(s.keys) for s in mine)
        lines = RANK_LINE.findall(log_of(logs, "latentcache-encode", serial, str(task)))
        assert lines == [(str(task), str(clips), str(len(mine)))], lines
    manifest = read_manifest(serial_out)
    assert manifest["counts"] == {"samples": SMALL_VIDEOS, "shards": SMALL_VIDEOS, "planned_clips": SMALL_VIDEOS,
                                  "skipped": 0, "failed": 1, "skipped_by_reason": {},
                                  "failed_by_reason": {"probe/InvalidDataError": 1}}
    assert sorted(keys_once(serial_out)) == sorted(c.key for c in _planned_clips(serial_out))

    # The interrupted, resubmitted and finalized run: every file byte-identical to the uninterrupted one.
    assert not list(resumed_out.rglob("*.tmp"))
    assert tree_bytes(resumed_out) == tree_bytes(serial_out)


def test_encode_sbatch_on_a_node_without_a_gpu_driver_runs_one_process(tmp_path: Path) -> None:
    """No NPROC_PER_NODE, no GPUs from SLURM, and nvidia-smi failing (a CPU node built from a CUDA image): one CPU
    process, not a silent exit of the script under `set -o pipefail`. No cluster needed: the script runs as bash."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\""
                   " >&2\nexit 9\n")
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "SLURM_GPUS_ON_NODE")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", LATENTCACHE_VENV=sys.prefix, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(["bash", "jobs/slurm/encode.sbatch", "--help"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 process(es)" in done.stdout and "--out" in done.stdout, done.stdout
