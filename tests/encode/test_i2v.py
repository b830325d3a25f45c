"""Image-to-video conditioning (`--image-latents`): a real video -> `latentcache encode --image-latents` -> the
dataset's `image_latents`, compared with what the diffusers I2V pipelines' own `prepare_latents` computes from the
same first frame with the same tiny VAE."""

from __future__ import annotations

import functools
import json
import tarfile
import types
from pathlib import Path

import pytest
import torch
from diffusers.pipelines.cogvideo import pipeline_cogvideox_image2video as cog_i2v
from diffusers.pipelines.wan import pipeline_wan_i2v as wan_i2v
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from latentcache.cli import main
from latentcache.encode.decoding.decode import decode_clip
from latentcache.encode.models.vae import load_vae
from latentcache.encode.settings import ClipSettings, VAESettings
from latentcache.errors import ConfigError, LatentMismatchError, ShardFormatError
from latentcache.format.reader import decode_sample
from latentcache.tools.synthetic import write_video
from latentcache.train.dataset import LatentShardDataset
from latentcache.train.raw import RawSample

FRAMES, HEIGHT, WIDTH = 17, 64, 96
CLIP = ClipSettings(frames=FRAMES, fps=8.0, height=HEIGHT, width=WIDTH)
ARGS = ["--device", "cpu", "--dtype", "fp32", "--frames", str(FRAMES), "--fps", "8", "--height", str(HEIGHT),
        "--width", str(WIDTH), "--workers", "0"]


@pytest.fixture(scope="module")
def i2v_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("i2v_videos")
    write_video(d / "walk", codec="h264", num_frames=60, height=96, width=128)
    return d


