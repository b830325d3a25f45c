"""The encode job (latentcache/encode/job.py): typed settings in, a World for where it runs, no argparse.

Import rules, cycles included, are tests/test_layout.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_CLIP

from latentcache.cli import build_parser, settings_from_args
from latentcache.encode import job
from latentcache.encode.settings import EncodeSettings, JobSettings, RuntimeSettings, VAESettings
from latentcache.format.manifest import read_manifest


def _settings(videos: Path, out: Path, **runtime) -> JobSettings:
    return JobSettings(inputs=(str(videos),), out=out,
                       encode=EncodeSettings(clip=TINY_CLIP, vae=VAESettings(source="tiny-random-cogvideox"),
                                             samples_per_shard=2),
                       runtime=RuntimeSettings(device="cpu", workers=0, **runtime))


def test_typed_settings_encode_with_auto_batch_and_sum_over_the_world(video_dir, tmp_path, capsys):
    """batch_size None (auto) needs no resolving by the caller; the summary adds what `reduce_sum` returns."""
    calls = []

    def twin_sum(values: list[float]) -> list[float]:  # as if a second process had done the same work
        calls.append(list(values))
        return [2 * v for v in values]

    out = tmp_path / "out"
    world = job.World(reduce_sum=twin_sum, barrier=lambda: calls.append("barrier"))
    assert job.run(_settings(video_dir, out, batch_size=None), world) == job.EXIT_OK
    printed = capsys.readouterr().out
    assert calls[0] == [0.0] and calls[-1] == "barrier"  # the planning collective first, the barrier last
    # 4 inputs, one clip each, one planning chunk (the default for one process), one shard per bucket (2 sizes);
    # doubled by the twin.
    assert "[job] 8 clips encoded into 4 shard(s) (0 redone after an interruption) by 2 process(es)" in printed
    assert read_manifest(out)["counts"]["samples"] == 4


def test_a_rank_whose_main_process_refused_the_plan_stops_without_writing(video_dir, tmp_path):
    out = tmp_path / "out"
    world = job.World(rank=1, world_size=2, is_main=False, reduce_sum=lambda values: [1.0])  # main: "refused"
    assert job.run(_settings(video_dir, out), world) == job.EXIT_USAGE
    assert not out.exists()


def test_the_cli_builds_every_setting_the_job_reads(tmp_path):
    args = build_parser().parse_args(["encode", "a.mp4", "list.txt", "--out", str(tmp_path), "--vae",
                                      "tiny-random-wan", "--chunk-size", "3", "--overwrite", "--images", "--strict",
                                      "--batch-size", "auto", "--workers", "0", "--device", "cpu", "--nvdec"])
    s = settings_from_args(args)
    assert (s.inputs, s.out, s.chunk_size, s.overwrite) == (("a.mp4", "list.txt"), tmp_path, 3, True)
    assert s.encode.clip.images and s.encode.vae.family == "wan"
    assert s.runtime == RuntimeSettings(device="cpu", batch_size=None, workers=0, compile=False, nvdec=True,
                                        strict=True)


def test_exit_3_reports_failures_once_and_a_rerun_that_adds_none_exits_0(small_videos, tmp_path, capsys):
    """A failed input makes the run that records it exit 3; a no-op rerun (its summary: 0 failed) exits 0, and an
    append that brings a new failed input exits 3 again: the status says what this run added to failures.jsonl."""
    import shutil

    from conftest import ENCODE_SMALL

    from latentcache.cli import main

    videos = tmp_path / "in"
    videos.mkdir()
    shutil.copy(small_videos / "v0.mp4", videos)
    shutil.copy(small_videos / "broken.mp4", videos)
    out = tmp_path / "out"

    def encode() -> int:
        return main(["encode", str(videos), "--out", str(out), "--device", "cpu", *ENCODE_SMALL])

    assert encode() == job.EXIT_SOME_FAILED
    assert "1 failed input(s) or clip(s) new in failures.jsonl (exit status 3)" in capsys.readouterr().out
    assert encode() == job.EXIT_OK
    printed = capsys.readouterr().out
    assert "0 skipped, 0 failed" in printed  # the [job] line: this run's work
    assert "its 1 failed input(s) or clip(s) were reported by an earlier run; this run added none" in printed
    (videos / "broken2.mp4").write_bytes(b"not a video either")
    assert encode() == job.EXIT_SOME_FAILED
    assert "1 failed input(s) or clip(s) new" in capsys.readouterr().out
    assert read_manifest(out)["counts"]["failed"] == 2
    assert encode() == job.EXIT_OK


@pytest.mark.slow
def test_mistakes_are_refused_before_diffusers_loads_and_leave_no_output(small_videos, tmp_path, capsys):
    """A mistyped input path or an empty folder is refused before diffusers is imported (it took 8-10 s), and a
    refused run leaves no OUT holding only `.latentcache`, also when the refusal comes while the plan reads the
    inputs (two inputs with one relative path)."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import REPO_ROOT

    from latentcache.cli import main

    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    # One fresh interpreter for both mistakes: whether diffusers was imported is a fact of that process alone.
    script = ("import sys; from latentcache.cli import main\n"
              "for given in sys.argv[2:]:\n"
              "    code = main(['encode', given, '--out', sys.argv[1], '--vae', 'tiny-random-cogvideox', '--device', "
              "'cpu'])\n"
              "    print('exit', code)\n"
              "print('diffusers loaded:', 'diffusers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "no_such_dir"),
                           str(tmp_path / "empty")], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.count("exit 2") == 2, done.stdout + done.stderr
    assert "does not exist" in done.stderr and "holds no files to encode" in done.stderr
    assert "diffusers loaded: False" in done.stdout
    assert not out.exists()
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        shutil.copy(small_videos / "v0.mp4", tmp_path / d)
    assert main(["encode", str(tmp_path / "d1"), str(tmp_path / "d2"), "--out", str(out), "--vae",
                 "tiny-random-cogvideox", "--device", "cpu"]) == 2
    assert "share the relative path" in capsys.readouterr().err
    assert not out.exists()


