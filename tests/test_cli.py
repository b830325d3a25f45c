"""The command line as a new user meets it: help that states every default, --dry-run, and mistakes refused before
any model loads."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from latentcache.cli import EXIT_OK, EXIT_USAGE, build_parser, main
from latentcache.tools.synthetic import write_video

TINY = ["--vae", "tiny-random-cogvideox", "--height", "64", "--width", "96", "--workers", "0"]


def _encode_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["encode"]


def test_every_encode_option_has_help_and_the_defaults_are_printed(capsys):
    for action in _encode_parser()._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit):
        main(["encode", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option, default in (("--frames", "the family pipeline's, CogVideoX 49"), ("--fps", "8.0"),
                            ("--height", "the family pipeline's, CogVideoX 480"),
                            ("--width", "the family pipeline's, CogVideoX 720"),
                            ("--samples-per-shard", "64"), ("--clips", "first"), ("--resize", "crop"),
                            ("--seed", "0"), ("--dtype", "auto"), ("--device", "auto")):
        listing = text[text.index("options:"):]
        assert re.search(re.escape(option) + r" .{0,300}?\(default: " + re.escape(default) + r"\)", listing), option
    for kind in (".txt", ".csv", ".jsonl", ".parquet", ".tar", "glob", "s3://", "folders"):
        assert kind in text, kind
    assert text.startswith("usage: latentcache encode")
    assert "Decode each input video" in text and "exit codes: 0 done" in text


def test_the_top_help_speaks_to_a_user(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "Encode a video dataset into VAE latents" in text
    assert "builds the settings" not in text and "owns printing" not in text


@pytest.fixture()
def three_videos(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for name, frames in (("a", 40), ("b", 80), ("c", 100)):
        write_video(d / name, codec="h264", num_frames=frames, fps=8, height=64, width=96)
    (d / "broken.mp4").write_text("not a video")
    return d


def test_dry_run_describes_the_run_and_writes_nothing(three_videos: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    args = ["encode", str(three_videos), "--out", str(out), *TINY, "--frames", "33"]
    assert main([*args, "--dry-run"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert not out.exists()
    assert f"dry run: nothing was written to {out}" in printed
    # Every video holds a 33-frame clip at 8 fps (4 s); the broken file fails at probe, as the real run records it.
    assert "inputs: 4; clips: 3 in" in printed and "1 failed (probe/InvalidDataError: 1)" in printed
    assert "bucket 33x64x96: 3 clip(s)" in printed
    estimated = re.search(r"estimated output: about ([\d.]+) KB", printed)
    assert estimated
    # The real run then writes what the dry run said, within the estimate's stated margin.
    assert main(args) == 3  # the broken file
    written = sum(p.stat().st_size for p in out.rglob("*.tar"))
    assert abs(float(estimated.group(1)) * 1024 - written) / written < 0.10
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 3 and manifest["counts"]["failed"] == 1


def test_dry_run_with_estimate_times_clips_here(three_videos: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert main(["encode", str(three_videos), "--out", str(out), *TINY, "--frames", "17", "--dry-run",
                 "--estimate", "2"]) == EXIT_OK
    printed = capsys.readouterr().out
    found = re.search(r"estimate from 2 clip\(s\) on cpu: encode ([\d.]+) s/clip, decode ([\d.]+) CPU-s/clip; the "
                      r"whole run: about ([\d.]+) device-hours", printed)
    assert found and float(found.group(1)) > 0, printed
    assert not out.exists()
    assert main(["encode", str(three_videos), "--out", str(out), *TINY, "--estimate", "2"]) == EXIT_USAGE
    assert "--estimate goes with --dry-run" in capsys.readouterr().err


def test_a_frame_count_the_vae_cannot_encode_is_refused_before_the_weights_load(tmp_path: Path, capsys):
    """A VAE folder with its config but weights that would take minutes to load (here: none at all, so loading
    would fail another way): the refusal names --frames, from the config alone."""
    from diffusers import AutoencoderKLCogVideoX

    from latentcache.encode.models.families import FAMILIES

    vae_dir = tmp_path / "vae"
    AutoencoderKLCogVideoX(**FAMILIES["cogvideox"].tiny_config).save_config(vae_dir)
    d = tmp_path / "in"
    d.mkdir()
    write_video(d / "a", codec="h264", num_frames=40, fps=8, height=64, width=96)
    code = main(["encode", str(d), "--out", str(tmp_path / "out"), "--vae", str(vae_dir), "--frames", "18",
                 "--height", "64", "--width", "96"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "--frames 18 does not fit the cogvideox VAE, which needs 4k+1 frames; nearest valid: 17 or 21" in err
    assert not (tmp_path / "out").exists()  # refused before --out is even made


def test_other_settings_are_refused_before_the_vae_loads(tmp_path: Path, capsys, monkeypatch, video_dir: Path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(video_dir / "a_h264.mp4", d)
    out = tmp_path / "out"
    assert main(["encode", str(d), "--out", str(out), *TINY, "--frames", "17"]) == EXIT_OK
    capsys.readouterr()

    def no_loading(*args, **kwargs):
        raise AssertionError("the VAE was loaded before the settings were checked")

    monkeypatch.setattr("latentcache.encode.models.vae.load_vae", no_loading)
    assert main(["encode", str(d), "--out", str(out), *TINY, "--frames", "17", "--fps", "4"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{out} was made with other settings: settings.clip.fps: 8.0 then, 4.0 now" in err
    # A folder of someone else's files, likewise, and --dry-run refuses the same way.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for extra in ([], ["--dry-run"]):
        assert main(["encode", str(d), "--out", str(foreign), *TINY, "--frames", "17", *extra]) == EXIT_USAGE
        assert "is not empty and was not made by latentcache" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_dry_run_on_an_existing_output_describes_the_append(three_videos: Path, tmp_path: Path, capsys):
    """On an output that exists, --dry-run says what a rerun would add (only the new inputs are planned and
    probed), and still writes nothing there."""
    from conftest import tree_bytes

    (three_videos / "broken.mp4").unlink()
    out = tmp_path / "out"
    args = ["encode", str(three_videos), "--out", str(out), *TINY, "--frames", "33"]
    assert main(args) == EXIT_OK
    before = tree_bytes(out)
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == EXIT_OK
    assert f"{out} holds 3 input(s) already; a run would add none" in capsys.readouterr().out
    write_video(three_videos / "d", codec="h264", num_frames=40, fps=8, height=64, width=96)
    assert main([*args, "--dry-run"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert f"{out} holds 3 input(s) already; a run would add 1 new input(s)" in printed
    assert "inputs: 1; clips: 1 in 1 shard(s)" in printed and "bucket 33x64x96: 1 clip(s)" in printed
    assert tree_bytes(out) == before


# ------------------------------------------------------------------ a file url the user typed is the path it names


@pytest.mark.slow
def test_encode_reads_and_writes_the_paths_file_urls_name(video_dir: Path, tmp_path: Path, monkeypatch):
    """`--out file:///TMP/out` encodes into /TMP/out, and an input `file:///TMP/videos` encodes those videos: nothing
    named `file:` appears in the current folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    shutil.copy(next(video_dir.glob("a_h264.*")), videos)
    assert main(["encode", f"file://{videos}", "--out", f"file://{out}", *TINY, "--frames", "9"]) == EXIT_OK
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 1 and manifest["counts"]["failed"] == 0
    assert list(cwd.iterdir()) == []
    # The same output through localhost, and the plain spelling: one output, already done.
    assert main(["encode", str(videos), "--out", f"file://localhost{out}", *TINY, "--frames", "9"]) == EXIT_OK
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_the_trainer_commands_and_the_dataset_read_a_file_url(encoded_dir: Path, tmp_path: Path, monkeypatch,
                                                              capsys):
    from latentcache import LatentShardDataset

    monkeypatch.chdir(tmp_path)
    assert main(["info", f"file://{encoded_dir}"]) == EXIT_OK
    assert main(["verify", f"file://localhost{encoded_dir}", "--no-sha256"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert str(encoded_dir) in printed
    assert (len(list(LatentShardDataset(f"file://{encoded_dir}")))
            == len(list(LatentShardDataset(encoded_dir))) > 0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("argv", "why"), [
    (["encode", "VIDEOS", "--out", "file://nas.example/latents"], "names a file on the host 'nas.example'"),
    (["encode", "file:videos", "--out", "OUT"], "a file url is file:///ABSOLUTE/PATH"),
    (["info", "file:/data/latents"], "a file url is file:///ABSOLUTE/PATH"),
    (["export", "musubi", "OUT", "--to", "file://other/cache"], "names a file on the host 'other'"),
])
def test_an_unusual_file_url_argument_is_a_usage_error_naming_it(argv, why, video_dir: Path, tmp_path: Path,
                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [str(video_dir) if a == "VIDEOS" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    spelling = next(a for a in argv if a.startswith("file:"))
    assert f"'{spelling}': " in err and why in err and "refused, nothing was opened or written" in err
    assert list(tmp_path.iterdir()) == []
