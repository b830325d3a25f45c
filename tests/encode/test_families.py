"""Every VAE family end to end: a real video -> `latentcache encode` with tiny-random-<family> -> a real tar ->
LatentShardDataset -> one forward pass of a tiny transformer of that family; plus each family's own rules
(normalisation against its diffusers pipeline, frame rule, tiling, loading from a directory)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import fast_cases
from safetensors.torch import load as load_safetensors

from latentcache.cli import main
from latentcache.encode.models.families import FAMILIES, tile_problem
from latentcache.encode.models.vae import load_vae
from latentcache.encode.models.vae_source import family_for_source
from latentcache.encode.settings import ClipSettings, TilingSettings, VAESettings
from latentcache.errors import ConfigError, LatentMismatchError
from latentcache.tools.synthetic import write_video
from latentcache.train.dataset import LatentShardDataset

FAMILY_NAMES = sorted(FAMILIES)
# 17 frames fit 4k+1 and LTX's 8k+1 (Mochi's 6k+1: 13); 64x96 fits 8x, 16x and LTX's 32x spatial compression.
CLIP = ["--frames", "17", "--fps", "8", "--height", "64", "--width", "96"]
FRAMES = {"mochi": 13, "minimax-h3": 22}  # else 17; MiniMax-H3 takes 17k+5
EXPECTED = {  # channels, latent frames, height, width of a 17x64x96 clip (Mochi: 13x64x96)
    "cogvideox": (16, 5, 8, 12),
    "wan": (16, 5, 8, 12),
    "hunyuanvideo": (16, 5, 8, 12),
    "ltx": (128, 3, 2, 3),
    "mochi": (12, 3, 8, 12),
    "hunyuanvideo15": (32, 5, 4, 6),
    "ltx2": (128, 3, 2, 3),
    "minimax-h3": (24, 7, 4, 6),  # 22 = 17 + 5 frames -> 5 + 2 latent frames
}
COMPRESSION = {  # temporal, spatial, frame rule
    "ltx": (8, 32, "8k+1"), "ltx2": (8, 32, "8k+1"), "mochi": (6, 8, "6k+1"), "hunyuanvideo15": (4, 16, "4k+1"),
    "minimax-h3": (4, 16, "17k+5->5k+2"),
}
PER_CHANNEL = ("wan", "ltx", "mochi", "ltx2", "minimax-h3")  # normalised by per-channel mean/std


def clip_args(family: str) -> list[str]:
    return ["--frames", str(FRAMES.get(family, 17)), *CLIP[2:]]
CAPTION = "a red square crosses the frame"


@pytest.fixture(scope="module")
def family_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("family_videos")
    write_video(d / "walk", codec="h264", num_frames=72, height=96, width=128)  # 3 s: 22 frames at 8 fps
    (d / "walk.txt").write_text(CAPTION, encoding="utf-8")
    return d


@pytest.fixture(scope="module", params=fast_cases(FAMILY_NAMES, fast=["cogvideox", "wan"]))
def encoded(request: pytest.FixtureRequest, family_videos: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[str, Path]:
    """`latentcache encode --vae tiny-random-<family>` (no --family: the name says which) of one captioned video."""
    family = request.param
    out = tmp_path_factory.mktemp(f"encoded_{family}") / "out"
    code = main(["encode", str(family_videos), "--out", str(out), "--vae", f"tiny-random-{family}",
                 "--device", "cpu", *clip_args(family)])
    assert code == 0
    return family, out


def _only_sample(out: Path) -> dict[str, bytes]:
    manifest = json.loads((out / "manifest.json").read_text())
    (shard,) = manifest["shards"]
    with tarfile.open(out / shard["path"]) as tar:
        return {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}


def test_manifest_records_the_family_spec(encoded):
    family, out = encoded
    manifest = json.loads((out / "manifest.json").read_text())
    spec = manifest["latent_spec"]
    channels = EXPECTED[family][0]
    assert spec["family"] == family and spec["channels"] == channels
    assert manifest["vae"]["class_name"] == FAMILIES[family].class_name
    assert manifest["vae"]["random_weights"] is True
    assert (spec["temporal_compression"], spec["spatial_compression"], spec["frame_rule"]) == COMPRESSION.get(
        family, (4, 8, "4k+1"))
    per_channel = family in PER_CHANNEL
    assert (spec["latents_mean"] is not None) == per_channel
    if per_channel:
        assert len(spec["latents_mean"]) == len(spec["latents_std"]) == channels
    if family == "wan":
        assert spec["scaling_factor"] is None  # Wan normalises by mean/std alone


def test_tar_holds_raw_posterior_and_caption(encoded):
    family, out = encoded
    sample = _only_sample(out)
    assert set(sample) == {"json", "latents.safetensors", "txt"}
    assert sample["txt"].decode() == CAPTION
    tensors = load_safetensors(sample["latents.safetensors"])
    assert tuple(tensors["mean"].shape) == EXPECTED[family]
    assert tensors["logvar"].shape == tensors["mean"].shape
    assert torch.isfinite(tensors["mean"]).all()


def test_dataset_applies_the_family_normalisation_once(encoded):
    family, out = encoded
    raw = load_safetensors(_only_sample(out)["latents.safetensors"])["mean"].float()
    plain = LatentShardDataset(out, sample_posterior=False)
    (item,) = list(plain)
    assert item["caption"] == CAPTION and tuple(item["latents"].shape) == EXPECTED[family]
    torch.testing.assert_close(item["latents"], plain.spec.normalize(raw))
    (unnormalised,) = list(LatentShardDataset(out, sample_posterior=False, normalize=False))
    torch.testing.assert_close(unnormalised["latents"], raw)
    # The tiny LTX VAEs' buffers are mean 0, std 1, scaling 1: normalising is the identity.
    if family not in ("ltx", "ltx2"):
        assert not torch.allclose(item["latents"], raw)


def tiny_transformer(family: str, in_channels: int) -> torch.nn.Module:
    """The smallest transformer of each family diffusers builds; text width 16."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if family == "cogvideox":
            from latentcache.tools.demo import tiny_transformer as cog

            return cog(5, 8, 12, in_channels=in_channels)
        if family == "wan":
            return diffusers.WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
                out_channels=in_channels, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
        if family == "hunyuanvideo":
            return diffusers.HunyuanVideoTransformer3DModel(
                in_channels=in_channels, out_channels=in_channels, num_attention_heads=2, attention_head_dim=8,
                num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                guidance_embeds=False, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
        if family == "mochi":
            return diffusers.MochiTransformer3DModel(
                patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1, pooled_projection_dim=16,
                in_channels=in_channels, text_embed_dim=16, time_embed_dim=16, max_sequence_length=8)
        if family == "hunyuanvideo15":
            # Its pipeline feeds [latents, condition latents, mask]: 2C+1 in, C out, also for text-to-video.
            return diffusers.HunyuanVideo15Transformer3DModel(
                in_channels=2 * in_channels + 1, out_channels=in_channels, num_attention_heads=2,
                attention_head_dim=8, num_layers=1, num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=16,
                image_embed_dim=16, rope_axes_dim=(2, 2, 4))
        if family == "minimax-h3":
            return diffusers.MiniMaxH3Transformer3DModel(
                num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=1, num_refiner_layers=1,
                ffn_dim=64, in_channels=in_channels, audio_in_channels=8, text_dim=16, freq_dim=16,
                time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2)
        if family == "ltx2":
            return diffusers.LTX2VideoTransformer3DModel(
                in_channels=in_channels, out_channels=in_channels, num_attention_heads=2, attention_head_dim=8,
                cross_attention_dim=16, num_layers=1, caption_channels=16, audio_in_channels=8,
                audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=8,
                audio_cross_attention_dim=16)
        return diffusers.LTXVideoTransformer3DModel(
            in_channels=in_channels, out_channels=in_channels, num_attention_heads=2, attention_head_dim=8,
            cross_attention_dim=16, num_layers=1, caption_channels=16)


def forward(family: str, model: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """One denoising step the way each family's pipeline calls its transformer; latents [B, C, T, H, W]."""
    b = latents.shape[0]
    t = torch.full((b,), 500)
    with torch.no_grad():
        if family == "cogvideox":
            text = torch.zeros(b, 8, 32)
            return model(hidden_states=latents.permute(0, 2, 1, 3, 4), encoder_hidden_states=text, timestep=t).sample
        text, mask = torch.zeros(b, 8, 16), torch.ones(b, 8)
        if family == "wan":
            return model(hidden_states=latents, timestep=t, encoder_hidden_states=text).sample
        if family == "hunyuanvideo":
            return model(hidden_states=latents, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask,
                         pooled_projections=torch.zeros(b, 8)).sample
        if family == "mochi":
            return model(hidden_states=latents, encoder_hidden_states=text, timestep=t,
                         encoder_attention_mask=mask).sample
        if family == "hunyuanvideo15":
            # HunyuanVideo15Pipeline text-to-video: cat([latents, zeros like latents, a zero mask channel]).
            cond = torch.zeros_like(latents)
            model_input = torch.cat([latents, cond, cond[:, :1]], dim=1)
            return model(hidden_states=model_input, timestep=t.float(), encoder_hidden_states=text,
                         encoder_attention_mask=mask, encoder_hidden_states_2=text,
                         encoder_attention_mask_2=mask, image_embeds=torch.zeros(b, 4, 16)).sample
        if family == "minimax-h3":
            return _minimax_h3_forward(model, latents, text)
        _, _, frames, height, width = latents.shape
        packed = diffusers.LTXPipeline._pack_latents(latents, 1, 1)  # LTX takes [B, tokens, C]
        return model(hidden_states=packed, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                     num_frames=frames, height=height, width=width).sample


def _minimax_h3_forward(model: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """MiniMax-H3's one packed sequence [text | audio | video], laid out by its pipeline's own layout step and
    patchified by its own helper; no audio latents (latentcache has no audio VAE), so one silent audio row."""
    from diffusers.modular_pipelines.minimax_h3.before_denoise import (
        MiniMaxH3PrepareLayoutStep,
        patchify_video_latents,
    )
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import MINIMAX_H3_AUDIO_TAG, MINIMAX_H3_VIDEO_TAG

    b, _, frames, height, width = latents.shape
    patch = tuple(model.config.patch_size)
    position_ids, tags, video_idx, audio_idx, text_idx, _, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
        torch.ones(text.shape[1], dtype=torch.long), frames, height, width, 1, patch, 1, MINIMAX_H3_AUDIO_TAG,
        MINIMAX_H3_VIDEO_TAG)
    rows = patchify_video_latents(latents, patch).view(b, -1, latents.shape[1] * int(np.prod(patch)))
    return model(hidden_states=rows, audio_hidden_states=torch.zeros(b, 1, 8), encoder_hidden_states=text,
                 timestep=torch.tensor([0.5]), timestep_indices=torch.zeros(len(tags), dtype=torch.long),
                 token_tags=tags, position_ids=position_ids, video_indices=video_idx, audio_indices=audio_idx,
                 text_indices=text_idx).sample


def test_for_transformer_feeds_a_tiny_transformer_of_the_family(encoded):
    family, out = encoded
    channels = EXPECTED[family][0]
    model = tiny_transformer(family, channels).eval()
    dataset = LatentShardDataset.for_transformer(model, out, batch_size=1)
    batch = next(iter(dataset))
    assert tuple(batch["latents"].shape) == (1, *EXPECTED[family])
    if family == "ltx2":
        return  # the guard read its config; a forward pass needs LTX-2's audio stream too
    pred = forward(family, model, batch["latents"])
    assert torch.isfinite(pred).all()
    assert pred.numel() == batch["latents"].numel()


def test_for_transformer_refuses_another_familys_channels(encoded):
    family, out = encoded
    wrong = 128 if EXPECTED[family][0] == 16 else 16
    with pytest.raises(LatentMismatchError) as caught:
        LatentShardDataset.for_transformer({"in_channels": wrong}, out)
    assert f"{EXPECTED[family][0]} channels" in str(caught.value) and f"in_channels={wrong}" in str(caught.value)


# ------------------------------------------------------------------------ normalisation vs the pipelines


def _random_latents(channels: int) -> torch.Tensor:
    return torch.randn(2, channels, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_normalize_matches_the_diffusers_pipeline_formula(family):
    """The formulas below are copied from each pipeline's source (diffusers 0.42), with its config values."""
    vae = load_vae(VAESettings(source=f"tiny-random-{family}", family=family, subfolder=None), "cpu")
    model, spec = vae.model, vae.spec
    if family in ("ltx", "ltx2"):
        # Real LTX checkpoints carry non-trivial per-channel buffers; give the tiny one some.
        gen = torch.Generator().manual_seed(1)
        model.latents_mean.copy_(torch.randn(128, generator=gen))
        model.latents_std.copy_(torch.rand(128, generator=gen) + 0.5)
        spec = FAMILIES[family].spec_from_model(model)
    z = _random_latents(spec.channels)
    if family == "cogvideox":
        # CogVideoXImageToVideoPipeline.prepare_latents / decode_latents.
        expected = model.config.scaling_factor * z
        decoded = 1 / model.config.scaling_factor * expected
    elif family == "hunyuanvideo15":
        # HunyuanVideo15ImageToVideoPipeline._get_image_latents / HunyuanVideo15Pipeline.__call__ before vae.decode.
        expected = z * model.config.scaling_factor
        decoded = expected.to(model.dtype) / model.config.scaling_factor
    elif family == "mochi":
        # MochiPipeline.__call__ before vae.decode: latents * latents_std / scaling_factor + latents_mean, inverted.
        mean = torch.tensor(model.config.latents_mean).view(1, 12, 1, 1, 1)
        std = torch.tensor(model.config.latents_std).view(1, 12, 1, 1, 1)
        expected = (z - mean) * model.config.scaling_factor / std
        decoded = expected * std / model.config.scaling_factor + mean
    elif family == "ltx2":
        expected = diffusers.LTX2Pipeline._normalize_latents(z, model.latents_mean, model.latents_std,
                                                               model.config.scaling_factor)
        decoded = diffusers.LTX2Pipeline._denormalize_latents(expected, model.latents_mean, model.latents_std,
                                                                model.config.scaling_factor)
    elif family == "minimax-h3":
        # MiniMax-H3's encode_vae_condition / MiniMaxH3VideoDecodeStep: (z - latents_mean) / latents_std, inverted.
        mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
        expected = (z - mean) / std
        decoded = expected * std + mean
    elif family == "hunyuanvideo":
        # HunyuanVideoImageToVideoPipeline.prepare_latents / HunyuanVideoPipeline.__call__ before vae.decode.
        expected = z * model.config.scaling_factor
        decoded = expected / model.config.scaling_factor
    elif family == "wan":
        # WanImageToVideoPipeline.prepare_latents / WanPipeline.__call__ before vae.decode.
        mean = torch.tensor(model.config.latents_mean).view(1, model.config.z_dim, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(model.config.latents_std).view(1, model.config.z_dim, 1, 1, 1)
        expected = (z - mean) * inv_std
        decoded = expected / inv_std + mean
    else:
        expected = diffusers.LTXPipeline._normalize_latents(z, model.latents_mean, model.latents_std,
                                                              model.config.scaling_factor)
        decoded = diffusers.LTXPipeline._denormalize_latents(expected, model.latents_mean, model.latents_std,
                                                               model.config.scaling_factor)
    torch.testing.assert_close(spec.normalize(z), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(spec.denormalize(expected), decoded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spec.denormalize(spec.normalize(z)), z, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spec.normalize(z), z)


def test_wan_2_2_config_gives_48_channels_and_16x_spatial():
    """Wan 2.2's VAE patchifies by 2 and compresses 16x; the spec reads that from the config, not a constant."""
    from latentcache.encode.models.vae import VideoVAE

    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        is_residual=True, patch_size=2, scale_factor_spatial=16, in_channels=12, out_channels=12,
        latents_mean=[0.0] * 48, latents_std=[1.0] * 48).eval()
    spec = FAMILIES["wan"].spec_from_model(model)
    assert (spec.channels, spec.temporal_compression, spec.spatial_compression) == (48, 4, 16)
    vae = VideoVAE(model, spec, None, torch.device("cpu"), torch.float32)
    frames = np.random.default_rng(0).integers(0, 256, (1, 9, 32, 64, 3), dtype=np.uint8)
    mean, _ = vae.encode(frames)
    assert tuple(mean.shape) == (1, 48, 3, 2, 4)
    vae.configure(TilingSettings(tile_height=32, tile_width=32, overlap=0.5), None)  # patchified tiles of 16
    tiled, _ = vae.encode(frames)
    assert tuple(tiled.shape) == (1, 48, 3, 2, 4) and not torch.equal(tiled, mean)


# ------------------------------------------------------------------------ frame rule, tiling, chunking


def test_ltx_frame_and_size_rule_is_8k_plus_1_and_32():
    vae = load_vae(VAESettings(source="tiny-random-ltx", family="ltx", subfolder=None), "cpu")
    vae.spec.check_clip(ClipSettings(frames=25, height=64, width=96))
    with pytest.raises(ConfigError, match=r"ltx VAE, which needs 8k\+1 frames; nearest valid: 17 or 25"):
        vae.spec.check_clip(ClipSettings(frames=21, height=64, width=96))
    with pytest.raises(ConfigError, match="--width 80 .* spatial compression 32; nearest valid: 64 or 96"):
        vae.spec.check_clip(ClipSettings(frames=17, height=64, width=80))


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo"])
def test_wan_and_hunyuan_take_4k_plus_1(family):
    vae = load_vae(VAESettings(source=f"tiny-random-{family}", family=family, subfolder=None), "cpu")
    vae.spec.check_clip(ClipSettings(frames=13, height=64, width=96))
    with pytest.raises(ConfigError, match=rf"{family} VAE, which needs 4k\+1 frames; nearest valid: 13 or 17"):
        vae.spec.check_clip(ClipSettings(frames=15, height=64, width=96))


@pytest.mark.parametrize(("family", "tile", "overlap"), [
    ("wan", 32, 0.25), ("hunyuanvideo", 32, 0.5), ("ltx", 64, 0.5),
])
@pytest.mark.slow
def test_stride_tiling_gives_exact_shapes(family, tile, overlap):
    vae = load_vae(VAESettings(source=f"tiny-random-{family}", family=family, subfolder=None), "cpu")
    frames = np.random.default_rng(0).integers(0, 256, (1, 9, 64, 96, 3), dtype=np.uint8)
    untiled, _ = vae.encode(frames)
    vae.configure(TilingSettings(tile_height=tile, tile_width=tile, overlap=overlap), None)
    assert vae.model.use_tiling and vae.model.tile_sample_stride_width == int(tile * (1 - overlap))
    tiled, _ = vae.encode(frames)
    assert tiled.shape == untiled.shape == (1, *vae.spec.latent_shape(9, 64, 96))
    assert torch.isfinite(tiled).all()
    assert not torch.equal(tiled, untiled)  # the tiles really were encoded separately


def test_stride_tiling_refuses_a_stride_off_the_latent_grid():
    vae = load_vae(VAESettings(source="tiny-random-wan", family="wan", subfolder=None), "cpu")
    with pytest.raises(ConfigError, match="steps 25 pixels but that is not a multiple of the spatial compression 8"):
        vae.configure(TilingSettings(tile_height=32, tile_width=32, overlap=0.2), None)
    # The same tile is wrong for CogVideoX for another reason: its per-tile latent count.
    assert "keeps 4 latents" in tile_problem(TilingSettings(tile_height=32, tile_width=32, overlap=0.2), 8)
    assert tile_problem(TilingSettings(tile_height=64, tile_width=64, overlap=0.5), 32, "stride") is None


def test_a_new_family_is_one_entry_with_its_tiling_and_text_recipe(monkeypatch, tiny_vae):
    """What differs between families is read from the family's FAMILIES entry (tiling adapter) and its
    TEXT_FAMILIES entry (prompt recipe) only."""
    import dataclasses

    from latentcache.encode.models.families import TilingAdapter
    from latentcache.encode.models.text import text_family
    from latentcache.encode.models.text_families import TEXT_FAMILIES
    from latentcache.encode.models.vae import VideoVAE

    seen = []
    custom = dataclasses.replace(FAMILIES["cogvideox"], name="custom",
                                 tiling=TilingAdapter("stride", lambda model, tiling: seen.append(tiling)))
    monkeypatch.setitem(FAMILIES, "custom", custom)
    vae = VideoVAE(tiny_vae.model, dataclasses.replace(tiny_vae.spec, family="custom"), tiny_vae.identity,
                   tiny_vae.device, tiny_vae.dtype)
    tiling = TilingSettings(tile_height=32, tile_width=32, overlap=0.25)  # exact for a stride, not for an overlap
    vae.configure(tiling, None)
    assert seen == [tiling]
    with pytest.raises(ConfigError, match="--family custom: latentcache has no prompt recipe for it yet"):
        text_family("custom")
    monkeypatch.setitem(TEXT_FAMILIES, "custom", TEXT_FAMILIES["wan"])
    assert text_family("custom") is TEXT_FAMILIES["wan"]
    assert {f: FAMILIES[f].tiling.style for f in FAMILY_NAMES} == {
        "cogvideox": "overlap", "hunyuanvideo": "stride", "hunyuanvideo15": "overlap", "ltx": "stride",
        "ltx2": "stride", "minimax-h3": "widened", "mochi": "stride", "wan": "stride"}
    # Every family has a prompt recipe; MiniMax-H3's pipeline takes each prompt whole (no max length).
    assert {f: TEXT_FAMILIES[f].max_length for f in FAMILY_NAMES} == {
        "cogvideox": 226, "hunyuanvideo": 256, "hunyuanvideo15": 1000, "ltx": 128, "ltx2": 1024,
        "minimax-h3": None, "mochi": 256, "wan": 512}


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f != "cogvideox"])
def test_frame_chunk_is_cogvideox_only(family):
    vae = load_vae(VAESettings(source=f"tiny-random-{family}", family=family, subfolder=None), "cpu")
    with pytest.raises(ConfigError, match=f"--frame-chunk 16: the {family} VAE .* has no frames-per-step"):
        vae.configure(None, 16)


# ------------------------------------------------------------------------ loading


def test_family_is_inferred_from_a_tiny_name_only():
    assert family_for_source("tiny-random-ltx") == "ltx"
    assert family_for_source("tiny-random-ltx", "wan") == "wan"
    assert family_for_source("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == "cogvideox"
    with pytest.raises(ConfigError, match="pass --family wan"):
        load_vae(VAESettings(source="tiny-random-wan", family="cogvideox", subfolder=None), "cpu")


def test_local_pipeline_dir_loads_through_from_pretrained_and_refuses_the_wrong_family(tmp_path):
    tiny = load_vae(VAESettings(source="tiny-random-wan", family="wan", subfolder=None), "cpu")
    tiny.model.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = load_vae(VAESettings(source=str(tmp_path / "pipe"), family="wan", subfolder="vae"), "cpu")
    assert loaded.spec == tiny.spec and not loaded.identity.random_weights
    assert loaded.identity.subfolder == "vae"
    for a, b in zip(loaded.model.state_dict().values(), tiny.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # The VAE directory itself works too (no vae/ subfolder).
    assert load_vae(VAESettings(source=str(tmp_path / "pipe" / "vae"), family="wan"), "cpu").spec == tiny.spec
    with pytest.raises(ConfigError, match="found a AutoencoderKLWan.*expects AutoencoderKLCogVideoX; pass --family"):
        load_vae(VAESettings(source=str(tmp_path / "pipe"), family="cogvideox", subfolder="vae"), "cpu")


def test_ltx_statistics_are_read_in_fp32_whatever_the_encode_dtype(tmp_path):
    """LTX-Video keeps latents_mean/latents_std as buffers in its weights: the manifest's normalisation is read before
    the VAE is cast to the encode dtype, so --dtype bf16 does not round it (bf16 keeps 8 bits: up to 0.39%)."""
    tiny = load_vae(VAESettings(source="tiny-random-ltx", family="ltx", subfolder=None), "cpu")
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(128, generator=gen) * 0.3, torch.rand(128, generator=gen) + 0.5
    tiny.model.latents_mean.copy_(mean)
    tiny.model.latents_std.copy_(std)
    tiny.model.save_pretrained(tmp_path / "ltx")
    assert not torch.equal(std.bfloat16().float(), std)  # values bf16 would change
    for dtype in ("fp32", "bf16"):
        vae = load_vae(VAESettings(source=str(tmp_path / "ltx"), family="ltx", subfolder=None, dtype=dtype), "cpu")
        assert vae.model.latents_std.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        assert vae.spec.latents_mean == tuple(float(v) for v in mean)
        assert vae.spec.latents_std == tuple(float(v) for v in std)


def test_family_is_detected_from_the_vae_config_and_family_is_checked_against_it(tmp_path, video_dir):
    """`--vae WAN_DIR` needs no --family: the config's _class_name says Wan (a VAE dir, a pipeline dir's vae/)."""
    tiny = load_vae(VAESettings(source="tiny-random-wan", family="wan", subfolder=None), "cpu")
    tiny.model.save_pretrained(tmp_path / "wan_vae")
    tiny.model.save_pretrained(tmp_path / "pipe" / "vae")
    assert family_for_source(str(tmp_path / "wan_vae")) == "wan"
    assert family_for_source(str(tmp_path / "pipe")) == "wan"
    assert family_for_source(str(tmp_path / "pipe"), "wan") == "wan"
    with pytest.raises(ConfigError, match=r"--family cogvideox, but --vae .*pipe is AutoencoderKLWan .* --family wan"):
        family_for_source(str(tmp_path / "pipe"), "cogvideox")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(ConfigError, match="is a WanTransformer3DModel, not one of the supported VAEs"):
        family_for_source(str(tmp_path / "transformer"))
    out = tmp_path / "out"
    assert main(["encode", str(video_dir / "sub"), "--out", str(out), "--vae", str(tmp_path / "wan_vae"),
                 "--device", "cpu", *CLIP]) == 0
    assert json.loads((out / "manifest.json").read_text())["latent_spec"]["family"] == "wan"


def test_family_is_detected_from_a_hub_config_in_the_cache(tmp_path, monkeypatch):
    """A hub id whose config is in the Hugging Face cache (laid out as the hub client writes it); nothing is
    downloaded."""
    from huggingface_hub import constants

    snapshot = tmp_path / "models--Org--Wan-pipe" / "snapshots" / ("0" * 40)
    (snapshot / "vae").mkdir(parents=True)
    (snapshot / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    (tmp_path / "models--Org--Wan-pipe" / "refs").mkdir()
    (tmp_path / "models--Org--Wan-pipe" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # the cache HF_HUB_CACHE would point at
    assert family_for_source("Org/Wan-pipe") == "wan"
    assert family_for_source("Org/Not-cached") == "cogvideox"  # unknown here: the loader checks what it finds


# ------------------------------------------------------------------------ verify and preview


def test_verify_passes_with_per_channel_stats_of_the_family(encoded):
    from latentcache.tools.verify import verify

    family, out = encoded
    report = verify(out)
    assert report.ok, report.lines()
    assert (report.shards, report.samples) == (1, 1)
    means, stds = report.stats.mean_std()
    assert len(means) == len(stds) == EXPECTED[family][0]


def test_preview_decodes_every_family_next_to_its_source(encoded, tmp_path):
    import av

    from latentcache.tools.preview import preview

    family, out = encoded
    result = preview(out, tmp_path / "preview.mp4")
    assert result.with_source == [True]
    n = FRAMES.get(family, 17)
    assert result.frames == n and result.size == (2 * 96, 64)  # source | reconstruction
    with av.open(str(tmp_path / "preview.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == n and frames[0].shape == (64, 192, 3)


# ------------------------------------------------------------------------ Wan 2.2, HunyuanVideo 1.5 tiling, refusals


@pytest.fixture(scope="module")
def wan22_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan 2.2 TI2V-5B layout VAE (residual, patch 2, 48 channels, 16x spatial) saved as a pipeline's vae/,
    with per-channel statistics that are not the identity."""
    gen = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
            is_residual=True, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, in_channels=12,
            out_channels=12, latents_mean=(torch.randn(48, generator=gen) * 0.3).tolist(),
            latents_std=(torch.rand(48, generator=gen) + 0.5).tolist())
    root = tmp_path_factory.mktemp("wan22") / "pipe"
    model.save_pretrained(root / "vae")
    return root


def test_wan_2_2_ti2v_vae_end_to_end(wan22_vae_dir, family_videos, tmp_path):
    """Wan 2.2 TI2V-5B's 48-channel VAE: detected as wan from its config, encoded through the CLI, streamed with
    WanPipeline's normalisation, and fed to a 48-channel WanTransformer3DModel (patch 1x2x2, as TI2V-5B's)."""
    out = tmp_path / "out"
    assert main(["encode", str(family_videos), "--out", str(out), "--vae", str(wan22_vae_dir), "--device", "cpu",
                 *CLIP]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    spec = manifest["latent_spec"]
    assert (spec["family"], spec["channels"], spec["temporal_compression"], spec["spatial_compression"]) == (
        "wan", 48, 4, 16)
    config = json.loads((wan22_vae_dir / "vae" / "config.json").read_text())
    raw = load_safetensors(_only_sample(out)["latents.safetensors"])["mean"].float()
    assert tuple(raw.shape) == (48, 5, 4, 6)
    (item,) = list(LatentShardDataset(out, sample_posterior=False))
    # WanPipeline / WanImageToVideoPipeline: (z - latents_mean) * (1 / latents_std), from the VAE config.
    mean = torch.tensor(config["latents_mean"]).view(48, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(config["latents_std"]).view(48, 1, 1, 1)
    torch.testing.assert_close(item["latents"], (raw - mean) * inv_std, rtol=1e-5, atol=1e-5)
    model = tiny_transformer("wan", 48).eval()
    batch = next(iter(LatentShardDataset.for_transformer(model, out, batch_size=1)))
    pred = forward("wan", model, batch["latents"])
    assert pred.shape == batch["latents"].shape and torch.isfinite(pred).all()
    with pytest.raises(LatentMismatchError, match="in_channels=16, the latents have 48 channels"):
        LatentShardDataset.for_transformer({"in_channels": 16, "patch_size": [1, 2, 2]}, out)


def test_wan_2_2_ti2v_image_latents_are_refused_with_the_reason(wan22_vae_dir, family_videos, tmp_path, capsys):
    """TI2V-5B conditions by replacing the first latent frame (expand_timesteps), not Wan 2.1's frame-mask layout."""
    code = main(["encode", str(family_videos), "--out", str(tmp_path / "out"), "--vae", str(wan22_vae_dir),
                 "--device", "cpu", "--image-latents", *CLIP])
    assert code == 2
    assert "48-channel Wan VAE (Wan 2.2 TI2V-5B)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_hunyuanvideo15_tiling_blends_like_cogvideox():
    vae = load_vae(VAESettings(source="tiny-random-hunyuanvideo15", family="hunyuanvideo15", subfolder=None), "cpu")
    frames = np.random.default_rng(0).integers(0, 256, (1, 9, 64, 96, 3), dtype=np.uint8)
    untiled, _ = vae.encode(frames)
    vae.configure(TilingSettings(tile_height=32, tile_width=32, overlap=0.5), None)
    assert vae.model.use_tiling and vae.model.tile_latent_min_width == 2 and vae.model.tile_overlap_factor == 0.5
    tiled, _ = vae.encode(frames)
    assert tiled.shape == untiled.shape == (1, 32, 3, 4, 6) and not torch.equal(tiled, untiled)
    with pytest.raises(ConfigError, match="keeps 2 latents"):
        vae.configure(TilingSettings(tile_height=32, tile_width=32, overlap=0.25), None)


def test_cosmos_vae_is_refused_because_it_is_not_a_posterior(tmp_path, family_videos, capsys):
    cosmos = tmp_path / "cosmos"
    cosmos.mkdir()
    (cosmos / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLCosmos"}))
    with pytest.raises(ConfigError, match="AutoencoderKLCosmos, which latentcache cannot encode with: its encode "
                                          "returns an IdentityDistribution"):
        family_for_source(str(cosmos))
    # Named with --family too, the loader refuses it for the same reason.
    with pytest.raises(ConfigError, match="found a AutoencoderKLCosmos, which latentcache cannot encode with"):
        load_vae(VAESettings(source=str(cosmos), family="wan", subfolder=None), "cpu")
    assert main(["encode", str(family_videos), "--out", str(tmp_path / "out"), "--vae", str(cosmos),
                 "--device", "cpu", *CLIP]) == 2
    assert "IdentityDistribution" in capsys.readouterr().err


def test_check_config_names_a_per_channel_family_sat_cannot_scale(encoded, tmp_path):
    """SAT scales by one factor: raw latents of a per-channel family can never be right, and says so by name."""
    import yaml

    from latentcache.format.manifest import Manifest
    from latentcache.train.trainer_config import config_problems, load_trainer_config

    family, out = encoded
    if family not in PER_CHANNEL:
        pytest.skip("a single-factor family: tests/train/test_sat.py checks its scale_factor")
    channels, frames = EXPECTED[family][0], FRAMES.get(family, 17)
    tree = {"model": {"scale_factor": 1.0, "latent_input": True,
                      "network_config": {"params": {"in_channels": channels}}},
            "data": {"target": "latentcache.sat.SATLatentDataset",
                     "params": {"video_size": [64, 96], "max_num_frames": frames}}}

    def problems(**data: object) -> list[str]:
        path = tmp_path / "trainer.yaml"
        path.write_text(yaml.safe_dump({**tree, "data": {**tree["data"], **data}}))
        return config_problems(load_trainer_config(path), Manifest.read(out))

    (p,) = problems()
    assert f"the shards' {family} VAE normalises them per channel" in p and "LatentShardDataset" in p
    assert problems(target="latentcache.LatentShardDataset") == []
    tree["model"]["scale_factor"] = 0.5
    (p,) = problems(target="latentcache.LatentShardDataset")
    assert f"already applies the {family} VAE's per-channel normalisation" in p and "scale_factor: 1.0" in p
