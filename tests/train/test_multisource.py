"""One LatentShardDataset over several `latentcache encode` outputs (real videos, tiny random VAE, real tars)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from latentcache import LatentMismatchError, LatentShardDataset, ShardFormatError
from latentcache.format.manifest import read_manifest
from latentcache.format.reader import iter_tar
from latentcache.train.resume import StatefulLoader
from tests.conftest import ENCODE_TINY


def all_keys(root: Path) -> list[str]:
    """Every key, read straight from the shards' tars (not through the dataset under test)."""
    return [raw["__key__"] for s in read_manifest(root)["shards"] for raw in iter_tar(root / s["path"])]


def keys_of(items) -> list[str]:
    out = []
    for item in items:
        out.extend(item["key"] if isinstance(item["key"], list) else [item["key"]])
    return out


@pytest.fixture(scope="module")
def second_output(video_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another encode with the same VAE: video_dir/sub at 64x64 (another bucket), 2 clips in 2 shards."""
    from latentcache.cli import main

    out = tmp_path_factory.mktemp("second") / "out"
    args = [a if a != "96" else "64" for a in ENCODE_TINY]
    assert main(["encode", str(video_dir / "sub"), "--out", str(out), "--clips", "uniform:2",
                 "--samples-per-shard", "1", *args]) == 0
    return out


def _edited(root: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("workers", [0, 2])
def test_without_weights_every_sample_once_per_epoch(encoded_dir: Path, second_output: Path, workers: int) -> None:
    expected = all_keys(encoded_dir) + all_keys(second_output)
    assert len(expected) == 10 and not set(all_keys(encoded_dir)) & set(all_keys(second_output))
    per_rank = []
    for rank in range(2):
        dataset = LatentShardDataset([encoded_dir, second_output], rank=rank, world_size=2, shuffle=True, seed=3)
        assert dataset.num_samples == 10 and len(dataset.sources) == 2
        per_rank.append(keys_of(StatefulLoader(dataset, num_workers=workers)))
    assert Counter(per_rank[0] + per_rank[1]) == Counter(expected)


def test_bucketed_batches_across_sources(encoded_dir: Path, second_output: Path) -> None:
    """17x64x96 from one output, 17x64x64 from the other: each batch holds one bucket, every sample once."""
    for weights in (None, [1.0, 1.0]):
        dataset = LatentShardDataset([encoded_dir, second_output], batch_size=2, weights=weights, shuffle=True,
                                     shuffle_buffer=4)
        batches = list(dataset)
        for batch in batches:
            assert len({m["bucket"] for m in batch["meta"]}) == 1
            assert batch["latents"].shape[0] == len(batch["key"])
        assert {tuple(b["latents"].shape[-2:]) for b in batches} == {(8, 12), (8, 8)}
        if weights is None:
            assert Counter(keys_of(batches)) == Counter(all_keys(encoded_dir) + all_keys(second_output))
        assert sum(len(b["key"]) for b in batches) == 10  # a weighted epoch is as long as an unweighted one


def test_weighted_mixing_is_deterministic_per_seed_and_epoch(encoded_dir: Path, second_output: Path) -> None:
    first, second = set(all_keys(encoded_dir)), set(all_keys(second_output))

    def epoch(weights, seed: int, number: int) -> list[str]:
        dataset = LatentShardDataset([encoded_dir, second_output], weights=weights, seed=seed, shuffle=True)
        dataset.set_epoch(number)
        return keys_of(dataset)

    mix = epoch([1, 1], 0, 0)
    assert mix == epoch([1, 1], 0, 0)
    assert len({tuple(epoch([1, 1], 0, e)) for e in range(4)} | {tuple(epoch([1, 1], 1, 0))}) > 2
    assert len(mix) == 10 and set(mix) & first and set(mix) & second
    assert set(epoch([1, 0], 0, 0)) == first  # weight 0: never drawn; the other source repeats to fill the epoch
    only_second = epoch([0, 1], 0, 0)
    assert Counter(only_second) == Counter({k: 5 for k in second})  # 10 draws from 2 samples: each one 5 times


def test_a_repeated_sample_gets_fresh_noise(encoded_dir: Path, second_output: Path) -> None:
    dataset = LatentShardDataset([encoded_dir, second_output], weights=[0, 1], seed=2)
    seen: dict[str, list[torch.Tensor]] = {}
    for item in dataset:
        seen.setdefault(item["key"], []).append(item["latents"])
    for latents in seen.values():
        assert len(latents) == 5
        assert all(not torch.equal(latents[0], other) for other in latents[1:])


@pytest.mark.parametrize("weights", [None, [2.0, 1.0]])
def test_resume_with_workers(encoded_dir: Path, second_output: Path, weights) -> None:
    def make() -> LatentShardDataset:
        dataset = LatentShardDataset([encoded_dir, second_output], weights=weights, batch_size=2, shuffle=True,
                                     shuffle_buffer=3, seed=7)
        dataset.set_epoch(2)
        return dataset

    full = [(b["key"], b["latents"]) for b in StatefulLoader(make(), num_workers=2)]
    loader = StatefulLoader(make(), num_workers=2)
    head = []
    for item in loader:
        head.append((item["key"], item["latents"]))
        if len(head) == 2:
            break
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["weights"] == weights
    resumed = StatefulLoader(make(), num_workers=2)
    resumed.load_state_dict(state)
    rest = [(b["key"], b["latents"]) for b in resumed]
    assert [k for k, _ in head + rest] == [k for k, _ in full]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full, head + rest, strict=True))
    other = LatentShardDataset([encoded_dir, second_output], weights=[1.0, 1.0], batch_size=2, shuffle=True,
                               shuffle_buffer=3, seed=7)
    with pytest.raises(ValueError, match="weights"):
        StatefulLoader(other).load_state_dict(state)


def test_different_latent_spec_is_refused_naming_it(encoded_dir: Path, second_output: Path, tmp_path: Path) -> None:
    def rescale(manifest):
        manifest["latent_spec"]["scaling_factor"] = 0.5

    other = _edited(second_output, tmp_path, rescale)
    with pytest.raises(LatentMismatchError, match=r"latent_spec scaling_factor is 1\.15\d* vs 0\.5"):
        LatentShardDataset([encoded_dir, other])


def test_different_vae_weights_are_refused(encoded_dir: Path, second_output: Path, tmp_path: Path) -> None:
    """Same class, config and spec, other weights files: latents of two different VAEs, never mixed."""
    def weights(digest: str):
        def change(manifest):
            manifest["vae"].update(random_weights=False, source="org/model",
                                   weights={"vae/diffusion_pytorch_model.safetensors": digest * 64})
        return change

    a = _edited(encoded_dir, tmp_path / "a", weights("a"))
    b = _edited(second_output, tmp_path / "b", weights("b"))
    with pytest.raises(LatentMismatchError, match=r"vae weights sha256 is .*aaaa.* vs .*bbbb.*do not mix"):
        LatentShardDataset([a, b])
    same = _edited(second_output, tmp_path / "c", weights("a"))
    assert LatentShardDataset([a, same]).num_samples == 10
    revised = _edited(same, tmp_path / "d", lambda m: m["vae"].update(revision="abc123"))
    with pytest.raises(LatentMismatchError, match="vae revision is None vs 'abc123'"):
        LatentShardDataset([a, revised])


def test_list_of_shard_files_is_one_source(encoded_dir: Path, second_output: Path) -> None:
    shards = [str(encoded_dir / s["path"]) for s in read_manifest(encoded_dir)["shards"]]
    dataset = LatentShardDataset(shards[:2])
    assert len(dataset.sources) == 1 and keys_of(dataset) == all_keys(encoded_dir)[:4]
    with pytest.raises(ShardFormatError, match="not an output directory"):
        LatentShardDataset([encoded_dir, shards[0]])
    with pytest.raises(ValueError, match="3 weights for 2 sources"):
        LatentShardDataset([encoded_dir, second_output], weights=[1, 1, 1])
    with pytest.raises(ShardFormatError, match="leave manifest= out"):
        LatentShardDataset([encoded_dir, second_output], manifest=encoded_dir)


@pytest.mark.parametrize("workers", [0, 2])
def test_weighted_epochs_are_equal_on_every_rank(encoded_dir: Path, second_output: Path, workers: int) -> None:
    """The second output (2 samples) is smaller than 2 ranks x 2 workers: a slot whose share of it was empty ended
    its epoch the first time it was drawn (rank 1: [1, 1, 1, 0, 1] samples over seeds 0-4). Every slot now draws
    ceil(10 / slots) samples; a slot with an empty share of an output reads that whole output."""
    slots = 2 * max(1, workers)
    for seed in range(5):
        lengths = []
        for rank in range(2):
            dataset = LatentShardDataset([encoded_dir, second_output], weights=[1, 1], rank=rank, world_size=2,
                                         shuffle=True, seed=seed)
            keys = keys_of(StatefulLoader(dataset, num_workers=workers))
            assert set(keys) <= set(all_keys(encoded_dir)) | set(all_keys(second_output))
            lengths.append(len(keys))
        assert lengths == [-(-10 // slots) * max(1, workers)] * 2, (seed, lengths)


@pytest.mark.parametrize("weights", [[1e308, 1e308], [float("inf"), 1], [float("nan"), 1], [1, -1], ["x", 1]])
def test_bad_weights_are_refused(encoded_dir: Path, second_output: Path, weights) -> None:
    if weights == [1e308, 1e308]:  # accepted, and output 0 is read (the overflowed sum never drew it)
        keys = keys_of(LatentShardDataset([encoded_dir, second_output], weights=weights, seed=1))
        assert len(keys) == 10 and set(keys) & set(all_keys(encoded_dir))
        return
    with pytest.raises(ValueError, match=r"weights.*(not a number|finite, non-negative)"):
        LatentShardDataset([encoded_dir, second_output], weights=weights)


def test_the_same_output_twice_is_refused(encoded_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(encoded_dir.parent)
    name = encoded_dir.name
    with pytest.raises(ShardFormatError, match=rf"same output is given twice \('{name}' and './{name}/'"):
        LatentShardDataset([name, f"./{name}/"])
    (tmp_path / "link").symlink_to(encoded_dir)
    with pytest.raises(ShardFormatError, match="same output is given twice"):
        LatentShardDataset([encoded_dir, tmp_path / "link"])
    shard = str(encoded_dir / read_manifest(encoded_dir)["shards"][0]["path"])
    with pytest.raises(ShardFormatError, match="same shard is given twice"):
        LatentShardDataset([shard, shard.replace(f"/{name}/", f"/{name}/./")])


def test_a_link_to_another_outputs_shard_is_not_read_twice(encoded_dir: Path, second_output: Path,
                                                           tmp_path: Path) -> None:
    """A shard of one output that is a symlink to a shard of the other: combining them would give that shard's
    samples twice per epoch. Refused (by its resolved path here, or as a link by the shard reader)."""
    copy = tmp_path / "linked"
    shutil.copytree(second_output, copy)
    target = encoded_dir / read_manifest(encoded_dir)["shards"][0]["path"]
    link = copy / read_manifest(copy)["shards"][0]["path"]
    link.unlink()
    link.symlink_to(target)
    with pytest.raises(ShardFormatError, match="same shard is given twice|link"):
        list(LatentShardDataset([encoded_dir, copy]))


@pytest.fixture(scope="module")
def paired_output(video_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """video_dir/sub encoded like encoded_dir (17x64x96, 2 samples a shard): shards of about its shards' size."""
    from latentcache.cli import main

    out = tmp_path_factory.mktemp("paired") / "out"
    assert main(["encode", str(video_dir / "sub"), "--out", str(out), "--clips", "uniform:2",
                 "--samples-per-shard", "2", *ENCODE_TINY]) == 0
    return out


@pytest.mark.parametrize("resampled", [False, True])
def test_interleaved_sources_each_read_their_own_shard_bytes(encoded_dir: Path, paired_output: Path,
                                                             resampled: bool) -> None:
    """A weighted mix reads a shard of one output while a shard of the other is half delivered: each sample is still
    the one its own shard holds (one shard buffer shared by the two streams was overwritten under the first)."""
    expected = {}
    for root in (encoded_dir, paired_output):
        for item in LatentShardDataset(root, sample_posterior=False, normalize=False):
            expected[item["key"]] = item["latents"]
    assert len(expected) == 10
    for sources in ([encoded_dir, paired_output], [paired_output, encoded_dir]):
        dataset = LatentShardDataset(sources, weights=[1.0, 1.0], sample_posterior=False, normalize=False,
                                     resampled=resampled, epoch_items=24 if resampled else None)
        items = list(dataset)
        assert len(items) == (24 if resampled else 10)
        assert {i["key"] for i in items} <= set(expected)
        assert all(torch.equal(i["latents"], expected[i["key"]]) for i in items)
