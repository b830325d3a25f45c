"""The encode stage on real decoded video: exact latent shapes, dtypes, tiling rules, the non-finite guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentcache.encode.decoding.decode import decode_clip
from latentcache.encode.models.families import FAMILIES, tile_problem
from latentcache.encode.models.vae import load_vae
from latentcache.encode.settings import ClipSettings, TilingSettings, VAESettings
from latentcache.errors import ConfigError
from latentcache.format.spec import LatentSpec
from tests.conftest import TINY_CLIP

TINY_VAE_LTX = VAESettings(source="tiny-random-ltx", family="ltx", subfolder=None)


@pytest.fixture(scope="module")
def clip_frames(video_dir) -> np.ndarray:
    return decode_clip(video_dir / "a_h264.mp4", 0.0, TINY_CLIP).frames


@pytest.fixture(autouse=True)
def _untiled(tiny_vae):
    yield
    tiny_vae.configure(None, None)


@pytest.mark.parametrize("name", ["a_h264.mp4", "b_vp9.webm"])
def test_latent_shape_and_dtype_for_two_codecs(tiny_vae, video_dir, name):
    frames = decode_clip(video_dir / name, 0.0, TINY_CLIP).frames
    mean, logvar = tiny_vae.encode(frames[None])
    # CogVideoX: [16, (frames-1)/4+1, height/8, width/8]
    assert mean.shape == logvar.shape == (1, 16, 5, 8, 12)
    assert mean.dtype == logvar.dtype == torch.float32
    assert torch.isfinite(mean).all() and mean.std() > 0


@pytest.mark.slow
def test_49_frame_clip_has_13_latent_frames(tiny_vae, video_dir):
    clip = ClipSettings(frames=49, fps=24.0, height=64, width=96)
    frames = decode_clip(video_dir / "a_h264.mp4", 0.0, clip).frames
    mean, _ = tiny_vae.encode(frames[None])
    assert mean.shape == (1, 16, 13, 8, 12)


def test_invalid_tile_settings_are_refused_with_the_exact_alternatives(tiny_vae):
    # diffusers 0.42: tile 32 with its default width overlap 0.2 on a 49x64x96 clip gives latents 14 wide, not 12.
    problem = tile_problem(TilingSettings(tile_height=32, tile_width=32, overlap=0.2), 8)
    assert problem is not None and "steps 25 pixels" in problem and "0.25" in problem
    with pytest.raises(ConfigError, match="--tiling"):
        tiny_vae.configure(TilingSettings(tile_height=32, tile_width=32, overlap=0.2), None)
    with pytest.raises(ConfigError, match="multiple of 8"):
        tiny_vae.configure(TilingSettings(tile_height=36, tile_width=36, overlap=0.25), None)


@pytest.mark.parametrize(("tile", "overlap", "style", "exact"), [
    # overlap style (CogVideoX): the pixel step must equal the latents kept per tile times 8
    (32, 0.25, "overlap", True), (48, 1 / 3, "overlap", True), (64, 0.25, "overlap", True), (40, 0.2, "overlap", True),
    (32, 0.2, "overlap", False), (48, 0.25, "overlap", False), (64, 0.3, "overlap", False),
    # stride style (Wan, HunyuanVideo, LTX-Video): the stride must be a multiple of the spatial compression
    (32, 0.5, "stride", True), (64, 0.25, "stride", True), (32, 0.2, "stride", False), (40, 0.5, "stride", False),
])
def test_tile_problem_without_an_encode(tile, overlap, style, exact):
    """The arithmetic alone; the slow tier encodes with the accepted tiles and checks the shapes."""
    problem = tile_problem(TilingSettings(tile_height=tile, tile_width=tile, overlap=overlap), 8, style)
    assert (problem is None) == exact, problem


def test_auto_batch_size_is_a_deterministic_power_of_two_that_shrinks_with_the_clip(tiny_vae):
    small = tiny_vae.auto_batch_size(17, 64, 96)
    assert small == tiny_vae.auto_batch_size(17, 64, 96)  # a restart must batch the same way
    assert small & (small - 1) == 0 and 1 <= small <= 8  # CPU: at most CPU_BATCH_LIMIT
    big = tiny_vae.auto_batch_size(49, 480, 720)
    assert 1 <= big <= small
    huge = tiny_vae.auto_batch_size(129, 1440, 2560)
    assert huge == 1


@pytest.mark.slow
@pytest.mark.parametrize("tile,overlap", [(32, 0.25), (48, 1 / 3), (64, 0.25), (40, 0.2)])
def test_validated_tiles_give_exact_shapes(tiny_vae, clip_frames, tile, overlap):
    assert tile_problem(TilingSettings(tile_height=tile, tile_width=tile, overlap=overlap), 8) is None
    tiny_vae.configure(TilingSettings(tile_height=tile, tile_width=tile, overlap=overlap), None)
    mean, _ = tiny_vae.encode(clip_frames[None])
    assert mean.shape == (1, 16, 5, 8, 12)


@pytest.mark.slow
def test_tiled_encode_matches_untiled_within_tolerance(tiny_vae, video_dir):
    """Tolerance: cosine similarity >= 0.5 on the tiny *random* VAE.

    CogVideoX's encoder normalises with GroupNorm over each tile, so tiled and untiled latents differ by design;
    with random weights the difference is large (measured relative L2 0.58-0.94 at these sizes). The bound still
    catches misplaced or mis-blended tiles, which give cosine similarity near 0.
    """
    clip = ClipSettings(frames=17, fps=8.0, height=128, width=192)
    frames = decode_clip(video_dir / "c_h264.mp4", 0.0, clip).frames[None]
    full, _ = tiny_vae.encode(frames)
    tiny_vae.configure(TilingSettings(tile_height=128, tile_width=128, overlap=0.25), None)
    tiled, _ = tiny_vae.encode(frames)
    assert tiled.shape == full.shape == (1, 16, 5, 16, 24)
    cosine = torch.nn.functional.cosine_similarity(tiled.flatten(), full.flatten(), dim=0)
    assert cosine >= 0.5
    # A tile as large as the clip is no tiling at all: bit-identical.
    tiny_vae.configure(TilingSettings(tile_height=128, tile_width=192, overlap=0.25), None)
    same, _ = tiny_vae.encode(frames)
    assert torch.equal(same, full)


@pytest.mark.slow
def test_temporal_chunking_keeps_the_shape(tiny_vae, video_dir):
    clip = ClipSettings(frames=33, fps=12.0, height=64, width=96)
    frames = decode_clip(video_dir / "a_h264.mp4", 0.0, clip).frames[None]
    tiny_vae.configure(None, 16)
    mean, _ = tiny_vae.encode(frames)
    assert mean.shape == (1, 16, 9, 8, 12)
    with pytest.raises(ConfigError, match="frame-chunk"):
        tiny_vae.configure(None, 12)
    tiny_vae.model.num_sample_frames_batch_size = 8


def test_non_finite_latents_are_re_encoded_then_refused(tiny_vae, clip_frames):
    from latentcache.errors import InputError

    handle = tiny_vae.model.encoder.register_forward_hook(lambda m, i, o: (o[0] * float("nan"), o[1]))
    try:
        with pytest.raises(InputError, match="NaN/Inf"):
            tiny_vae.encode(clip_frames[None], sources=["clip.mp4"])
    finally:
        handle.remove()


@pytest.mark.parametrize("frames,nearest", [(48, "45 or 49"), (50, "49 or 53"), (16, "13 or 17")])
def test_frame_rule_offers_nearest_valid_counts(frames, nearest):
    spec = LatentSpec(family="cogvideox", channels=16, temporal_compression=4, spatial_compression=8)
    with pytest.raises(ConfigError, match=nearest):
        spec.check_clip(ClipSettings(frames=frames, height=480, width=720))


def test_normalisation_round_trips_and_follows_the_config():
    z = torch.randn(16, 5, 8, 12)
    scaled = LatentSpec(family="cogvideox", channels=16, temporal_compression=4, spatial_compression=8,
                        scaling_factor=0.7)
    assert torch.allclose(scaled.normalize(z), z * 0.7)
    # CogVideoX 1.5's invert_scale_latents applies to the I2V conditioning image only: video latents still get *sf
    # (CogVideoXPipeline.decode_latents divides by the scaling factor whatever the flag says).
    inverted = LatentSpec(family="cogvideox", channels=16, temporal_compression=4, spatial_compression=8,
                          scaling_factor=0.7, invert_scale_latents=True)
    assert torch.allclose(inverted.normalize(z), z * 0.7)
    per_channel = LatentSpec(family="wan", channels=16, temporal_compression=4, spatial_compression=8,
                             latents_mean=tuple(range(16)), latents_std=tuple(float(i + 1) for i in range(16)))
    assert torch.allclose(per_channel.normalize(z)[3], (z[3] - 3) / 4)
    for spec in (scaled, inverted, per_channel):
        assert torch.allclose(spec.denormalize(spec.normalize(z)), z, atol=1e-5)


GEOMETRY = ("family", "channels", "temporal_compression", "spatial_compression", "frame_rule")
# Per family, a config with the fields the geometry comes from set away from the tiny config's and the class's
# defaults (a Wan 2.2 VAE, fewer down blocks, other expansions, a MiniMax-H3 of 9-frame chunks...).
GEOMETRY_VARIANTS = {
    "cogvideox": dict(block_out_channels=(16, 16, 32), down_block_types=("CogVideoXDownBlock3D",) * 3,
                      up_block_types=("CogVideoXUpBlock3D",) * 3),
    "wan": dict(z_dim=48, is_residual=True, patch_size=2, scale_factor_spatial=16, in_channels=12, out_channels=12,
                latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
    "hunyuanvideo": dict(block_out_channels=(8, 8, 16, 16, 16), down_block_types=("HunyuanVideoDownBlock3D",) * 5,
                         up_block_types=("HunyuanVideoUpBlock3D",) * 5, spatial_compression_ratio=16),
    "ltx": dict(spatio_temporal_scaling=(True, True, False, False), patch_size_t=2),
    "mochi": dict(temporal_expansions=(1, 2, 2)),
    "hunyuanvideo15": dict(block_out_channels=(16, 16, 32, 64), spatial_compression_ratio=8),
    "ltx2": dict(spatial_compression_ratio=None, temporal_compression_ratio=None),
    "minimax-h3": dict(clip_length=9, token_drop=1),
}


def _geometry(spec: LatentSpec) -> dict:
    d = spec.to_dict()
    return {k: d[k] for k in GEOMETRY}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_geometry_read_from_the_config_alone_is_the_loaded_vaes(family: str, tmp_path) -> None:
    """The early check (before diffusers is imported or the weights load) reads channels, compressions and frame
    rule from the config and the class's defaults: they must be what the built model says, or it would refuse
    settings the VAE can encode, or let through ones it cannot. It guesses no normalisation."""
    import diffusers

    from latentcache.encode.models.vae_source import peek_spec

    settings = VAESettings(source=f"tiny-random-{family}", family=family, subfolder=None, dtype="fp32")
    early, vae = peek_spec(settings), load_vae(settings, "cpu")
    assert early is not None and _geometry(early) == _geometry(vae.spec)
    assert (early.scaling_factor, early.shift_factor, early.latents_mean, early.latents_std) == (None,) * 4
    # A saved config (every field written out, as a hub repo's is), and one with the geometry's fields changed.
    vae.model.save_config(tmp_path / "saved")
    model = getattr(diffusers, FAMILIES[family].class_name)(**{**FAMILIES[family].tiny_config,
                                                               **GEOMETRY_VARIANTS[family]})
    model.save_config(tmp_path / "variant")
    for folder, expected in (("saved", vae.spec), ("variant", FAMILIES[family].spec_from_model(model))):
        early = peek_spec(VAESettings(source=str(tmp_path / folder), family=family, subfolder=None))
        assert early is not None and _geometry(early) == _geometry(expected), folder
    assert _geometry(expected) != _geometry(vae.spec)  # the variant is another geometry


@pytest.mark.slow
def test_a_frame_count_the_vae_refuses_is_refused_before_diffusers_is_imported(tmp_path, video_dir) -> None:
    """`--frames 16` took ~10 s: the frame rule was known only once diffusers was imported. In a fresh process,
    the refusal now comes with diffusers never imported, for a built-in name and for a local VAE folder, and
    leaves no OUT behind."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    vae_dir = tmp_path / "vae"
    load_vae(TINY_VAE_LTX, "cpu").model.save_config(vae_dir)
    script = """
import json, sys
from latentcache.cli import main
codes = [main(["encode", sys.argv[1], "--out", sys.argv[2], "--vae", vae, "--frames", frames, "--height", "64",
               "--width", "96", "--device", "cpu"]) for vae, frames in (("tiny-random-cogvideox", "16"),
                                                                       (sys.argv[3], "21"))]
print(json.dumps({"codes": codes, "diffusers": sorted(m for m in sys.modules if m.split(".")[0] == "diffusers")}))
"""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", script, str(video_dir), str(out), str(vae_dir)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2, 2], "diffusers": []}, done.stderr
    assert "--frames 16 does not fit the cogvideox VAE, which needs 4k+1 frames; nearest valid: 13 or 17" in done.stderr
    assert "--frames 21 does not fit the ltx VAE, which needs 8k+1 frames; nearest valid: 17 or 25" in done.stderr
    assert not out.exists()


