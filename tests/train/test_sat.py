"""CogVideo SAT on latentcache shards: real shards -> SATLatentDataset -> SAT's loader and collate -> SAT's
shared_step / encode_first_stage (re-implemented below line for line from CogVideo sat/diffusion_video.py) -> what the
DiT receives; plus check-config's account of each mismatch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from latentcache.cli import main
from latentcache.errors import ConfigError
from latentcache.format.manifest import Manifest
from latentcache.train.dataset import LatentShardDataset
from latentcache.train.sat import SATLatentDataset
from latentcache.train.trainer_config import config_problems, load_trainer_config

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "cogvideox_tiny_sat.yaml"
EXAMPLE = yaml.safe_load(EXAMPLE_CONFIG.read_text())
SCALE = EXAMPLE["model"]["scale_factor"]
PARAMS = EXAMPLE["data"]["params"]  # video_size [64, 96], fps 8, max_num_frames 17


class SATEngine:
    """The two SATVideoDiffusionEngine methods that turn `batch["mp4"]` into the DiT's input, quoted from CogVideo
    sat/diffusion_video.py (the DiT call `self(x, batch)` is replaced by returning x; lr_scale, gc and autocast
    omitted)."""

    def __init__(self, model_config: dict, first_stage_model=None, dtype=torch.float32) -> None:
        self.latent_input = model_config.get("latent_input", False)
        self.scale_factor = model_config.get("scale_factor", 1.0)
        self.input_key = model_config.get("input_key", "mp4")
        self.first_stage_model, self.dtype = first_stage_model, dtype

    def get_input(self, batch):
        return batch[self.input_key].to(self.dtype)

    def shared_step(self, batch):
        x = self.get_input(batch)
        x = x.permute(0, 2, 1, 3, 4).contiguous()
        x = self.encode_first_stage(x, batch)
        x = x.permute(0, 2, 1, 3, 4).contiguous()
        return x  # SAT: `loss, loss_dict = self(x, batch)`: x is what the DiT gets

    @torch.no_grad()
    def encode_first_stage(self, x, batch):
        frame = x.shape[2]

        if frame > 1 and self.latent_input:
            x = x.permute(0, 2, 1, 3, 4).contiguous()
            return x * self.scale_factor  # already encoded

        z = self.first_stage_model.encode(x)
        z = self.scale_factor * z
        return z


class RandomDataset(Dataset):
    """SAT's wrapper with `args.epochs` set (sat/data_utils/configure_data.py): a longer list of permuted indices."""

    def __init__(self, ds, scale=200, seed=131):
        self.wrapped_data = ds
        self.scale = scale
        self.indices = np.random.default_rng(seed).permutation(np.array(range(len(ds))))

    def __len__(self):
        return len(self.wrapped_data) * self.scale

    def __getitem__(self, index):
        return self.wrapped_data[int(self.indices[index % len(self.wrapped_data)])]


def _sat_loader(dataset, batch_size: int, num_workers: int = 0, epochs: int = 4) -> DataLoader:
    """SAT's make_dataset_full + make_data_loader for a map-style dataset on one rank."""
    wrapped = RandomDataset(dataset, scale=epochs)
    sampler = BatchSampler(SequentialSampler(wrapped), batch_size, False)
    return DataLoader(wrapped, batch_sampler=sampler, num_workers=num_workers)


def _args(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"batch_size": 2, "num_workers": 0, **kw})


