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
