"""Clip geometry follows the family: without --frames/--height/--width each family encodes at its pipeline's own
defaults (not CogVideoX's 49x480x720 for every VAE), and --buckets replace --height/--width in every check. Plus
LTX-2.3's layout: the compression its config states, not diffusers' fallback formula."""

from __future__ import annotations

import inspect
import json

import diffusers
import numpy as np
import pytest
import torch

from latentcache.cli import build_parser, main, settings_from_args
from latentcache.encode.execute import resolve_batch_size
from latentcache.encode.models.families import FAMILIES
from latentcache.encode.models.vae import load_vae
from latentcache.encode.settings import ClipSettings, VAESettings
from latentcache.errors import ConfigError
from latentcache.tools.synthetic import write_video


def _pipeline_defaults() -> dict[str, tuple[int, int, int]]:
    """(frames, height, width) each family's diffusers pipeline generates when given none, read from the pipelines."""
    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3PrepareLayoutStep
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import resolve_canvas_size
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    def signature(name: str) -> dict[str, object]:
        params = inspect.signature(getattr(diffusers, name).__call__).parameters
        return {k: params[k].default for k in ("num_frames", "height", "width")}

    found = {}
    for family, name in (("wan", "WanPipeline"), ("hunyuanvideo", "HunyuanVideoPipeline"), ("ltx", "LTXPipeline")):
        d = signature(name)
        found[family] = (d["num_frames"], d["height"], d["width"])
    # CogVideoXPipeline: the transformer's sample size x the VAE's 8x (CogVideoX-2b's config is the class default).
    init = inspect.signature(diffusers.CogVideoXTransformer3DModel.__init__).parameters
    found["cogvideox"] = (init["sample_frames"].default, init["sample_height"].default * 8,
                          init["sample_width"].default * 8)
    # LTX2Pipeline: height/width in its signature; 121 frames for checkpoints without a duration head.
    d = signature("LTX2Pipeline")
    assert "num_frames = 121" in inspect.getsource(diffusers.LTX2Pipeline.__call__)
    found["ltx2"] = (121, d["height"], d["width"])
    mochi = diffusers.MochiPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    found["mochi"] = (signature("MochiPipeline")["num_frames"], mochi.default_height, mochi.default_width)
    # HunyuanVideo15Pipeline: 16:9 at target size 640 (its default without a transformer config), 16x VAE.
    h, w = HunyuanVideo15ImageProcessor(vae_scale_factor=16).calculate_default_height_width(9, 16, 640)
    found["hunyuanvideo15"] = (signature("HunyuanVideo15Pipeline")["num_frames"], h, w)
    step = MiniMaxH3PrepareLayoutStep()
    frames = next(p.default for p in step.inputs if p.name == "num_frames")
    configs = {c.name: c.default for c in step.expected_configs}
    # canvas_multiple: the VAE's 16x times the transformer's 2x2 patch; the 16:9 canvas it generates on by default.
    found["minimax-h3"] = (frames, *resolve_canvas_size(16, 9, 32, configs["canvas_short_edge"],
                                                        configs["canvas_max_pixels"]))
    return found


def test_every_familys_default_geometry_is_its_pipelines():
    defaults = _pipeline_defaults()
    assert set(defaults) == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert family.default_clip == defaults[name], name