def test_a_vae_typo_or_an_unreachable_hub_is_refused_in_seconds(video_dir, tmp_path, monkeypatch, capsys):
    """`--vae tiny-cogvideox` offline cost a minute of hub retries: a near miss of a built-in name is named, a hub
    id with HF_HUB_OFFLINE=1 or an unreachable hub (a closed local port as the endpoint) fails at once, and none of
    them leaves an output folder behind."""
    import time

    import huggingface_hub.constants as constants

    from latentcache.cli import main

    out = tmp_path / "out"

    def encode(vae: str) -> tuple[int, str, float]:
        started = time.monotonic()
        code = main(["encode", str(video_dir), "--out", str(out), "--vae", vae, "--device", "cpu"])
        return code, capsys.readouterr().err, time.monotonic() - started

    code, err, _ = encode("tiny-cogvideox")
    assert code == 2 and "did you mean tiny-random-cogvideox?" in err
    code, err, _ = encode("./no/such/vae")
    assert code == 2 and "no such directory, and not a hub id" in err
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err, seconds = encode("someone/SomeVideoVAE")
    assert code == 2 and "HF_HUB_OFFLINE=1 forbids downloading it" in err and seconds < 20
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    code, err, seconds = encode("someone/SomeVideoVAE")
    assert code == 2 and "the hub cannot be reached from here" in err and seconds < 20, err
    assert not out.exists()