def test_the_random_weights_note_is_said_once(video_dir, tmp_path, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="latentcache"):
        assert job.run(_settings(video_dir / "sub", tmp_path / "out")) == job.EXIT_OK
    said = capsys.readouterr().out.count("random weights") + caplog.text.count("random weights")
    assert said == 1


def test_the_clip_settings_are_checked_against_the_vae_once_a_run(video_dir, tmp_path, monkeypatch):
    """Before the VAE loads when its config can be read, else once it has loaded; never again per plan or chunk."""
    import dataclasses

    import pytest

    from latentcache.encode import chunk_plan
    from latentcache.encode.models import vae_source
    from latentcache.errors import ConfigError

    checked = []
    real = chunk_plan.check_buckets
    monkeypatch.setattr(chunk_plan, "check_buckets", lambda *a: (checked.append(a), real(*a))[1])
    assert job.run(_settings(video_dir, tmp_path / "out")) == job.EXIT_OK
    assert len(checked) == 1
    # A config that cannot be read before loading (peek_spec None): checked once the VAE is loaded, before any plan.
    monkeypatch.setattr(vae_source, "peek_spec", lambda settings: None)
    assert job.run(_settings(video_dir, tmp_path / "again")) == job.EXIT_OK
    assert len(checked) == 2
    odd = _settings(video_dir, tmp_path / "odd")
    odd = dataclasses.replace(odd, encode=dataclasses.replace(odd.encode, clip=dataclasses.replace(TINY_CLIP,
                                                                                                   frames=18)))
    with pytest.raises(ConfigError, match="--frames 18 does not fit the cogvideox VAE"):
        job.run(odd)
    assert not (tmp_path / "odd").exists()
