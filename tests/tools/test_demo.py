"""`latentcache demo`, the README's first command, end to end: real videos in, a transformer forward pass out."""

from __future__ import annotations

from latentcache import LatentShardDataset
from latentcache.cli import main


def test_demo_encodes_streams_and_runs_a_transformer(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("CogVideoXTransformer3DModel(in_channels=16) forward") == 2
    assert "finite=False" not in printed
    # The test extra brings transformers: the demo caches prompt embeddings with the tiny random text encoder and
    # feeds them to the transformer.
    assert "prompt_embeds (2, 8, 16)" in printed
    samples = list(LatentShardDataset(tmp_path / "latents", expected_channels=16))
    assert all(s["prompt_embeds"].shape == (8, 16) for s in samples)
    assert len(samples) == 4 and {tuple(s["latents"].shape) for s in samples} == {(16, 5, 8, 12)}
    assert [s["caption"] for s in samples if s["caption"]] == ["a red square walks from left to right"]
    assert (tmp_path / "latentcache-demo.txt").is_file()  # a later demo may write here again


def test_demo_refuses_a_folder_that_holds_a_users_files(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "mine.mp4").write_bytes(b"a user's video")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert f"{tmp_path}: not empty and not made by `latentcache demo`" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine.mp4", "videos"]


def test_demo_settings_are_what_the_same_command_line_gives(tmp_path):
    from latentcache.cli import build_parser, settings_from_args
    from latentcache.tools.demo import demo_settings

    args_list = ["encode", str(tmp_path / "videos"), "--out", str(tmp_path / "latents"), "--vae",
                 "tiny-random-cogvideox", "--samples-per-shard", "2", "--overwrite", "--frames", "17", "--fps", "8",
                 "--height", "64", "--width", "96"]
    args = build_parser().parse_args(args_list)
    assert demo_settings(tmp_path / "videos", tmp_path / "latents") == settings_from_args(args)
    with_text = build_parser().parse_args([*args_list, "--text-encoder", "tiny-random", "--text-max-length", "8"])
    assert demo_settings(tmp_path / "videos", tmp_path / "latents", text=True) == settings_from_args(with_text)