def test_the_dit_gets_raw_latents_times_scale_factor_once(encoded_dir: Path) -> None:
    dataset = SATLatentDataset.create_dataset_function(str(encoded_dir), _args(base=[str(EXAMPLE_CONFIG)]),
                                                       sample_posterior=False, shuffle=False, **PARAMS)
    assert len(dataset) == 8
    engine = SATEngine(EXAMPLE["model"])
    batches = [batch for _, batch in zip(range(4), _sat_loader(dataset, 2), strict=False)]
    dit = torch.cat([engine.shared_step(b) for b in batches])
    # [B, T, C, H, W]: 5 latent frames of 16 channels, 8x12 for 17x64x96 clips.
    assert dit.shape == (8, 5, 16, 8, 12)
    items = list(LatentShardDataset(encoded_dir, normalize=False, sample_posterior=False, layout="BTCHW"))
    raw = torch.stack([i["latents"] for i in items])
    torch.testing.assert_close(dit, raw * SCALE)
    # Scaled once: exactly what LatentShardDataset gives a diffusers trainer (z * scaling_factor).
    ready = torch.stack([i["latents"] for i in LatentShardDataset(encoded_dir, sample_posterior=False,
                                                                    layout="BTCHW")])
    torch.testing.assert_close(dit, ready)
    # SFTDataset's other keys: the caption ("" without one), pixel frames and fps, collated by SAT's loader.
    assert [t for b in batches for t in b["txt"]] == [i["caption"] or "" for i in items]
    assert "a red square crosses the frame" in batches[0]["txt"] + batches[1]["txt"]
    assert batches[0]["num_frames"].tolist() == [17, 17] and batches[0]["fps"].tolist() == [8.0, 8.0]


def test_latent_input_false_runs_the_vae_encoder_on_latents_and_fails(encoded_dir: Path) -> None:
    from diffusers import AutoencoderKLCogVideoX

    from latentcache.encode.models.families import FAMILIES

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(**FAMILIES["cogvideox"].tiny_config)  # a CogVideoX VAE: its encoder takes RGB
    first_stage = SimpleNamespace(encode=lambda x: vae.encode(x).latent_dist.sample())
    engine = SATEngine({**EXAMPLE["model"], "latent_input": False}, first_stage)
    batch = next(iter(_sat_loader(SATLatentDataset(encoded_dir, shuffle=False), 2)))
    with pytest.raises(RuntimeError, match="channels"):
        engine.shared_step(batch)


def test_a_pixel_batch_with_latent_input_true_reaches_the_dit_as_rgb() -> None:
    pixels = torch.rand(2, 17, 3, 64, 96) * 2 - 1  # SFTDataset's "mp4": [T, C, H, W] in [-1, 1], batched
    dit = SATEngine(EXAMPLE["model"]).shared_step({"mp4": pixels})
    # SAT's VAE is skipped: the DiT gets the 3 RGB planes, scaled, with time and channels where latents would be.
    assert dit.shape == (2, 3, 17, 64, 96)
    torch.testing.assert_close(dit, pixels.permute(0, 2, 1, 3, 4) * SCALE)


def test_ranks_split_the_samples_and_each_epoch_draws_fresh_noise(encoded_dir: Path) -> None:
    seen = []
    for rank in (0, 1):
        d = SATLatentDataset(encoded_dir, rank=rank, world_size=2, sample_posterior=False, shuffle=False)
        seen += [d[i]["mp4"] for i in range(4)]  # one epoch of this rank's share
    means = [i["latents"] for i in LatentShardDataset(encoded_dir, normalize=False, sample_posterior=False)]
    assert sorted(float(m.sum()) for m in seen) == pytest.approx(sorted(float(m.sum()) for m in means))

    # Two epochs: LatentShardDataset's raw posterior samples of epoch 0, then of epoch 1 (fresh noise, new order).
    d = SATLatentDataset(encoded_dir, seed=5)
    reference = LatentShardDataset(encoded_dir, normalize=False, seed=5, shuffle=True)
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        for item in reference:
            assert torch.equal(d[0]["mp4"], item["latents"])
    first = {float(i["latents"].sum()) for i in reference}
    reference.set_epoch(0)
    assert first.isdisjoint(float(i["latents"].sum()) for i in reference)


