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


# ------------------------------------------------------------------ issue 22.1: full batches at any dataset size


def test_default_chunk_size_follows_the_input_count_and_the_world_size():
    from latentcache.encode.job_plan import auto_chunk_size

    assert auto_chunk_size(24) == 24  # one process: one chunk, so batches fill
    assert auto_chunk_size(24, 2) == 12  # every rank has work
    assert auto_chunk_size(1000, 8) == 64  # no chunk cut below 64 for balance
    assert auto_chunk_size(3, 8) == 1  # more ranks than inputs: one each
    assert auto_chunk_size(100_000, 8) == 1000 and auto_chunk_size(10_000_000) == 1000
    assert auto_chunk_size(12_800, 8) == 400  # 4 chunks a rank where they stay long enough


def _batch_sizes(monkeypatch) -> list[int]:
    from latentcache.encode.models.vae import VideoVAE

    sizes: list[int] = []
    real = VideoVAE.encode

    def spy(self, frames, **kw):
        sizes.append(len(frames))
        return real(self, frames, **kw)

    monkeypatch.setattr(VideoVAE, "encode", spy)
    return sizes


def test_a_small_folder_at_default_flags_is_one_shard_of_full_batches(small_videos, tmp_path, monkeypatch):
    """Issue 22.1: 6 videos (plus one broken file), one process, default chunking and shard size: one chunk, one
    shard, and batches as big as --batch-size asks (they were 6 one-sample shards with batches of 1)."""
    sizes = _batch_sizes(monkeypatch)
    out = tmp_path / "out"
    assert main(["encode", str(small_videos), "--out", str(out), "--workers", "0", "--clips", "first",
                 "--batch-size", "4", *TINY_ARGS]) == 3  # 3: broken.mp4 is a failure record
    assert len(list((out / "shards").rglob("*.tar"))) == 1
    assert sorted(sizes, reverse=True) == [4, 2]


def test_batches_cross_shard_boundaries_of_one_bucket(small_videos, tmp_path, monkeypatch):
    sizes = _batch_sizes(monkeypatch)
    out = tmp_path / "out"
    assert main(["encode", str(small_videos), "--out", str(out), "--workers", "0", "--clips", "first",
                 "--samples-per-shard", "1", "--batch-size", "3", *TINY_ARGS]) == 3  # 3: broken.mp4 is a failure record
    assert len(list((out / "shards").rglob("*.tar"))) == 6
    assert sizes == [3, 3]


@pytest.mark.slow
def test_a_rerun_after_a_kill_inside_an_encode_group_writes_the_same_bytes(small_videos, tmp_path):
    """A batch spans two shards (batch 3 over shards of 2); kill -9 lands after the first shard's sidecar, so the
    rerun must encode that window again, whole, and write the other shards exactly as an uninterrupted run does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT, tree_bytes

    from latentcache.format.shards import PAUSE_ENV

    args = ["--workers", "0", "--clips", "first", "--samples-per-shard", "2", "--batch-size", "3", *TINY_ARGS]
    cmd = [sys.executable, "-c", "import sys; from latentcache.cli import main; sys.exit(main(sys.argv[1:]))",
           "encode", str(small_videos)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    reference, out, pause = tmp_path / "reference", tmp_path / "out", tmp_path / "pause"
    pause.mkdir()
    assert subprocess.run([*cmd, "--out", str(reference), *args], env=env, capture_output=True).returncode == 3
    proc = subprocess.Popen([*cmd, "--out", str(out), *args], env={**env, PAUSE_ENV: f"sidecar-written#1:{pause}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not list(pause.glob("*.reached")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(list(out.rglob("*.tar.json"))) == 1
    assert subprocess.run([*cmd, "--out", str(out), *args], env=env, capture_output=True).returncode == 3
    assert tree_bytes(out) == tree_bytes(reference)
