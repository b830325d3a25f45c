"""MiniMax-H3's VAE (`AutoencoderKLMiniMaxH3`), whose conventions differ from every other family: each one checked
against diffusers' own class and its pipeline's arithmetic (`diffusers.modular_pipelines.minimax_h3`): the frame rule
17n+5 -> 5n+2, ImageNet-normalised pixels over [0, 1] (in and out), spatial tiling on as released, the encoder pinned
to fp32, detection from the config alone. Streaming and the transformer forward pass: tests/encode/test_families.py
(parametrised over every family)."""

from __future__ import annotations

import json

import av
import diffusers
import numpy as np
import pytest
import torch
from diffusers.modular_pipelines.minimax_h3.modular_pipeline import (
    MiniMaxH3ModularPipeline,
    align_num_frames,
    video_latent_num_frames,
)

from latentcache.cli import main
from latentcache.encode.models.families import FAMILIES
from latentcache.encode.models.vae import load_vae
from latentcache.encode.models.vae_source import family_for_source
from latentcache.encode.settings import ClipSettings, TilingSettings, VAESettings
from latentcache.errors import ConfigError
from latentcache.format.buckets import FrameRule
from latentcache.format.spec import LatentSpec
from latentcache.tools.synthetic import write_video

TINY = VAESettings(source="tiny-random-minimax-h3", family="minimax-h3", subfolder=None)


@pytest.fixture(scope="module")
def vae():
    return load_vae(TINY, "cpu")


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """22 real decoded frames [1, 22, 64, 272, 3]: wider than MiniMax-H3's 256-pixel tiles."""
    path = write_video(tmp_path_factory.mktemp("minimax") / "wide", codec="h264", num_frames=22, height=64,
                       width=272)
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])[None]


def _pipeline_pixels(frames: np.ndarray) -> torch.Tensor:
    """encode_vae_condition's arithmetic: (uint8 / 255 - pixel_mean) / pixel_std, with the pipeline's own values."""
    mean = torch.tensor(MiniMaxH3ModularPipeline.pixel_mean.fget(None)).view(1, -1, 1, 1, 1)
    std = torch.tensor(MiniMaxH3ModularPipeline.pixel_std.fget(None)).view(1, -1, 1, 1, 1)
    pixels = torch.from_numpy(frames).permute(0, 4, 1, 2, 3)
    return (pixels.to(torch.float32).div(255.0) - mean) / std


def test_the_frame_rule_is_the_pipelines_17n_plus_5_to_5n_plus_2(vae):
    config, model = vae.model.config, vae.model
    assert vae.spec.frame_rule == "17k+5->5k+2" and vae.spec.rule == FrameRule(17, 5, 5, 2)
    for frames in range(1, 110):
        aligned = align_num_frames(frames, config.clip_length, model.tokens_chunk_size)
        assert vae.spec.rule.fits(frames) == (frames == aligned or frames == 1)
        if frames == aligned:
            assert vae.spec.rule.latent_frames(frames) == video_latent_num_frames(
                frames, config.clip_length, model.tokens_chunk_size)
    vae.spec.check_clip(ClipSettings(frames=39, height=64, width=96))
    with pytest.raises(ConfigError, match=r"minimax-h3 VAE, which needs 17k\+5->5k\+2 frames; nearest valid: 22 or "
                                          r"39"):
        vae.spec.check_clip(ClipSettings(frames=33, height=64, width=96))
    # The class itself gives these shapes: 5 -> 2, 22 -> 7 latent frames, and one frame -> one.
    clip = np.zeros((1, 22, 32, 32, 3), np.uint8)
    for n in (1, 5, 22):
        mean, _ = vae.encode(clip[:, :n])
        assert mean.shape[2] == vae.spec.latent_shape(n, 32, 32)[1] == {1: 1, 5: 2, 22: 7}[n]


def test_the_rule_survives_the_manifest_and_old_manifests_keep_theirs(vae):
    d = vae.spec.to_dict()
    assert d["frame_rule"] == "17k+5->5k+2" and "frame_mapping" not in d
    assert LatentSpec.from_dict(json.loads(json.dumps(d))) == vae.spec
    old = {"family": "cogvideox", "channels": 16, "temporal_compression": 4, "spatial_compression": 8,
           "scaling_factor": 1.15, "frame_rule": "4k+1"}
    spec = LatentSpec.from_dict(old)
    assert spec.frame_mapping is None and spec.latent_shape(49, 480, 720) == (16, 13, 60, 90)
    assert LatentSpec.from_dict({k: v for k, v in old.items() if k != "frame_rule"}) == spec
    from latentcache.format.checks import spec_problems

    assert spec_problems({**old, "frame_rule": "4k+1->"}) == [
        "latent_spec.frame rule '4k+1->' is not 'Ak+B' (such as 4k+1) or 'Ak+B->Ck+D' (such as 17k+5->5k+2) with "
        "B, D >= 1"]


def test_pixels_are_imagenet_normalised_as_the_pipeline_does(vae, frames):
    """The family record's convention is the pipeline's, and latentcache's encode of uint8 frames is diffusers'
    encode of the pipeline's pixels, bit for bit."""
    pixels = FAMILIES["minimax-h3"].pixels
    assert pixels.mean == MiniMaxH3ModularPipeline.pixel_mean.fget(None)
    assert pixels.std == MiniMaxH3ModularPipeline.pixel_std.fget(None)
    clip = np.ascontiguousarray(frames[:, :5, :, :96])
    mean, logvar = vae.encode(clip)
    with torch.no_grad():
        posterior = vae.model.encode(_pipeline_pixels(clip)).latent_dist
    assert torch.equal(mean, posterior.mean) and torch.equal(logvar, posterior.logvar)
    minus_one_to_one = torch.from_numpy(clip).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    with torch.no_grad():  # what every other family's [-1, 1] would give differs
        assert not torch.allclose(vae.model.encode(minus_one_to_one).latent_dist.mean, mean)