@pytest.mark.parametrize("iteration", [3, 5])  # 5 x 2 = 10 samples: past the first epoch of 8
def test_resume_dataloader_continues_after_the_checkpoint(encoded_dir: Path, iteration: int) -> None:
    whole = SATLatentDataset(encoded_dir, seed=3)
    stream = [whole[i]["mp4"] for i in range(14)]
    args = _args(resume_dataloader=True, iteration=iteration, gradient_accumulation_steps=1)
    resumed = SATLatentDataset.create_dataset_function(str(encoded_dir), args, seed=3)
    rest = [resumed[i]["mp4"] for i in range(14 - 2 * iteration)]
    for a, b in zip(rest, stream[2 * iteration:], strict=True):
        assert torch.equal(a, b)
    fresh = SATLatentDataset.create_dataset_function(str(encoded_dir), _args(iteration=iteration), seed=3)
    assert torch.equal(fresh[0]["mp4"], stream[0])  # without --resume-dataloader SAT starts over, and so does it


def test_resume_with_workers_continues_each_batch_stream(encoded_dir: Path) -> None:
    """DataLoader workers take batches round-robin; a resumed run's batch k goes to the slot that batch k had."""
    def batches(iteration: int, count: int) -> list[torch.Tensor]:
        args = _args(resume_dataloader=iteration > 0, iteration=iteration, num_workers=2)
        dataset = SATLatentDataset.create_dataset_function(str(encoded_dir), args, seed=1)
        loader = _sat_loader(dataset, 2, num_workers=2)
        return [b["mp4"] for _, b in zip(range(count), loader, strict=False)]

    whole = batches(0, 6)
    resumed = batches(3, 3)
    for a, b in zip(resumed, whole[3:], strict=True):
        assert torch.equal(a, b)


def test_one_bucket_per_dataset(two_bucket_dir: Path) -> None:
    with pytest.raises(ConfigError, match="buckets 17x64x64, 17x64x96.*pick one"):
        SATLatentDataset(two_bucket_dir)
    assert len(SATLatentDataset(two_bucket_dir, video_size=[64, 64], max_num_frames=17)) == 2
    with pytest.raises(ConfigError, match="bucket 49x480x720; the shards hold 17x64x64, 17x64x96"):
        SATLatentDataset(two_bucket_dir, video_size=[480, 720], max_num_frames=49)


def test_bucket_selects_that_bucket_and_refuses_one_the_output_does_not_hold(two_bucket_dir: Path,
                                                                            encoded_dir: Path) -> None:
    """data.params.bucket picks the bucket: every item is of it; a bucket the shards do not hold (or not a bucket
    name) is refused naming those they hold, also where the output holds just one."""
    for bucket, count in (("17x64x64", 2), ("17x64x96", 8)):
        dataset = SATLatentDataset(two_bucket_dir, bucket=bucket, shuffle=False, sample_posterior=False)
        assert dataset.bucket == bucket and len(dataset) == count
        latents = [dataset[i]["mp4"] for i in range(count)]
        assert {tuple(t.shape[-2:]) for t in latents} == {(8, 8) if bucket == "17x64x64" else (8, 12)}
    for root, held in ((two_bucket_dir, "17x64x64, 17x64x96"), (encoded_dir, "17x64x96")):
        with pytest.raises(ConfigError, match=f"bucket 49x480x720: the shards hold {held}"):
            SATLatentDataset(root, bucket="49x480x720")
        with pytest.raises(ConfigError, match=f"not FRAMESxHEIGHTxWIDTH; the shards hold {held}"):
            SATLatentDataset(root, bucket="480x720")
    with pytest.raises(ConfigError, match="disagrees with video_size"):
        SATLatentDataset(two_bucket_dir, bucket="17x64x64", video_size=[64, 96], max_num_frames=17)


def test_check_config_checks_the_bucket_the_dataset_reads(encoded_dir: Path, two_bucket_dir: Path,
                                                          tmp_path: Path) -> None:
    """check-config reads data.params.bucket as the dataset does: a bucket the shards lack is a problem naming those
    they hold; with one chosen, the other buckets are not the config's concern."""
    tree = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    params = {**tree["data"].get("params", {}), "bucket": "49x480x720"}
    (p,) = _problems(encoded_dir, tmp_path, data={"params": params})
    assert "data.params.bucket: 49x480x720, the shards hold 17x64x96" in p
    assert _problems(encoded_dir, tmp_path, data={"params": {**params, "bucket": "17x64x96"}}) == []
    mixed = _problems(two_bucket_dir, tmp_path)
    chosen = _problems(two_bucket_dir, tmp_path, data={"params": {**params, "bucket": "17x64x96"}})
    assert any("bucket 17x64x64" in p for p in mixed) and not any("17x64x64" in p for p in chosen)


