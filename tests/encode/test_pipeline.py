"""Encode options that change what is stored, and the decode-worker pipeline producing the same bytes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors

from latentcache import LatentShardDataset
from latentcache.cli import main
from latentcache.format.manifest import read_manifest
from latentcache.format.reader import iter_tar

TINY_ARGS = ["--vae", "tiny-random-cogvideox", "--frames", "17", "--fps", "8", "--height", "64", "--width", "96"]


def _tensors(out) -> dict[str, dict[str, torch.Tensor]]:
    return {s["__key__"]: load_safetensors(s["latents.safetensors"])
            for shard in sorted((out / "shards").rglob("*.tar")) for s in iter_tar(shard)}


def test_store_mean_in_fp16_halves_and_halves_again(video_dir, tmp_path):
    full, small = tmp_path / "full", tmp_path / "small"
    assert main(["encode", str(video_dir), "--out", str(full), "--workers", "0", *TINY_ARGS]) == 0
    assert main(["encode", str(video_dir), "--out", str(small), "--workers", "0", "--store", "mean",
                 "--store-dtype", "fp16", *TINY_ARGS]) == 0
    posterior, mean_only = _tensors(full), _tensors(small)
    assert posterior.keys() == mean_only.keys()
    for key, tensors in mean_only.items():
        assert set(tensors) == {"mean"} and tensors["mean"].dtype == torch.float16
        assert torch.equal(tensors["mean"], posterior[key]["mean"].half())
    latent_bytes = {name: sum(t.numel() * t.element_size() for ts in d.values() for t in ts.values())
                    for name, d in (("full", posterior), ("small", mean_only))}
    assert latent_bytes["small"] * 4 == latent_bytes["full"]
    # A mean-only dataset streams the mean (there is no posterior to sample from).
    sample = next(iter(LatentShardDataset(small, normalize=False)))
    assert torch.equal(sample["latents"], mean_only[sample["key"]]["mean"].float())


@pytest.mark.slow
def test_decode_workers_write_the_same_bytes_as_the_main_process(video_dir, tmp_path):
    a, b = tmp_path / "serial", tmp_path / "workers"
    assert main(["encode", str(video_dir), "--out", str(a), "--workers", "0", "--samples-per-shard", "2",
                 *TINY_ARGS]) == 0
    assert main(["encode", str(video_dir), "--out", str(b), "--workers", "2",
                 "--samples-per-shard", "2", *TINY_ARGS]) == 0
    shards_a, shards_b = read_manifest(a)["shards"], read_manifest(b)["shards"]
    assert [s["sha256"] for s in shards_a] == [s["sha256"] for s in shards_b]


def test_batched_encode_matches_one_clip_at_a_time_to_float_precision(video_dir, tmp_path):
    """Batching changes the order of float sums (not bit-identical), never the values beyond rounding."""
    a, b = tmp_path / "one", tmp_path / "batched"
    assert main(["encode", str(video_dir), "--out", str(a), "--workers", "0", *TINY_ARGS]) == 0
    assert main(["encode", str(video_dir), "--out", str(b), "--workers", "0", "--batch-size", "3", *TINY_ARGS]) == 0
    one, batched = _tensors(a), _tensors(b)
    assert one.keys() == batched.keys()
    for key in one:
        assert torch.allclose(one[key]["mean"], batched[key]["mean"], atol=1e-4, rtol=1e-3)