def _encode(family: str, videos: Path, out: Path, *extra: str) -> Path:
    assert main(["encode", str(videos), "--out", str(out), "--vae", f"tiny-random-{family}", *ARGS,
                 "--image-latents", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def cog_out(i2v_video: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _encode("cogvideox", i2v_video, tmp_path_factory.mktemp("cog") / "out")


@pytest.fixture(scope="module")
def wan_out(i2v_video: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _encode("wan", i2v_video, tmp_path_factory.mktemp("wan") / "out")


def _first_frame(videos: Path, sample: dict) -> torch.Tensor:
    """The clip's first frame, decoded again, as the pipelines take an image: [1, 3, H, W] in [-1, 1]."""
    clip = decode_clip(videos / sample["meta"]["source"], sample["meta"]["clip_start"], CLIP)
    frame = torch.as_tensor(clip.frames[0]).permute(2, 0, 1)[None]
    return frame.to(torch.float32) / 127.5 - 1.0


def _only(out: Path, **kwargs) -> dict:
    (sample,) = list(LatentShardDataset(out, **kwargs))
    return sample


def _argmax(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType) -> None:
    """The pipeline's own retrieve_latents, taking the posterior's mode: deterministic, to compare with the mean."""
    monkeypatch.setattr(module, "retrieve_latents",
                        functools.partial(module.retrieve_latents, sample_mode="argmax"))


def _cog_pipeline(vae):
    # What CogVideoXImageToVideoPipeline.prepare_latents reads from `self` (CogVideoX 1.0: no patch_size_t).
    return types.SimpleNamespace(
        vae=vae.model, vae_scale_factor_temporal=vae.spec.temporal_compression,
        vae_scale_factor_spatial=vae.spec.spatial_compression, vae_scaling_factor_image=vae.model.config.scaling_factor,
        transformer=types.SimpleNamespace(config=types.SimpleNamespace(patch_size_t=None)),
        scheduler=types.SimpleNamespace(init_noise_sigma=1.0))


def _cog_prepare(vae, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    _, image_latents = cog_i2v.CogVideoXImageToVideoPipeline.prepare_latents(
        _cog_pipeline(vae), image, 1, vae.spec.channels, FRAMES, HEIGHT, WIDTH, torch.float32, torch.device("cpu"),
        generator)
    return image_latents[0]  # [F, C, H, W]


def test_cogvideox_image_latents_are_what_the_i2v_pipeline_prepares(cog_out, i2v_video, monkeypatch):
    vae = load_vae(VAESettings(source="tiny-random-cogvideox", subfolder=None, dtype="fp32"), "cpu")
    sample = _only(cog_out, sample_posterior=False, layout="BTCHW")
    image = _first_frame(i2v_video, sample)
    _argmax(monkeypatch, cog_i2v)
    expected = _cog_prepare(vae, image, torch.Generator().manual_seed(0))
    assert sample["image_latents"].shape == expected.shape == (5, 16, 8, 12)
    assert torch.equal(sample["image_latents"], expected)
    assert sample["image_latents"][1:].abs().sum() == 0 and sample["image_latents"][0].abs().sum() > 0
    # The default layout is the same tensor as [C, T, H, W], like `latents`.
    assert torch.equal(_only(cog_out, sample_posterior=False)["image_latents"], expected.permute(1, 0, 2, 3))


def test_cogvideox15_divides_the_image_latents_by_the_scaling_factor(cog_out, i2v_video, monkeypatch, tmp_path):
    """CogVideoX 1.5 VAEs set invert_scale_latents: its I2V pipeline divides the image latents by scaling_factor."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(cog_out, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["latent_spec"]["invert_scale_latents"] = True
    (out / "manifest.json").write_text(json.dumps(manifest))
    vae = load_vae(VAESettings(source="tiny-random-cogvideox", subfolder=None, dtype="fp32"), "cpu")
    vae.model.register_to_config(invert_scale_latents=True)
    sample = _only(out, sample_posterior=False, layout="BTCHW")
    _argmax(monkeypatch, cog_i2v)
    expected = _cog_prepare(vae, _first_frame(i2v_video, sample), torch.Generator().manual_seed(0))
    assert torch.equal(sample["image_latents"], expected)
    assert not torch.equal(expected, _only(cog_out, sample_posterior=False, layout="BTCHW")["image_latents"])


def test_cogvideox_stores_the_posterior_the_pipeline_samples(cog_out, i2v_video):
    """The pipeline samples the first frame's posterior (retrieve_latents' default): with the pipeline's own noise,
    the stored image_mean and image_logvar give exactly its image latents; the dataset samples fresh noise."""
    vae = load_vae(VAESettings(source="tiny-random-cogvideox", subfolder=None, dtype="fp32"), "cpu")
    sample = _only(cog_out, sample_posterior=False)
    raw = decode_sample(_raw_sample(cog_out), "shard")
    assert raw["image_mean"].shape == raw["image_logvar"].shape == (16, 1, 8, 12)
    expected = _cog_prepare(vae, _first_frame(i2v_video, sample), torch.Generator().manual_seed(7))[0]
    noise = torch.randn((1, 16, 1, 8, 12), generator=torch.Generator().manual_seed(7))[0]
    z = raw["image_mean"] + torch.exp(0.5 * raw["image_logvar"]) * noise
    assert torch.allclose(vae.model.config.scaling_factor * z[:, 0], expected, atol=1e-6, rtol=1e-6)
    sampled = [_only(cog_out, seed=s)["image_latents"] for s in (0, 0, 1)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    assert not torch.equal(sampled[0], sample["image_latents"]) and sampled[0][:, 1:].abs().sum() == 0


def test_wan_image_latents_are_the_i2v_pipelines_condition(wan_out, i2v_video):
    """WanImageToVideoPipeline encodes the first frame followed by zero frames and takes the mode; the dataset yields
    its `condition` exactly: cat([4-channel frame mask, normalised latents])."""
    vae = load_vae(VAESettings(source="tiny-random-wan", family="wan", subfolder=None, dtype="fp32"), "cpu")
    sample = _only(wan_out)  # sample_posterior=True: Wan's conditioning is the mode, nothing to sample
    image = _first_frame(i2v_video, sample)
    pipe = wan_i2v.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae.model, scheduler=None)
    _, condition = pipe.prepare_latents(image, 1, vae.spec.channels, HEIGHT, WIDTH, FRAMES, torch.float32,
                                        torch.device("cpu"), torch.Generator().manual_seed(0))
    assert sample["image_latents"].shape == condition[0].shape == (4 + 16, 5, 8, 12)
    assert torch.equal(sample["image_latents"], condition[0])
    raw = decode_sample(_raw_sample(wan_out), "shard")
    assert raw["image_logvar"] is None and raw["image_mean"].shape == (16, 5, 8, 12)
    batch = next(iter(LatentShardDataset(wan_out, batch_size=1)))
    assert torch.equal(batch["image_latents"][0], condition[0])


def test_for_transformer_checks_the_concatenated_channels(cog_out, wan_out):
    def config(in_channels: int) -> dict:
        return {"in_channels": in_channels, "patch_size": 2}

    assert LatentShardDataset.for_transformer(config(32), cog_out, image_to_video=True).spec.channels == 16
    assert LatentShardDataset.for_transformer({"in_channels": 36, "patch_size": [1, 2, 2]}, wan_out,
                                              image_to_video=True).spec.family == "wan"
    for out, wrong in ((cog_out, 36), (cog_out, 16), (wan_out, 32)):
        with pytest.raises(LatentMismatchError, match=f"in_channels={wrong}.*image_latents"):
            LatentShardDataset.for_transformer(config(wrong), out, image_to_video=True)


def test_image_latents_is_fingerprinted_and_refused_where_unsupported(cog_out, i2v_video, tmp_path):
    plan = json.loads((cog_out / "plan.json").read_text())
    assert plan["settings"]["image_latents"] is True
    plain = tmp_path / "plain"
    assert main(["encode", str(i2v_video), "--out", str(plain), "--vae", "tiny-random-cogvideox", *ARGS]) == 0
    assert "image_latents" not in json.loads((plain / "plan.json").read_text())["settings"]
    assert "image_latents" not in next(iter(LatentShardDataset(plain)))
    # The same --out with the flag added: other settings, refused naming the field.
    assert main(["encode", str(i2v_video), "--out", str(plain), "--vae", "tiny-random-cogvideox", *ARGS,
                 "--image-latents"]) == 2
    for family in ("hunyuanvideo", "ltx"):
        with pytest.raises(ConfigError, match=f"{family} family's image-to-video conditioning is not cached"):
            _settings(["--vae", f"tiny-random-{family}", "--image-latents"])


def _settings(extra: list[str]):
    import argparse

    from latentcache.cli import add_encode_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_encode_arguments(parser)
    return settings_from_args(parser.parse_args(["x", "--out", "y", *extra]))


# ------------------------------------------------------------------------------------------- the reader


def _raw_sample(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    with tarfile.open(out / manifest["shards"][0]["path"]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = next(n for n in members if n.endswith(".json")).rsplit(".", 1)[0]
    return {"__key__": key, **{n[len(key) + 1:]: data for n, data in members.items()}}


def _with_tensors(raw: dict, **change) -> dict:
    tensors = load_safetensors(raw["latents.safetensors"])
    for name, value in change.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value.contiguous()
    return {**raw, "latents.safetensors": save_safetensors(tensors)}


@pytest.mark.parametrize("change, message", [
    (lambda t: {"image_mean": t["image_mean"].clone().index_fill_(2, torch.tensor([0]), float("nan"))},
     "image_mean has 192 NaN/Inf"),
    (lambda t: {"image_logvar": torch.full_like(t["image_logvar"], 40.0)}, "image_logvar spans 40..40"),
    (lambda t: {"image_mean": t["image_mean"][:, :, :4]}, r"image_mean is \[16, 1, 4, 12\], expected"),
    (lambda t: {"image_mean": t["image_mean"].repeat(1, 2, 1, 1), "image_logvar": t["image_logvar"].repeat(1, 2, 1, 1)},
     r"image_mean is \[16, 2, 8, 12\]"),
    (lambda t: {"image_mean": None}, "expected mean and logvar"),
    (lambda t: {"image_extra": t["image_mean"]}, "expected mean and logvar"),
])
def test_reader_checks_the_image_tensors(cog_out, change, message):
    raw = _raw_sample(cog_out)
    assert decode_sample(raw, "shard")["image_mean"] is not None
    bad = _with_tensors(raw, **change(load_safetensors(raw["latents.safetensors"])))
    with pytest.raises(ShardFormatError, match=message):
        decode_sample(bad, "shard")


def test_dataset_refuses_image_latents_of_the_other_familys_shape(wan_out):
    """A Wan sample whose image_mean is 1 frame (CogVideoX's layout) is not Wan's conditioning."""
    raw = _raw_sample(wan_out)
    tensors = load_safetensors(raw["latents.safetensors"])
    bad = _with_tensors(raw, image_mean=tensors["image_mean"][:, :1].contiguous())
    dataset = LatentShardDataset(wan_out)
    with pytest.raises(LatentMismatchError, match=r"image_mean \[16, 1, 8, 12\].*wan.*\[16, 5, 8, 12\]"):
        dataset.decoder.decode(RawSample(bad["__key__"], "shard", f"{FRAMES}x{HEIGHT}x{WIDTH}", bad), dataset.epoch)


def test_image_latents_live_in_the_latents_member(cog_out):
    """No new tar member: the latents member holds two more tensors, so the member check stays as it is."""
    raw = _raw_sample(cog_out)
    assert set(raw) - {"__key__"} == {"json", "latents.safetensors"}
    assert set(load_safetensors(raw["latents.safetensors"])) == {"mean", "logvar", "image_mean", "image_logvar"}


def test_verify_passes_image_latents(cog_out, wan_out):
    from latentcache.tools.verify import verify

    for out in (cog_out, wan_out):
        report = verify(out)
        assert report.ok and report.samples == 1, report.lines()


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_batched_image_conditions_match_one_clip_at_a_time(family, i2v_video):
    """Clips are encoded in batches (`--batch-size`); their conditions too, each the same as encoded alone."""
    import numpy as np

    vae = load_vae(VAESettings(source=f"tiny-random-{family}", family=family, subfolder=None, dtype="fp32"), "cpu")
    clip = decode_clip(i2v_video / "walk.mp4", 0.0, CLIP).frames
    frames = np.stack([clip, clip[::-1].copy()])  # two clips with different first frames
    mean, logvar = vae.encode_image_condition(frames)
    for i in range(2):
        one_mean, one_logvar = vae.encode_image_condition(frames[i:i + 1])
        assert torch.allclose(mean[i], one_mean[0], atol=1e-5, rtol=1e-4)
        assert (logvar is None) == (one_logvar is None) == (family == "wan")
    assert not torch.allclose(mean[0], mean[1])
