"""A clip's latents do not depend on which clips share its batch, for every family (DESIGN.md's invariant): three
real decoded clips encoded one at a time and three to a batch through `VideoVAE.encode` give the same latents. Where
diffusers' VAE cannot take a batch (HunyuanVideo 1.5), the family record says so and latentcache encodes its clips
one at a time by itself."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import av
import diffusers
import numpy as np
import pytest
import torch
from conftest import fast_cases
from safetensors.torch import load as load_safetensors

from latentcache.cli import main
from latentcache.encode.models.families import FAMILIES
from latentcache.encode.models.vae import load_vae
from latentcache.encode.settings import VAESettings
from latentcache.tools.synthetic import write_video

# The real HunyuanVideo 1.5 VAE's mid-block attention, small: the shape the issue reported crashing at batch 2.
HUNYUAN15_ATTENTION = dict(latent_channels=8, block_out_channels=(16, 16, 32, 32, 32), layers_per_block=1)
# LTX-2.3's layout (its own down-sampling order, the last block as wide as the one before, as 1024 after 1024 is)
# with the compression its config states; diffusers' fallback formula would say 64x / 16x for these blocks.
LTX23_SHAPED = dict(block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32),
                    layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                    downsample_type=("spatiotemporal", "spatial", "temporal", "spatiotemporal"),
                    spatial_compression_ratio=32, temporal_compression_ratio=8)
WAN22_TI2V = dict(base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                  temperal_downsample=[False, True, True], is_residual=True, patch_size=2, scale_factor_spatial=16,
                  scale_factor_temporal=4, in_channels=12, out_channels=12, latents_mean=[0.0] * 48,
                  latents_std=[1.0] * 48)
# family, config (None: the built-in tiny-random-<family>), clip frames x height x width
CASES = {name: (name, None) for name in FAMILIES} | {
    "wan2.2-ti2v": ("wan", WAN22_TI2V),
    "ltx2.3": ("ltx2", LTX23_SHAPED),
    "hunyuanvideo15-attention": ("hunyuanvideo15", HUNYUAN15_ATTENTION),
}
FRAMES = {"mochi": 13, "minimax-h3": 22}  # else 9 (4k+1, 8k+1); Mochi 6k+1, MiniMax-H3 17k+5


@pytest.fixture(scope="module")
def decoded_clips(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Three different real clips [3, 22, 64, 96, 3] decoded by PyAV from an h264 video (windows 8 frames apart)."""
    path = write_video(tmp_path_factory.mktemp("batch") / "walk", codec="h264", num_frames=40, height=64, width=96)
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return np.stack([frames[i * 8: i * 8 + 22] for i in range(3)])


def _vae(family: str, config: dict | None, tmp_path: Path):
    if config is None:
        return load_vae(VAESettings(source=f"tiny-random-{family}", family=family, subfolder=None), "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(diffusers, FAMILIES[family].class_name)(**config)
    model.save_pretrained(tmp_path / "vae")
    return load_vae(VAESettings(source=str(tmp_path / "vae"), family=family, subfolder=None), "cpu")


# Fast tier: the default family and the shape that crashed at batch 2 (issue: HunyuanVideo 1.5 attention).
@pytest.mark.parametrize("case", fast_cases(sorted(CASES), fast=["cogvideox", "hunyuanvideo15-attention"]))
def test_three_clips_in_one_batch_encode_as_they_do_one_at_a_time(case, decoded_clips, tmp_path):
    family, config = CASES[case]
    vae = _vae(family, config, tmp_path)
    clips = np.ascontiguousarray(decoded_clips[:, : FRAMES.get(family, 9)])
    batched_mean, batched_logvar = vae.encode(clips)
    singles = [vae.encode(clips[i: i + 1]) for i in range(3)]
    mean = torch.cat([m for m, _ in singles])
    logvar = torch.cat([lv for _, lv in singles])
    assert batched_mean.shape == (3, *vae.spec.latent_shape(*clips.shape[1:4]))
    # fp32 on a CPU: batched convolutions round in other orders, ~1e-5 apart on latents of order 1.
    torch.testing.assert_close(batched_mean, mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(batched_logvar, logvar, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(mean[0], mean[1])  # three different clips, not one clip three times


@pytest.mark.slow
def test_hunyuanvideo15_cannot_batch_in_diffusers_so_latentcache_encodes_it_clip_by_clip(decoded_clips, tmp_path):
    """diffusers' own encode of a batch of two raises in the mid-block attention (the issue saw it at [2, 3, 17, 96,
    160]; any batch > 1 does); the family record says so and `VideoVAE.encode` calls it once per clip (the same
    latents as diffusers' batch-1 calls)."""
    vae = _vae("hunyuanvideo15", HUNYUAN15_ATTENTION, tmp_path)
    assert FAMILIES["hunyuanvideo15"].batchable is False
    x = torch.zeros(2, 3, 9, 64, 96)
    with torch.no_grad(), pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        vae.model.encode(x)
    clips = np.ascontiguousarray(decoded_clips[:2, :9])
    mean, _ = vae.encode(clips)
    pixels = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(mean[i], vae.model.encode(pixels[i: i + 1]).latent_dist.mean[0])
    # The record's field is what decides: a batchable record sends the batch to diffusers as it is, and it fails.
    unbatched = dataclasses.replace(FAMILIES["hunyuanvideo15"], batchable=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(FAMILIES, "hunyuanvideo15", unbatched)
        with pytest.raises(RuntimeError, match="broadcast shape"):
            vae.encode(clips)


@pytest.mark.slow
def test_hunyuanvideo15_with_attention_encodes_two_videos_at_batch_size_2(tmp_path):
    """The issue's command: two videos, --batch-size 2, the attention config: exit 0, the latents of batch size 1."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a", codec="h264", num_frames=60, height=96, width=160)
    write_video(videos / "b", codec="vp9", num_frames=60, height=120, width=160)
    vae = _vae("hunyuanvideo15", HUNYUAN15_ATTENTION, tmp_path)
    args = ["--vae", str(tmp_path / "vae"), "--device", "cpu", "--frames", "17", "--fps", "8", "--height", "96",
            "--width", "160"]
    assert vae.spec.channels == 8
    for batch in ("1", "2"):
        assert main(["encode", str(videos), "--out", str(tmp_path / f"out{batch}"), "--batch-size", batch, *args]) == 0

    def latents(out: Path) -> dict[str, torch.Tensor]:
        import tarfile

        manifest = json.loads((out / "manifest.json").read_text())
        found = {}
        for shard in manifest["shards"]:
            with tarfile.open(out / shard["path"]) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".latents.safetensors"):
                        found[member.name] = load_safetensors(tar.extractfile(member).read())["mean"]
        return found

    one, two = latents(tmp_path / "out1"), latents(tmp_path / "out2")
    assert len(one) == 2 and one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key])