@pytest.mark.slow
def test_tiling_is_on_as_released_and_part_of_the_latents(frames):
    """Without --tiling latentcache keeps the class's released tiling (256-pixel tiles): on a 272-wide clip its
    latents are diffusers' default encode, which differs from an untiled one; an out-of-memory retry's smaller tiles
    are undone afterwards."""
    vae = load_vae(TINY, "cpu")
    clip = np.ascontiguousarray(frames[:, :5])
    released = diffusers.AutoencoderKLMiniMaxH3(**FAMILIES["minimax-h3"].tiny_config)
    released.load_state_dict(vae.model.state_dict())
    assert released.use_tiling and vae.model.use_tiling
    mean, _ = vae.encode(clip)
    with torch.no_grad():
        tiled = released.encode(_pipeline_pixels(clip)).latent_dist.mean
        released.disable_tiling()
        untiled = released.encode(_pipeline_pixels(clip)).latent_dist.mean
    assert torch.equal(mean, tiled) and not torch.allclose(tiled, untiled, atol=1e-3)
    vae.configure(TilingSettings(tile_height=64, tile_width=64, overlap=0.25), None)
    assert (vae.model.tile_sample_min_width, vae.model.tile_sample_min_overlap_width) == (64, 16)
    smaller, _ = vae.encode(clip)
    assert smaller.shape == mean.shape and not torch.equal(smaller, mean)
    vae.configure(None, None)
    assert (vae.model.use_tiling, vae.model.tile_sample_min_width, vae.model.tile_sample_min_overlap_width) == (
        True, 256, 64)
    assert torch.equal(vae.encode(clip)[0], mean)
    with pytest.raises(ConfigError, match="overlaps 8 pixels, not a multiple of the spatial compression 16"):
        vae.configure(TilingSettings(tile_height=32, tile_width=32, overlap=0.25), None)


def test_the_encoder_stays_fp32_in_a_half_precision_run(frames):
    """`_keep_in_fp32_modules` (the encoder, quant_conv, norms) stay fp32 under --dtype bf16, as diffusers'
    from_pretrained(torch_dtype=bf16) keeps them: the latents are the fp32 run's, rounded once to bf16."""
    full = load_vae(TINY, "cpu")
    half = load_vae(VAESettings(source=TINY.source, family=TINY.family, subfolder=None, dtype="bf16"), "cpu")
    assert {p.dtype for p in half.model.encoder.parameters()} == {torch.float32}
    assert half.model.quant_conv.weight.dtype == torch.float32
    assert half.model.post_quant_conv.weight.dtype == torch.bfloat16  # not pinned: cast as asked
    clip = np.ascontiguousarray(frames[:, :5, :, :96])
    mean, _ = half.encode(clip)
    assert mean.dtype == torch.bfloat16
    assert torch.equal(mean, full.encode(clip)[0].to(torch.bfloat16))


def test_preview_decodes_back_through_the_imagenet_convention(vae):
    """VideoVAE.decode is MiniMaxH3VideoDecodeStep's arithmetic: sample * pixel_std + pixel_mean, clamped to [0, 1]."""
    z = torch.randn(1, 24, 7, 2, 3, generator=torch.Generator().manual_seed(0))  # 22 frames
    video = vae.decode(z)
    with torch.no_grad():
        sample = vae.model.decode(z).sample
    mean = torch.tensor(MiniMaxH3ModularPipeline.pixel_mean.fget(None)).view(1, -1, 1, 1, 1)
    std = torch.tensor(MiniMaxH3ModularPipeline.pixel_std.fget(None)).view(1, -1, 1, 1, 1)
    expected = ((sample.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert video.shape == (1, 22, 32, 48, 3)
    assert np.array_equal(video, expected.numpy())
    # diffusers cannot decode the shortest clips (5 frames, 2 latent frames): a clear refusal, not a traceback.
    with pytest.raises(ConfigError, match=r"minimax-h3 VAE's decoder cannot decode latents of shape \(1, 24, 2"):
        vae.decode(z[:, :, :2])


def test_vae_dir_alone_is_detected_and_encoded(vae, tmp_path):
    vae.model.save_pretrained(tmp_path / "pipe" / "vae")
    assert family_for_source(str(tmp_path / "pipe")) == "minimax-h3"
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a", codec="h264", num_frames=72, height=96, width=128)
    out = tmp_path / "out"
    assert main(["encode", str(videos), "--out", str(out), "--vae", str(tmp_path / "pipe"), "--device", "cpu",
                 "--frames", "22", "--fps", "8", "--height", "64", "--width", "96"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vae"]["class_name"] == "AutoencoderKLMiniMaxH3"
    assert manifest["latent_spec"]["family"] == "minimax-h3" and manifest["latent_spec"]["frame_rule"] == (
        "17k+5->5k+2")
    assert main(["encode", str(videos), "--out", str(tmp_path / "bad"), "--vae", str(tmp_path / "pipe"), "--device",
                 "cpu", "--frames", "17", "--fps", "8", "--height", "64", "--width", "96"]) == 2
