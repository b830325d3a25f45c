"""The whole slice on real video and real tars: encode a mixed mp4/webm folder, read it back, refuse bad data."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader

from latentcache import LatentMismatchError, LatentShardDataset, ShardFormatError
from latentcache.cli import main
from latentcache.format.manifest import read_manifest
from latentcache.format.reader import iter_tar
from latentcache.tools.verify import verify

TINY_ARGS = ["--vae", "tiny-random-cogvideox", "--frames", "17", "--fps", "8", "--height", "64", "--width", "96"]


@pytest.fixture(scope="module")
def encoded(video_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    assert main(["encode", str(video_dir), "--out", str(out), "--samples-per-shard", "1", *TINY_ARGS]) == 0
    return out


def test_manifest_describes_every_shard(encoded):
    manifest = read_manifest(encoded)
    assert manifest["counts"] == {"samples": 4, "shards": 4, "planned_clips": 4, "skipped": 0, "failed": 0,
                                  "skipped_by_reason": {}, "failed_by_reason": {}}
    assert manifest["latent_spec"]["channels"] == 16
    assert manifest["latent_spec"]["scaling_factor"] == pytest.approx(1.15258426)
    assert manifest["latent_spec"]["frame_rule"] == "4k+1"
    assert manifest["vae"]["random_weights"] is True
    assert manifest["buckets"] == {"17x64x96": 4}
    assert verify(encoded).problems == []
    for shard in manifest["shards"]:
        assert (encoded / shard["path"]).stat().st_size == shard["bytes"]
    assert not list(encoded.rglob("*.tmp"))


def test_shard_members_are_safetensors_json_and_captions(encoded):
    samples = [s for shard in sorted((encoded / "shards").rglob("*.tar")) for s in iter_tar(shard)]
    assert len(samples) == 4
    captions = {json.loads(s["json"])["source"]: s.get("txt") for s in samples}
    assert captions["a_h264.mp4"] == b"a red square crosses the frame"
    assert captions["b_vp9.webm"] is None
    for s in samples:
        assert set(s) <= {"__key__", "json", "latents.safetensors", "txt"}
        tensors = load_safetensors(s["latents.safetensors"])
        assert tensors["mean"].shape == tensors["logvar"].shape == (16, 5, 8, 12)
        meta = json.loads(s["json"])
        # Each frame taken is the one on screen at its target time i/8 s: at most one source frame earlier.
        for target, taken in zip([i / 8 for i in range(17)], meta["frame_times"], strict=True):
            assert 0 <= target - taken < 1 / meta["source_fps"] + 1e-6
        assert meta["vae"]["class_name"] == "AutoencoderKLCogVideoX" and meta["dtype"] == "float32"


def test_dataset_returns_what_was_written_bit_for_bit(encoded):
    written = {s["__key__"]: load_safetensors(s["latents.safetensors"])["mean"]
               for shard in (encoded / "shards").rglob("*.tar") for s in iter_tar(shard)}
    raw = LatentShardDataset(encoded, sample_posterior=False, normalize=False)
    for sample in raw:
        assert torch.equal(sample["latents"], written[sample["key"]])
    scaled = LatentShardDataset(encoded, sample_posterior=False)
    for sample in scaled:
        assert torch.allclose(sample["latents"], written[sample["key"]] * 1.15258426)


def test_posterior_sample_differs_per_epoch_but_is_reproducible(encoded):
    ds = LatentShardDataset(encoded, seed=1)
    first = {s["key"]: s["latents"] for s in ds}
    again = {s["key"]: s["latents"] for s in ds}
    ds.set_epoch(1)
    other = {s["key"]: s["latents"] for s in ds}
    key = next(iter(first))
    assert torch.equal(first[key], again[key]) and not torch.equal(first[key], other[key])


def test_two_dataloader_workers_see_every_sample_once(encoded):
    manifest = read_manifest(encoded)
    assert len(manifest["shards"]) >= 3
    loader = DataLoader(LatentShardDataset(encoded), batch_size=None, num_workers=2)
    keys = [s["key"] for s in loader]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == manifest["counts"]["samples"]


def test_batches_are_stacked_in_either_layout(encoded):
    batch = next(iter(LatentShardDataset(encoded, batch_size=2)))
    assert batch["latents"].shape == (2, 16, 5, 8, 12)
    batch = next(iter(LatentShardDataset(encoded, batch_size=2, layout="BTCHW")))
    assert batch["latents"].shape == (2, 5, 16, 8, 12)


def test_wrong_channel_count_is_refused(encoded):
    with pytest.raises(LatentMismatchError, match="16 channels.*expects 4"):
        LatentShardDataset(encoded, expected_channels=4)


def test_a_folder_of_videos_is_refused_as_pixels(video_dir):
    with pytest.raises(LatentMismatchError, match="3-channel RGB pixels.*latentcache encode"):
        LatentShardDataset(video_dir)


def _copy_with_extra_member(src: Path, dst: Path, name: str, data: bytes) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            tout.addfile(member, tin.extractfile(member))
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tout.addfile(info, io.BytesIO(data))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_member_is_refused_without_running_it(encoded, tmp_path):
    import shutil

    crafted = tmp_path / "crafted"
    shutil.copytree(encoded, crafted)
    shard = crafted / read_manifest(crafted)["shards"][0]["path"]
    key = next(iter_tar(shard))["__key__"]
    marker = tmp_path / "pwned"
    _copy_with_extra_member(shard, shard.with_suffix(".new"), f"{key}.pyd", pickle.dumps(_Exploit(marker)))
    shard.with_suffix(".new").replace(shard)
    # A stranger's dataset lists its crafted shard's size and sha256: the member itself must be refused.
    manifest = json.loads((crafted / "manifest.json").read_text())
    manifest["shards"][0].update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"pyd.*Refusing"):
        list(LatentShardDataset(crafted))
    assert not marker.exists()


def test_cli_exit_codes(video_dir, tmp_path, capsys):
    assert main(["encode", str(video_dir), "--out", str(tmp_path / "a"), *TINY_ARGS[:2], "--frames", "16"]) == 2
    assert "4k+1" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "fine.mp4").write_bytes((video_dir / "a_h264.mp4").read_bytes())
    (tmp_path / "in" / "broken.mp4").write_bytes(b"not a video at all")
    assert main(["encode", str(tmp_path / "in"), "--out", str(tmp_path / "b"), *TINY_ARGS]) == 3
    failures = [json.loads(line) for line in (tmp_path / "b" / "failures.jsonl").read_text().splitlines()]
    assert [f["path"].endswith("broken.mp4") for f in failures] == [True]
    assert read_manifest(tmp_path / "b")["counts"]["samples"] == 1
