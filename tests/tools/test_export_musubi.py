"""`latentcache export musubi`: real encoded shards -> musubi-tuner cache files, read back by musubi-tuner's own
dataset code (tests/fixtures/musubi_tuner, copied from kohya-ss/musubi-tuner at a pinned commit, Apache-2.0) and
compared with what musubi's own cache writers (dataset/cache_io.py) write for the same tensors."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from latentcache.cli import main
from latentcache.errors import ConfigError, LatentMismatchError
from latentcache.format.reader import decode_sample
from latentcache.tools.export_musubi import export_musubi
from latentcache.tools.synthetic import write_video
from latentcache.train.shard_sources import read_shard, resolve_source

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "musubi_tuner"
CLIP = ["--device", "cpu", "--frames", "13", "--fps", "24", "--height", "64", "--width", "96"]


@pytest.fixture(scope="module")
def musubi():
    """musubi-tuner's dataset package from the fixture. Its media_utils imports cv2 at the top for image resizing,
    which the read path never calls; where OpenCV is not installed an empty module stands in for it."""
    sys.path.insert(0, str(FIXTURE))
    stub = importlib.util.find_spec("cv2") is None
    if stub:
        sys.modules["cv2"] = types.ModuleType("cv2")
    try:
        from musubi_tuner.dataset import cache_io, image_video_dataset

        yield SimpleNamespace(dataset=image_video_dataset, cache_io=cache_io)
    finally:
        sys.path.remove(str(FIXTURE))
        if stub:
            sys.modules.pop("cv2", None)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("musubi_videos")
    write_video(d / "red_clip", codec="h264", num_frames=30, height=64, width=96)
    write_video(d / "blue_clip", codec="vp9", num_frames=30, height=72, width=112)
    (d / "red_clip.txt").write_text("a red square crosses the frame", encoding="utf-8")
    return d


def _encode(videos: Path, out: Path, family: str, *extra: str) -> Path:
    assert main(["encode", str(videos), "--out", str(out), "--vae", f"tiny-random-{family}", "--family", family,
                 *CLIP, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def wan_out(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _encode(videos, tmp_path_factory.mktemp("wan") / "out", "wan")


def _samples(out: Path) -> dict[str, dict]:
    manifest, _, shards = resolve_source(out)
    decoded = (decode_sample(raw, shard.url) for shard in shards for raw in read_shard(shard))
    return {s["meta"]["source"]: s for s in decoded}


def _latent_files(result) -> list[Path]:
    return [result.target / n for n in result.files if not n.endswith("_te.safetensors")]


def _text_files(result) -> list[Path]:
    return [result.target / n for n in result.files if n.endswith("_te.safetensors")]


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: (f.get_tensor(k).dtype, tuple(f.get_tensor(k).shape)) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def _read_with_musubi(musubi, cache: Path, videos: Path, arch: str) -> list[dict]:
    ds = musubi.dataset.VideoDataset(resolution=(96, 64), caption_extension=".txt", batch_size=1, num_repeats=1,
                                     enable_bucket=True, bucket_no_upscale=False, target_frames=[13],
                                     video_directory=str(videos), cache_directory=str(cache), architecture=arch)
    ds.prepare_for_training()
    ds.set_seed(0, SimpleNamespace(value=0))
    return [ds[i] for i in range(len(ds))]


def test_wan_export_matches_musubi_writer_and_is_read_by_musubi_dataset(musubi, wan_out, videos, tmp_path):
    cache = tmp_path / "cache"
    assert main(["export", "musubi", str(wan_out), "--to", str(cache)]) == 0
    samples = _samples(wan_out)
    spec = json.loads((wan_out / "manifest.json").read_text())["latent_spec"]
    reference = tmp_path / "reference"
    for source, sample in samples.items():
        # What musubi's Wan VAE gives for these pixels: the posterior mean, normalised with the config's
        # latents_mean/latents_std (wan/modules/vae.py encode), in bf16 (wan_cache_latents.py).
        m = torch.tensor(spec["latents_mean"]).view(-1, 1, 1, 1)
        s = torch.tensor(spec["latents_std"]).view(-1, 1, 1, 1)
        latent = ((sample["mean"].float() - m) / s).to(torch.bfloat16)
        meta = sample["meta"]
        item = musubi.dataset.ItemInfo(f"{videos}/{Path(source).stem}_00000-013.mp4", "", (meta["source_width"],
                                       meta["source_height"]), frame_count=13)
        item.latent_cache_path = musubi.dataset.BaseDataset(cache_directory=str(reference), architecture="wan"
                                                            ).get_latent_cache_path(item)
        musubi.cache_io.save_latent_cache_wan(item, latent, None, None, None)
        ours = cache / Path(item.latent_cache_path).name
        assert ours.exists(), sorted(p.name for p in cache.iterdir())
        assert _header(ours) == _header(Path(item.latent_cache_path))
        with safe_open(str(ours), "pt") as f:
            torch.testing.assert_close(f.get_tensor(f.keys()[0]), latent, rtol=0, atol=0)

    # No text cache was encoded: musubi skips items without one, so give each video musubi's own Wan T5 cache.
    for source in samples:
        te = musubi.dataset.ItemInfo(Path(source).stem, "a caption", (96, 64))
        te.text_encoder_output_cache_path = str(cache / f"{Path(source).stem}_wan_te.safetensors")
        musubi.cache_io.save_text_encoder_output_cache_wan(te, torch.zeros(5, 8, dtype=torch.bfloat16))
    batches = _read_with_musubi(musubi, cache, videos, "wan")
    assert len(batches) == len(samples) == 2
    shapes = sorted(tuple(b["latents"].shape) for b in batches)
    assert shapes == sorted((1, *s["mean"].shape) for s in samples.values())
    assert all(b["latents"].dtype == torch.bfloat16 and b["t5"][0].shape == (5, 8) for b in batches)


def test_wan_text_cache_is_musubis_varlen_t5(musubi, videos, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.encode.test_text import _save_pipeline

    pipeline = _save_pipeline(tmp_path / "umt5", "UMT5EncoderModel", "UMT5Config")
    assert transformers
    out = _encode(videos, tmp_path / "out", "wan", "--text-encoder", str(pipeline), "--text-max-length", "16")
    cache = tmp_path / "cache"
    result = export_musubi(out, cache)
    assert sorted(p.name for p in _text_files(result)) == ["blue_clip_wan_te.safetensors",
                                                           "red_clip_wan_te.safetensors"]
    samples = _samples(out)
    red = samples["red_clip.mp4"]
    meta, keys = _header(cache / "red_clip_wan_te.safetensors")
    length = int(red["text"]["attention_mask"].sum())
    assert meta == {"architecture": "wan", "caption1": "a red square crosses the frame", "format_version": "1.0.1"}
    assert keys == {"varlen_t5_bfloat16": (torch.bfloat16, (length, red["text"]["prompt_embeds"].shape[1]))}
    batches = _read_with_musubi(musubi, cache, videos, "wan")
    by_len = {b["t5"][0].shape[0]: b for b in batches}
    torch.testing.assert_close(by_len[length]["t5"][0],
                               red["text"]["prompt_embeds"][:length].to(torch.bfloat16), rtol=0, atol=0)


def test_hunyuan_export_is_a_seeded_posterior_sample_in_fp16(musubi, videos, tmp_path):
    out = _encode(videos, tmp_path / "out", "hunyuanvideo")
    cache = tmp_path / "cache"
    result = export_musubi(out, cache, seed=3)
    assert len(_latent_files(result)) == 2 and not _text_files(result)
    samples = _samples(out)
    for path in _latent_files(result):
        assert path.name.endswith("_hv.safetensors")
        meta, keys = _header(path)
        assert meta["architecture"] == "hunyuan_video" and meta["frame_count"] == "13"
        (key, (dtype, shape)), = keys.items()
        assert dtype == torch.float16 and key == f"latents_{shape[1]}x{shape[2]}x{shape[3]}_float16"
    # musubi caches latent_dist.sample() unscaled: mean + exp(logvar / 2) * noise, not the mean.
    first = _latent_files(result)[0]
    with safe_open(str(first), "pt") as f:
        exported = f.get_tensor(f.keys()[0]).float()
    sample = next(s for s in samples.values() if first.name.startswith(Path(s["meta"]["source"]).stem))
    z = (exported - sample["mean"].float()) / torch.exp(0.5 * sample["logvar"].float())
    assert 0.5 < z.std().item() < 1.5 and abs(z.mean().item()) < 0.3
    again = export_musubi(out, tmp_path / "again", seed=3)
    for first, second in zip(_latent_files(result), _latent_files(again), strict=True):
        with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
            assert torch.equal(a.get_tensor(a.keys()[0]), b.get_tensor(b.keys()[0]))
    for source in samples:  # musubi's own HunyuanVideo text caches (LLM and CLIP-L), so its dataset keeps the items
        te = musubi.dataset.ItemInfo(Path(source).stem, "c", (96, 64))
        te.text_encoder_output_cache_path = str(cache / f"{Path(source).stem}_hv_te.safetensors")
        musubi.cache_io.save_text_encoder_output_cache(te, torch.zeros(4, 8, dtype=torch.float16),
                                                       torch.ones(4, dtype=torch.bool), True)
        musubi.cache_io.save_text_encoder_output_cache(te, torch.zeros(8, dtype=torch.float16), None, False)
    batches = _read_with_musubi(musubi, cache, videos, "hv")
    assert len(batches) == 2 and all(b["latents"].dtype == torch.float16 for b in batches)


def test_refusals_name_the_reason(videos, tmp_path):
    out = _encode(videos, tmp_path / "mean_only", "hunyuanvideo", "--store", "mean")
    with pytest.raises(LatentMismatchError, match="has no logvar .*--store mean"):
        export_musubi(out, tmp_path / "cache")
    cog = _encode(videos, tmp_path / "cog", "cogvideox")
    with pytest.raises(ConfigError, match="family cogvideox has no musubi-tuner latent cache"):
        export_musubi(cog, tmp_path / "cache2")
    assert main(["export", "musubi", str(cog), "--to", str(tmp_path / "cache3")]) == 2


def test_wan_export_refuses_vaes_musubi_normalises_differently(wan_out, tmp_path):
    """musubi's Wan VAE is 16-channel Wan 2.1 with fixed latents_mean/latents_std: a 48-channel Wan 2.2 TI2V output,
    or one with other statistics, would be read with the wrong normalisation, so the export refuses it."""
    import shutil

    for change, match in ((lambda spec: spec.update(channels=48, latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
                           "48-channel wan VAE"),
                          (lambda spec: spec["latents_std"].__setitem__(0, 1.0), "latents_std is not the Wan 2.1")):
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(wan_out, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        change(manifest["latent_spec"])
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ConfigError, match=match):
            export_musubi(copy, tmp_path / "cache")


@pytest.mark.slow
def test_wan_export_equals_musubis_own_wan_vae_on_full_size_random_weights(musubi, tmp_path):
    """Once, at full size: musubi's own Wan 2.1 VAE (original checkpoint format, fixed architecture) against
    `latentcache encode` + `export musubi` with the same random weights, converted by diffusers' own converter.
    Tolerance: relative RMS 0.01 (two correct bf16 implementations differ by about 0.006; latentcache encodes in
    float32 here, musubi in bf16 as its cache script does)."""
    pytest.importorskip("einops")
    import av
    import diffusers
    import numpy as np
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from musubi_tuner.wan.modules import vae as musubi_vae
    from safetensors.torch import save_file

    torch.manual_seed(0)
    original = musubi_vae.WanVAE_(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                  temperal_downsample=[False, True, True], dropout=0.0).eval()
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    checkpoint = tmp_path / "Wan2.1_VAE.safetensors"
    save_file(state, str(checkpoint))
    model = diffusers.AutoencoderKLWan()  # the Wan 2.1 config: 16 channels, its latents_mean/latents_std
    model.load_state_dict(convert_wan_vae_to_diffusers(dict(state)), strict=True)
    model.save_pretrained(tmp_path / "vae")

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip", codec="h264", num_frames=9, height=64, width=64, fps=8)
    out = tmp_path / "out"
    assert main(["encode", str(videos), "--out", str(out), "--vae", str(tmp_path / "vae"), "--family", "wan",
                 "--device", "cpu", "--frames", "9", "--fps", "8", "--height", "64", "--width", "64"]) == 0
    (ours,) = _latent_files(export_musubi(out, tmp_path / "cache"))
    with safe_open(str(ours), "pt") as f:
        exported = f.get_tensor(f.keys()[0]).float()

    (sample,) = _samples(out).values()
    with av.open(str(next(videos.iterdir()))) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    picked = [round(t * 8) for t in sample["meta"]["frame_times"]]
    assert picked == list(range(9))
    pixels = torch.from_numpy(np.stack([frames[i] for i in picked]))  # F, H, W, C
    # wan_cache_latents.py encode_and_save_batch, step by step, with musubi's WanVAE in bf16.
    vae = musubi_vae.WanVAE(vae_path=str(checkpoint), dtype=torch.bfloat16, device="cpu")
    contents = pixels[None].permute(0, 4, 1, 2, 3).contiguous().to(dtype=torch.bfloat16) / 127.5 - 1.0
    with torch.amp.autocast(device_type="cpu", dtype=torch.bfloat16), torch.no_grad():
        reference = torch.stack(vae.encode(contents), dim=0).to(torch.bfloat16)[0].float()
    assert exported.shape == reference.shape == (16, 3, 8, 8)
    rel_rms = ((exported - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
    print(f"relative RMS, latentcache export vs musubi's own Wan VAE: {rel_rms:.5f}")
    assert rel_rms < 0.01


def test_two_videos_of_one_name_are_refused_not_overwritten(tmp_path):
    """musubi names a cache file by the video's file name, start, length and size: a.mp4 and sub/a.mp4 would share
    one file, so the export stops, naming both samples, instead of silently keeping one."""
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    write_video(videos / "same", codec="h264", num_frames=30, height=64, width=96)
    write_video(videos / "sub" / "same", codec="h264", num_frames=30, height=64, width=96)
    out = _encode(videos, tmp_path / "out", "wan")
    with pytest.raises(LatentMismatchError, match=r"its export file same_00000-013_0096x0064_wan.safetensors is "
                                                  r"written by another sample"):
        export_musubi(out, tmp_path / "cache")



@pytest.mark.parametrize(("family", "arch"), [("hunyuanvideo15", "hv15"), ("hunyuanvideo", "k5")])
def test_hunyuan15_and_kandinsky5_match_musubis_writers_and_are_read_by_its_dataset(musubi, videos, tmp_path,
                                                                                     family, arch):
    """HunyuanVideo 1.5 (hv_1_5_cache_latents.py: `vae.encode(x)[0].mode()`, unscaled, fp16) and Kandinsky 5
    (kandinsky5_cache_latents.py: the HunyuanVideo VAE's `latent_dist.sample() * scaling_factor`, fp16, plus
    `latents_image` = its first and last latent frames): the files equal what musubi's own cache_io writers write for
    those tensors, and its VideoDataset reads them (with its own text caches beside them)."""
    # diffusers' HunyuanVideo 1.5 VAE mis-broadcasts its attention mask for more than one clip per call
    out = _encode(videos, tmp_path / "out", family, "--batch-size", "1")
    cache = tmp_path / "cache"
    assert main(["export", "musubi", str(out), "--to", str(cache), "--arch", arch]) == 0
    spec = json.loads((out / "manifest.json").read_text())["latent_spec"]
    reference = tmp_path / "reference"
    for source, sample in _samples(out).items():
        meta, stem = sample["meta"], Path(source).stem
        item = musubi.dataset.ItemInfo(f"{videos}/{stem}_00000-013.mp4", "", (meta["source_width"],
                                       meta["source_height"]), frame_count=13)
        item.latent_cache_path = musubi.dataset.BaseDataset(cache_directory=str(reference), architecture=arch
                                                            ).get_latent_cache_path(item)
        ours = cache / Path(item.latent_cache_path).name
        with safe_open(str(ours), "pt") as f:
            exported = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        (key,) = [k for k in exported if not k.startswith("latents_image")]
        latent = exported[key]
        if arch == "hv15":
            torch.testing.assert_close(latent, sample["mean"].to(torch.float16), rtol=0, atol=0)
            musubi.cache_io.save_latent_cache_hunyuan_video_1_5(item, sample["mean"].to(torch.float16), None, None)
        else:
            # a posterior sample, scaled: (latent / scaling_factor - mean) / std is standard normal noise
            z = (latent.float() / spec["scaling_factor"] - sample["mean"].float()) / torch.exp(
                0.5 * sample["logvar"].float())
            assert latent.dtype == torch.float16 and 0.5 < z.std().item() < 1.5 and abs(z.mean().item()) < 0.3
            image = torch.cat([latent[:, :1], latent[:, -1:]], dim=1)
            musubi.cache_io.save_latent_cache_kandinsky5(item, latent, image_latent=image)
        assert _header(ours) == _header(Path(item.latent_cache_path))
        with safe_open(item.latent_cache_path, "pt") as f:
            for k in f.keys():  # noqa: SIM118
                torch.testing.assert_close(f.get_tensor(k), exported[k], rtol=0, atol=0)
        te = musubi.dataset.ItemInfo(stem, "a caption", (96, 64))
        te.text_encoder_output_cache_path = str(cache / f"{stem}_{arch}_te.safetensors")
        if arch == "hv15":
            musubi.cache_io.save_text_encoder_output_cache_hunyuan_video_1_5(te, torch.zeros(5, 8), torch.zeros(3, 4))
        else:
            musubi.cache_io.save_text_encoder_output_cache_kandinsky5(te, torch.zeros(5, 8), torch.zeros(8),
                                                                      torch.ones(5, dtype=torch.bool))
    batches = _read_with_musubi(musubi, cache, videos, arch)
    assert len(batches) == 2 and all(b["latents"].dtype == torch.float16 for b in batches)
    assert sorted(tuple(b["latents"].shape) for b in batches) == sorted(
        (1, *s["mean"].shape) for s in _samples(out).values())


def test_two_buckets_are_read_by_musubis_dataset(musubi, tmp_path):
    """A wide and a tall clip (two latentcache buckets) exported for Wan: musubi's VideoDataset reads both, each with
    latents equal to the normalised posterior mean in bf16."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "wide", codec="h264", num_frames=30, height=64, width=96)
    write_video(videos / "tall", codec="h264", num_frames=30, height=96, width=64)
    out = _encode(videos, tmp_path / "out", "wan", "--buckets", "64x96,96x64")
    samples = _samples(out)
    assert {s["meta"]["bucket"] for s in samples.values()} == {"13x64x96", "13x96x64"}
    cache = tmp_path / "cache"
    export_musubi(out, cache)
    for source in samples:
        te = musubi.dataset.ItemInfo(Path(source).stem, "c", (96, 64))
        te.text_encoder_output_cache_path = str(cache / f"{Path(source).stem}_wan_te.safetensors")
        musubi.cache_io.save_text_encoder_output_cache_wan(te, torch.zeros(3, 8, dtype=torch.bfloat16))
    spec = json.loads((out / "manifest.json").read_text())["latent_spec"]
    m = torch.tensor(spec["latents_mean"]).view(-1, 1, 1, 1)
    s = torch.tensor(spec["latents_std"]).view(-1, 1, 1, 1)
    expected = {tuple(x["mean"].shape): ((x["mean"].float() - m) / s).to(torch.bfloat16) for x in samples.values()}
    batches = _read_with_musubi(musubi, cache, videos, "wan")
    assert len(batches) == 2
    for batch in batches:
        latent = batch["latents"][0]
        torch.testing.assert_close(latent, expected[tuple(latent.shape)], rtol=0, atol=0)
    assert len({tuple(b["latents"].shape) for b in batches}) == 2