def _settings(*argv: str):
    return settings_from_args(build_parser().parse_args(["encode", "in", "--out", "out", *argv]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_command_line_takes_the_familys_geometry_unless_told(family):
    clip = _settings("--vae", f"tiny-random-{family}").encode.clip
    assert (clip.frames, clip.height, clip.width) == FAMILIES[family].default_clip
    spec = load_vae(VAESettings(source=f"tiny-random-{family}", family=family, subfolder=None), "cpu").spec
    spec.check_clip(clip)  # each family's default fits its own frame rule and size multiple
    told = _settings("--vae", f"tiny-random-{family}", "--frames", "9", "--height", "32").encode.clip
    assert (told.frames, told.height, told.width) == (9, 32, FAMILIES[family].default_clip[2])


def test_buckets_replace_height_and_width_in_every_check(tmp_path, capsys):
    """The issue's command: LTX with --buckets and no --height/--width encodes (it said '--width 720 is not a
    multiple of the ltx VAE's spatial compression 32'); a bucket off the grid is still refused, naming the bucket."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "wide", codec="h264", num_frames=60, height=96, width=144)
    write_video(videos / "tall", codec="h264", num_frames=60, height=144, width=96)
    out = tmp_path / "out"
    assert main(["encode", str(videos), "--out", str(out), "--vae", "tiny-random-ltx", "--device", "cpu",
                 "--frames", "17", "--buckets", "64x96,96x64"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["buckets"]) == ["17x64x96", "17x96x64"]
    capsys.readouterr()
    assert main(["encode", str(videos), "--out", str(tmp_path / "bad"), "--vae", "tiny-random-ltx", "--device", "cpu",
                 "--frames", "17", "--buckets", "64x96,80x64"]) == 2
    err = capsys.readouterr().err
    assert "--buckets 80x64" in err and "--width" not in err
    # A --width the VAE cannot take is no problem when --buckets replace it (it was refused before the VAE loaded).
    spec = load_vae(VAESettings(source="tiny-random-ltx", family="ltx", subfolder=None), "cpu").spec
    spec.check_clip(ClipSettings(frames=17, height=480, width=720, buckets=("64x96", "96x64")))
    with pytest.raises(ConfigError, match="--width 720 is not a multiple of the ltx VAE's spatial compression 32"):
        spec.check_clip(ClipSettings(frames=17, height=480, width=720))


def test_auto_batch_size_is_sized_for_the_largest_bucket(tiny_vae, monkeypatch):
    seen = []
    monkeypatch.setattr(tiny_vae, "auto_batch_size", lambda frames, height, width: seen.append((frames, height,
                                                                                                  width)) or 1)
    settings = _settings("--vae", "tiny-random-cogvideox", "--frames", "17", "--buckets", "64x96,128x96,96x96")
    assert resolve_batch_size(None, tiny_vae, settings.encode) == 1
    assert seen == [(17, 128, 96)]


# LTX-2.3's layout: its own down-sampling order and a last block as wide as the one before (1024 after 1024), with
# the 32x / 8x compression its config states.
LTX23_SHAPED = dict(block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32),
                    layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                    downsample_type=("spatiotemporal", "spatial", "temporal", "spatiotemporal"),
                    spatial_compression_ratio=32, temporal_compression_ratio=8)


def test_ltx23_compression_is_read_from_its_config_not_ltx2_0s_layout(tmp_path):
    fallback = {k: v for k, v in LTX23_SHAPED.items() if not k.endswith("compression_ratio")}
    with torch.device("meta"):
        assert diffusers.AutoencoderKLLTX2Video(**fallback).spatial_compression_ratio == 64  # not what it does
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = diffusers.AutoencoderKLLTX2Video(**LTX23_SHAPED)
    model.save_pretrained(tmp_path / "pipe" / "vae")
    vae = load_vae(VAESettings(source=str(tmp_path / "pipe"), family="ltx2"), "cpu")
    assert (vae.spec.spatial_compression, vae.spec.temporal_compression, vae.spec.frame_rule) == (32, 8, "8k+1")
    mean, _ = vae.encode(np.zeros((1, 17, 64, 96, 3), np.uint8))
    assert tuple(mean.shape) == (1, 128, 3, 2, 3)
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a", codec="h264", num_frames=60, height=96, width=128)
    out = tmp_path / "out"
    assert main(["encode", str(videos), "--out", str(out), "--vae", str(tmp_path / "pipe"), "--device", "cpu",
                 "--frames", "17", "--height", "64", "--width", "96"]) == 0
    spec = json.loads((out / "manifest.json").read_text())["latent_spec"]
    assert (spec["family"], spec["spatial_compression"], spec["temporal_compression"]) == ("ltx2", 32, 8)
    from latentcache.tools.preview import preview
    from latentcache.train.dataset import LatentShardDataset

    (item,) = list(LatentShardDataset(out, sample_posterior=False))
    assert tuple(item["latents"].shape) == (128, 3, 2, 3)

    result = preview(out, tmp_path / "preview.mp4")
    assert result.frames == 17 and result.size == (2 * 96, 64)
