"""Inputs laid out for other trainers: the CogVideoX-finetune layout (`videos.txt` + `prompts.txt`, as diffusers'
CogVideoX training scripts and cogvideox-factory read it) and a musubi-tuner dataset TOML."""

from __future__ import annotations

import logging
from pathlib import Path

from latentcache import LatentShardDataset
from latentcache.cli import main
from latentcache.tools.synthetic import write_video

TINY = ["--vae", "tiny-random-cogvideox", "--device", "cpu", "--frames", "9", "--fps", "8", "--height", "64",
        "--width", "96", "--clips", "first", "--workers", "0"]


def _captions(out: Path) -> dict[str, str | None]:
    return {item["meta"]["source"]: item["caption"] for item in LatentShardDataset(out)}


def test_videos_txt_takes_line_i_of_prompts_txt_as_its_caption(tmp_path: Path, caplog, capsys) -> None:
    """ROOT/videos.txt names videos relative to ROOT; line i of ROOT/prompts.txt is the caption of line i. Blank
    lines are skipped in both, as those scripts skip them; files that do not pair up are refused."""
    root = tmp_path / "dataset"
    (root / "videos").mkdir(parents=True)
    for name in ("a", "b", "c"):
        write_video(root / "videos" / name, codec="h264", num_frames=16, fps=8, height=64, width=96)
    (root / "videos.txt").write_text("videos/a.mp4\nvideos/b.mp4\n\nvideos/c.mp4\n", encoding="utf-8")
    (root / "prompts.txt").write_text("a red square\n\n  a blue square \na green square\n", encoding="utf-8")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="latentcache"):
        assert main(["encode", str(root / "videos.txt"), "--out", str(out), *TINY]) == 0
    assert "captions from" in caplog.text and "prompts.txt beside it, line i for line i" in caplog.text
    captions = _captions(out)
    assert {Path(k).name: v for k, v in captions.items()} == {"a.mp4": "a red square", "b.mp4": "a blue square",
                                                              "c.mp4": "a green square"}

    (root / "prompts.txt").write_text("a red square\na blue square\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["encode", str(root / "videos.txt"), "--out", str(tmp_path / "out2"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "videos.txt has more non-empty lines than" in err and "prompts.txt" in err


MUSUBI_TOML = """\
# As musubi-tuner's docs/dataset_config.md ("Sample for Video Dataset with Caption Text Files") writes one
[general]
resolution = [96, 64]
caption_extension = ".txt"
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
video_directory = "{videos}"
cache_directory = "{cache}" # recommended to set cache directory
target_frames = [9]
frame_extraction = "head"
source_fps = 30.0
"""


def _musubi_bucket_selector():
    """musubi-tuner's own BucketSelector, from the fixture copy of its dataset code (tests/fixtures/musubi_tuner)."""
    import importlib.util
    import sys
    import types

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "musubi_tuner"
    sys.path.insert(0, str(fixture))
    stub = importlib.util.find_spec("cv2") is None
    if stub:
        sys.modules["cv2"] = types.ModuleType("cv2")  # media_utils imports it for resizing, never called here
    try:
        from musubi_tuner.dataset.bucket import BucketSelector

        return BucketSelector
    finally:
        sys.path.remove(str(fixture))
        if stub:
            sys.modules.pop("cv2", None)


def test_a_musubi_dataset_toml_is_an_input(tmp_path: Path, caplog, capsys) -> None:
    """A musubi-tuner dataset TOML encodes as its own settings say: its video_directory with .txt captions,
    target_frames [9] at the model's rate (source_fps set: 16 for Wan), head -> the first clip, resolution
    [W, H], and enable_bucket's buckets exactly as musubi's BucketSelector builds them; what cannot be mapped is
    refused naming it."""
    from latentcache.encode.inputs.musubi_config import musubi_buckets
    from latentcache.format.manifest import read_manifest

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "wide", codec="h264", num_frames=48, fps=24, height=64, width=96)
    write_video(videos / "tall", codec="h264", num_frames=48, fps=24, height=96, width=64)
    (videos / "wide.txt").write_text("a wide video", encoding="utf-8")
    toml = tmp_path / "dataset.toml"
    toml.write_text(MUSUBI_TOML.format(videos=videos, cache=tmp_path / "cache"), encoding="utf-8")
    selector = _musubi_bucket_selector()((96, 64), True, False, "wan")
    assert musubi_buckets(96, 64) == selector.bucket_resolutions
    out = tmp_path / "out"
    base = ["--vae", "tiny-random-wan", "--device", "cpu", "--workers", "0"]
    with caplog.at_level(logging.INFO, logger="latentcache"):
        assert main(["encode", str(toml), "--out", str(out), *base]) == 0
    assert "--frames 9 --fps 16 --width 96 --height 64 --clips first --buckets" in caplog.text
    assert "batch_size = 1 is the trainer's" in caplog.text
    clip = read_manifest(out)["settings"]["clip"]
    assert (clip["frames"], clip["fps"], clip["strategy"]) == (9, 16.0, "first")
    assert sorted(clip["buckets"]) == sorted(f"{h}x{w}" for w, h in selector.bucket_resolutions)
    # Each video in the bucket musubi would pick: the nearest aspect ratio.
    picked = {Path(k).stem: v for k, v in
              ((item["meta"]["source"], item["meta"]["bucket"]) for item in LatentShardDataset(out))}
    for name, size in (("wide", (96, 64)), ("tall", (64, 96))):
        w, h = selector.get_bucket_resolution(size)
        assert picked[name] == f"9x{h}x{w}"
    assert _captions(out)[next(k for k in _captions(out) if "wide" in k)] == "a wide video"

    for change, named in ((("target_frames = [9]", "target_frames = [1, 9]"), "target_frames"),
                          (('frame_extraction = "head"', 'frame_extraction = "full"'), "frame_extraction 'full'"),
                          (("source_fps = 30.0", ""), "pass --fps"),
                          (("cache_directory", "control_directory"), "control_directory cannot be mapped")):
        toml.write_text(MUSUBI_TOML.format(videos=videos, cache=tmp_path / "cache").replace(*change),
                        encoding="utf-8")
        capsys.readouterr()
        assert main(["encode", str(toml), "--out", str(tmp_path / "refused"), *base]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