def test_sat_refuses_a_config_that_does_not_fit_before_training(encoded_dir: Path, tmp_path: Path) -> None:
    tree = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    tree["model"]["latent_input"] = False
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="conv error"):
        SATLatentDataset.create_dataset_function(str(encoded_dir), _args(base=[str(path)]), **PARAMS)


# ------------------------------------------------------------------------------------------------ check-config


def _problems(encoded_dir: Path, tmp_path: Path, model: dict | None = None, data: dict | None = None) -> list[str]:
    tree = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    tree["model"].update(model or {})
    tree["data"].update(data or {})
    tree["model"] = {k: v for k, v in tree["model"].items() if v is not None}
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(tree))
    return config_problems(load_trainer_config(path), Manifest.read(encoded_dir))


def test_check_config_names_each_sat_mismatch_and_its_consequence(encoded_dir: Path, tmp_path: Path) -> None:
    assert _problems(encoded_dir, tmp_path) == []
    (p,) = _problems(encoded_dir, tmp_path, {"latent_input": False})
    assert "model.latent_input: False" in p and "3 RGB channels" in p and "conv error" in p
    (p,) = _problems(encoded_dir, tmp_path, {"latent_input": None})
    assert "SAT defaults to False" in p and "conv error" in p
    # The stock pairing of cogvideox1.5_5b.yaml (latent_input: true) with sft.yaml's SFTDataset.
    (p,) = _problems(encoded_dir, tmp_path, data={"target": "data_video.SFTDataset"})
    assert "3-channel RGB" in p and "Fix: set data.target: latentcache.sat.SATLatentDataset" in p
    (p,) = _problems(encoded_dir, tmp_path, {"latent_input": False}, {"target": "data_video.SFTDataset"})
    assert "never reads these 16-channel latent shards" in p
    (p,) = _problems(encoded_dir, tmp_path, {"scale_factor": 0.7})
    assert "scale_factor: 0.7, the shards' VAE scaling factor is 1.15258" in p and "z x 0.7 where" in p
    (p,) = _problems(encoded_dir, tmp_path, {"scale_factor": None})
    assert "SAT defaults to 1.0" in p
    # LatentShardDataset normalises by default: SAT's scale_factor then scales a second time.
    (p,) = _problems(encoded_dir, tmp_path, data={"target": "latentcache.LatentShardDataset"})
    assert "z x 1.328 where it expects z x 1.15258" in p
    assert _problems(encoded_dir, tmp_path, data={"target": "latentcache.LatentShardDataset",
                                                  "params": {"normalize": False}}) == []


def test_check_config_cli_on_the_full_size_example(encoded_dir: Path, capsys) -> None:
    config = EXAMPLE_CONFIG.parent / "cogvideox_2b_sat.yaml"
    assert main(["check-config", str(config), "--data", str(encoded_dir)]) == 2
    out = capsys.readouterr().out
    # The 2B config fits 49x480x720 shards; against the tiny ones only sizes differ, never input or scale.
    assert "num_frames: 49" in out and "latent_input" not in out and "scale_factor" not in out


@pytest.mark.parametrize(("params", "name"), [({"fps": float("nan")}, "fps"), ({"fps": float("inf")}, "fps"),
                                              ({"fps": -8}, "fps"), ({"max_num_frames": 1e999}, "max_num_frames"),
                                              ({"video_size": [64, -96], "max_num_frames": 17}, r"video_size\[1\]"),
                                              ({"seed": float("nan")}, "seed"),
                                              ({"shuffle_buffer": float("inf")}, "shuffle_buffer")])
def test_bad_numbers_are_refused_naming_them(encoded_dir: Path, params: dict, name: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=name):
        SATLatentDataset(encoded_dir, **params)
