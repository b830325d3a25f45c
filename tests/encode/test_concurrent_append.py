"""An append started while another run works on the same OUT (docs/distributed.md: "later: 200,000 more videos",
with no dependency on the first job): the first run finishes its own inputs and exits 0, saying that the run which
appended finishes the rest; that run writes the manifest, and the tree is what the two runs one after the other give.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TINY_VAE, tree_bytes

from latentcache.cli import main
from latentcache.encode import job, job_plan, planning
from latentcache.encode.inputs import iter_inputs
from latentcache.encode.models.vae import load_vae
from latentcache.encode.settings import EncodeSettings
from latentcache.format.shards import PAUSE_ENV
from latentcache.tools.synthetic import write_video

ARGS = ["--vae", "tiny-random-cogvideox", "--frames", "9", "--fps", "8", "--height", "64", "--width", "96",
        "--clips", "first", "--samples-per-shard", "1", "--device", "cpu", "--workers", "0", "--batch-size", "1",
        "--cpu-threads", "1"]


def _folders(root: Path) -> tuple[Path, Path]:
    """`first` (3 videos) and `more` (2 other videos): an encode of the first, an append of the second."""
    first, more = root / "first", root / "more"
    for folder, names in ((first, ("a0", "a1", "a2")), (more, ("b0", "b1"))):
        folder.mkdir(parents=True)
        for i, name in enumerate(names):
            write_video(folder / name, codec="h264", num_frames=24 + 4 * i, height=64, width=96, fps=8)
    return first, more


def _start(out: Path, log: Path, pause: Path, point: str, *inputs: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "", PAUSE_ENV: f"{point}:{pause}"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "latentcache.cli", "encode", *map(str, inputs), "--out",
                                 str(out), *ARGS], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


def _reached(pause: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not list(pause.glob("*.reached")):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


@pytest.mark.slow
def test_an_append_while_a_run_works_lets_both_finish(tmp_path: Path) -> None:
    first, more = _folders(tmp_path / "videos")
    out = tmp_path / "out"
    pause_a, pause_b = tmp_path / "pause_a", tmp_path / "pause_b"
    pause_a.mkdir()
    pause_b.mkdir()
    # The first run is frozen after its first shard; the append plans its new part and is frozen there; the first
    # run then finishes its own inputs while the appended part is not even planned.
    a = _start(out, tmp_path / "a.log", pause_a, "sidecar-written", first)
    _reached(pause_a, a, tmp_path / "a.log")
    b = _start(out, tmp_path / "b.log", pause_b, "planned", first, more)
    _reached(pause_b, b, tmp_path / "b.log")
    (pause_a / "release").touch()
    assert a.wait(timeout=300) == 0, (tmp_path / "a.log").read_text()
    said = (tmp_path / "a.log").read_text()
    assert "every input of this run is done; another run appended 1 part(s)" in said
    assert not (out / "manifest.json").exists()
    (pause_b / "release").touch()
    assert b.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()
    assert main(["verify", str(out)]) == 0
    # The same tree as the two runs one after the other.
    sequential = tmp_path / "sequential"
    assert main(["encode", str(first), "--out", str(sequential), *ARGS]) == 0
    assert main(["encode", str(first), str(more), "--out", str(sequential), *ARGS]) == 0
    assert tree_bytes(out) == tree_bytes(sequential)


def test_an_append_landing_between_the_check_and_the_finalize_is_not_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The append's plan.json lands after this run found nothing left of the plan it read, before it finalized:
    finalize sees the new part unfinished, and this run still exits 0, naming what happened."""
    first, more = _folders(tmp_path / "videos")
    out = tmp_path / "out"
    assert main(["encode", str(first), "--out", str(out), *ARGS]) == 0
    mine = job_plan.read_job_plan(out)
    vae = load_vae(TINY_VAE, "cpu")
    stale = iter([mine])
    real = job_plan.read_job_plan

    def racing(path: Path) -> job_plan.JobPlan:
        found = next(stale, None)
        if found is None:
            return real(path)
        # The append lands now: its part planned (plan.json written), nothing of it encoded yet.
        planning.load_or_make_plan(out, iter_inputs([str(first), str(more)], exclude=[out]), _settings(out), vae)
        return found

    monkeypatch.setattr(job_plan, "read_job_plan", racing)
    capsys.readouterr()
    assert job._finish(out, mine) == 0
    assert "another run appended 1 part(s)" in capsys.readouterr().out


def _settings(out: Path) -> EncodeSettings:
    """The EncodeSettings the CLI builds from ARGS (those the output was planned with)."""
    from latentcache.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["encode", "x", "--out", str(out), *ARGS])
    return settings_from_args(args).encode
