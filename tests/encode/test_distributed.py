"""jobs/encode.py under `accelerate launch` and as SLURM array tasks: every planned clip written exactly once, and the
same bytes whichever process, rank layout or task writes a shard."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENCODE_SMALL, REPO_ROOT, SMALL_VIDEOS, tree_bytes

from latentcache.encode.chunks import read_chunk_plan
from latentcache.encode.job_plan import JobPlan, Part, chunks_for_rank, read_job_plan
from latentcache.errors import ConfigError
from latentcache.format.manifest import read_manifest
from latentcache.format.reader import decode_sample, iter_tar
from latentcache.tools.verify import verify

RANK_LINE = re.compile(r"\[rank (\d+)\] (\d+) clips in (\d+) shard\(s\) written")
# Longer than any run here takes on a loaded machine, far shorter than a hang (jobs/encode.py's barrier: days).
HANG_S = 400


def _entry_module():
    spec = importlib.util.spec_from_file_location("encode_entry", REPO_ROOT / "jobs" / "encode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rank_lines(log: str) -> dict[int, tuple[int, int]]:
    """rank -> (clips written, shards written), from the per-rank summary lines."""
    return {int(r): (int(c), int(s)) for r, c, s in RANK_LINE.findall(log)}


@pytest.mark.slow
def test_two_processes_write_every_planned_clip_once(encoded_reference: Path) -> None:
    log = (encoded_reference.parent / "log.txt").read_text()
    # Six one-clip shards, round robin over two ranks: three each, none twice.
    assert rank_lines(log) == {0: (3, 3), 1: (3, 3)}, log
    assert "[job] 6 clips encoded into 6 shard(s)" in log
    plan = read_job_plan(encoded_reference)
    clips = [c for ref in plan.chunk_refs() for c in read_chunk_plan(encoded_reference, plan, ref).clips]
    manifest = read_manifest(encoded_reference)
    assert manifest["counts"] == {"samples": SMALL_VIDEOS, "shards": SMALL_VIDEOS, "planned_clips": SMALL_VIDEOS,
                                  "skipped": 0, "failed": 1, "skipped_by_reason": {},
                                  "failed_by_reason": {"probe/InvalidDataError": 1}}
    assert verify(encoded_reference).problems == []
    keys = []
    for shard in manifest["shards"]:
        for raw in iter_tar(encoded_reference / shard["path"]):
            sample = decode_sample(raw, shard["path"])
            assert sample["mean"].shape == (16, 5, 8, 12)
            keys.append(sample["key"])
    assert sorted(keys) == sorted(c.key for c in clips)
    assert not list(encoded_reference.rglob("*.tmp"))


@pytest.mark.slow
def test_sample_metadata_has_nothing_that_varies_between_runs(encoded_reference: Path) -> None:
    """Byte-identical shards need metadata free of times, temp paths and hosts; sources are root-relative."""
    text = b"".join(p.read_bytes() for p in sorted(encoded_reference.rglob("*.tar")))
    assert b"/tmp" not in text.replace(str(encoded_reference).encode(), b"")
    for raw in iter_tar(next(encoded_reference.rglob("*.tar"))):
        meta = decode_sample(raw, "shard")["meta"]
        assert not Path(meta["source"]).is_absolute()
        assert not any("time" in k and k != "frame_times" for k in meta), sorted(meta)
        assert socket.gethostname() not in str(meta)


@pytest.mark.slow
def test_one_plain_process_writes_the_same_bytes(small_videos: Path, encoded_reference: Path, tmp_path: Path) -> None:
    """`latentcache encode` in this process (world size 1) == the 2-process run, byte for byte: the same plan, batch
    size and torch thread count (`--cpu-threads 1` in ENCODE_SMALL; by default each of the two processes would take
    half the cores, this one all of them, and the software record in each sidecar would say so)."""
    from latentcache.cli import main

    out = tmp_path / "out"
    assert main(["encode", str(small_videos), "--out", str(out), "--device", "cpu", *ENCODE_SMALL]) == 3
    assert tree_bytes(out) == tree_bytes(encoded_reference)


@pytest.mark.slow
def test_plain_encode_with_two_processes_writes_the_same_bytes(small_videos: Path, encoded_reference: Path,
                                                               tmp_path: Path, capsys) -> None:
    """`latentcache encode --processes 2`: two real CPU processes launched by the command itself (as it does with
    one per GPU by default) write what `accelerate launch` and one process write, byte for byte, and say how many
    ran on what."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "latentcache.cli", "encode", str(small_videos), "--out", str(out), *ENCODE_SMALL,
           "--processes", "2"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr  # 3: broken.mp4, reported by the run that finalized
    assert "launching 2 encode processes" in done.stdout
    assert "[rank 0]" in done.stdout and "[rank 1]" in done.stdout
    assert "by 2 process(es) on cpu" in done.stdout
    assert tree_bytes(out) == tree_bytes(encoded_reference)
    # A rerun with another process count finds everything done, and keeps the bytes.
    done = subprocess.run(cmd[:-1] + ["1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert tree_bytes(out) == tree_bytes(encoded_reference)


def test_process_count_defaults_to_one_per_visible_accelerator() -> None:
    from latentcache.encode.launch import process_count

    assert process_count(None, "auto", accelerators=0) == 1  # a CPU machine
    assert process_count(None, "auto", accelerators=4) == 4
    assert process_count(None, "cuda", accelerators=2) == 2
    assert process_count(None, "cuda:1", accelerators=4) == 1  # a named device is one device
    assert process_count(None, "cpu", accelerators=4) == 1
    assert process_count(3, "cpu", accelerators=0) == 3


def test_array_mapping_covers_every_shard_once() -> None:
    entry = _entry_module()
    plan = JobPlan("f", {}, {}, [Part(0, 13, "0" * 64, 1, [(i, 1, "0" * 64) for i in range(13)])])  # 13 chunks
    taken: list[int] = []
    ranks = []
    for task in range(3):
        env = {"SLURM_ARRAY_TASK_ID": str(task + 1), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
        for process in range(2):
            rank, world = entry.global_slice(process, 2, env)
            assert world == 6
            ranks.append(rank)
            taken += [ref.index for ref in chunks_for_rank(plan, rank, world)]
    assert sorted(ranks) == list(range(6))
    assert sorted(taken) == list(range(13))
    assert entry.global_slice(1, 4, {}) == (1, 4)  # plain accelerate: its own ranks
    with pytest.raises(ConfigError, match="contiguous range"):
        entry.global_slice(0, 2, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_slurm_array_of_three_tasks_times_two_processes(small_videos: Path, encoded_reference: Path,
                                                        tmp_path: Path) -> None:
    """jobs/slurm/encode.sbatch run as three concurrent array tasks: they race to make the plan, each of the six
    global ranks writes its one shard, the last task finalizes, and the bytes equal the 2-process run's."""
    out = tmp_path / "out"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    tasks = []
    for task in range(3):
        env = {**os.environ, "PATH": path, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
               "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3",
               "SLURM_SUBMIT_DIR": str(REPO_ROOT), "NPROC_PER_NODE": "2", "MAIN_PROCESS_PORT": str(_free_port())}
        log = tmp_path / f"task{task}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(["bash", str(REPO_ROOT / "jobs" / "slurm" / "encode.sbatch"), str(small_videos),
                                     "--out", str(out), *ENCODE_SMALL], env=env, stdout=f, stderr=subprocess.STDOUT)
        tasks.append((proc, log))
    logs = []
    for proc, log in tasks:
        assert proc.wait(timeout=240) == 0, log.read_text()
        logs.append(log.read_text())
    written = {}
    for task, log in enumerate(logs):
        lines = rank_lines(log)
        assert set(lines) == {2 * task, 2 * task + 1}, log
        written.update(lines)
    assert written == {rank: (1, 1) for rank in range(6)}
    assert sum("manifest at" in log for log in logs) >= 1
    assert tree_bytes(out) == tree_bytes(encoded_reference)


@pytest.mark.slow
def test_a_refused_plan_stops_every_process(small_videos: Path, encoded_reference: Path, launch_encode,
                                            tmp_path: Path) -> None:
    """Other settings than OUT was made with, under 2 processes: the run stops with the refusal, and neither rank
    encodes from the stale plan.json."""
    import shutil
    import time

    out = tmp_path / "out"
    shutil.copytree(encoded_reference, out)
    before = tree_bytes(out)
    log = tmp_path / "refused.log"
    started = time.monotonic()
    proc = launch_encode(small_videos, out, log, "--frames", "9")
    # A rank left waiting would wait for the collective's timeout (days): any bound tells the two apart, and a
    # generous one does not fail on a loaded machine, where starting two torch processes alone can take a minute.
    assert proc.wait(timeout=HANG_S) != 0
    text = log.read_text()
    assert "made with other settings" in text and time.monotonic() - started < HANG_S
    assert tree_bytes(out) == before  # nothing written by either rank


@pytest.mark.slow
def test_failure_records_do_not_depend_on_the_process_count(bad_inputs: dict[str, Path], tmp_path: Path) -> None:
    """Every kind of broken input (truncated, corrupt, not a video) gets the same failure records, labels included,
    from 1 and 2 processes of a plain `latentcache encode` at the default chunk size (issue 36 saw TruncatedVideo
    vs CorruptVideo). The default chunking follows the process count, so the records' order may differ (they are
    written chunk by chunk); with the same --chunk-size the file is the same bytes."""
    folder = next(iter(bad_inputs.values())).parent
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    i = ENCODE_SMALL.index("--chunk-size")
    args = [*ENCODE_SMALL[:i], *ENCODE_SMALL[i + 2:], "--clips", "all"]
    records = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        done = subprocess.run([sys.executable, "-m", "latentcache.cli", "encode", str(folder), "--out", str(out),
                               *args, "--processes", str(n)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 3, done.stdout + done.stderr
        records[n] = sorted((out / "failures.jsonl").read_text().splitlines())
    assert records[1] == records[2]
    assert any("TruncatedVideo" in r for r in records[1]) and any("CorruptVideo" in r for r in records[1])


def test_the_launchers_entry_refuses_a_process_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Under jobs/encode.py the launcher decides how many processes run: a `--processes` there is refused, before
    anything is started or written, rather than silently ignored."""
    entry = _entry_module()
    with pytest.raises(SystemExit) as stopped:
        entry.main([str(tmp_path), "--out", str(tmp_path / "out"), "--processes", "2"])
    assert stopped.value.code == 2
    assert "--processes is for a plain `latentcache encode`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
