"""LatentShardDataset on shards written by `latentcache encode` (tiny random VAE, real videos)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from latentcache import LatentMismatchError, LatentShardDataset, ShardFormatError
from latentcache.format.manifest import read_manifest
from latentcache.format.reader import decode_sample, iter_tar
from latentcache.format.shards import EncodedClip, write_shard
from latentcache.format.spec import LatentSpec
from latentcache.train.guard import transformer_problems
from latentcache.train.resume import StatefulLoader


def all_keys(root: Path) -> list[str]:
    """Every key, read straight from the shards' tars (not through the dataset under test)."""
    manifest = read_manifest(root)
    return [raw["__key__"] for s in manifest["shards"] for raw in iter_tar(root / s["path"])]


def keys_of(items) -> list[str]:
    out = []
    for item in items:
        out.extend(item["key"] if isinstance(item["key"], list) else [item["key"]])
    return out


def test_every_sample_once_with_two_workers(encoded_dir: Path) -> None:
    expected = all_keys(encoded_dir)
    assert len(expected) == 8 and len(read_manifest(encoded_dir)["shards"]) == 4
    loader = StatefulLoader(LatentShardDataset(encoded_dir), num_workers=2)
    got = keys_of(loader)
    assert Counter(got) == Counter(expected)


def test_items_carry_no_bookkeeping_keys(encoded_dir: Path) -> None:
    """What a trainer receives holds its data only: the loader's (slot, index) tags never reach it."""
    wanted = {"latents", "key", "meta", "caption"}
    for items in (StatefulLoader(LatentShardDataset(encoded_dir, batch_size=2), num_workers=2),
                  StatefulLoader(LatentShardDataset(encoded_dir)), LatentShardDataset(encoded_dir)):
        for item in items:
            assert set(item) == wanted


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_two_ranks_split_without_overlap(encoded_dir: Path, workers: int) -> None:
    """2 ranks x 0/2/3 workers over 4 shards: shard-level split (2, 4 slots) or sample-level fallback (6 slots)."""
    expected = all_keys(encoded_dir)
    per_rank = []
    for rank in range(2):
        dataset = LatentShardDataset(encoded_dir, rank=rank, world_size=2, shuffle=True, seed=5)
        per_rank.append(keys_of(StatefulLoader(dataset, num_workers=workers)))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == Counter(expected)


def test_rank_from_environment(encoded_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    for rank in range(3):  # 3 ranks, 4 shards: one rank gets two shards
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        seen.append(keys_of(LatentShardDataset(encoded_dir)))
    assert sorted(len(s) for s in seen) == [2, 2, 4]
    assert Counter(sum(seen, [])) == Counter(all_keys(encoded_dir))


def test_sources_glob_brace_file_url_and_manifest(encoded_dir: Path, tmp_path: Path) -> None:
    bucket_dir = encoded_dir / "shards" / "17x64x96"
    expected = all_keys(encoded_dir)
    names = [Path(s["path"]).stem for s in read_manifest(encoded_dir)["shards"]]
    assert len(names) >= 3
    keys_in = {name: [raw["__key__"] for raw in iter_tar(bucket_dir / f"{name}.tar")] for name in names}
    assert keys_of(LatentShardDataset(str(bucket_dir / "*.tar"))) == expected
    assert keys_of(LatentShardDataset(str(bucket_dir / f"{{{','.join(names)}}}.tar"))) == expected
    middle = names[1:-1]
    assert keys_of(LatentShardDataset(f"file://{bucket_dir}/{{{','.join(middle)}}}.tar")) == \
        [k for name in middle for k in keys_in[name]]
    assert keys_of(LatentShardDataset([str(bucket_dir / f"{names[-1]}.tar")])) == keys_in[names[-1]]
    # Shards copied away from their manifest: found by manifest= only.
    elsewhere = tmp_path / "copy"
    shutil.copytree(bucket_dir, elsewhere)
    with pytest.raises(ShardFormatError, match="manifest"):
        LatentShardDataset(str(elsewhere / "*.tar"))
    dataset = LatentShardDataset(str(elsewhere / "*.tar"), manifest=encoded_dir / "manifest.json")
    assert keys_of(dataset) == expected and dataset.num_samples == 8
    with pytest.raises(ShardFormatError, match="remote"):
        LatentShardDataset("https://example.invalid/shards/{000000..000003}.tar")


def test_shard_not_in_manifest_is_refused(encoded_dir: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "shards" / "17x64x96" / "000099.tar"
    stranger.parent.mkdir(parents=True)
    shutil.copy(encoded_dir / read_manifest(encoded_dir)["shards"][0]["path"], stranger)
    with pytest.raises(ShardFormatError, match="not listed"):
        LatentShardDataset(str(stranger), manifest=encoded_dir)


def test_shuffle_is_seeded_by_seed_and_epoch(encoded_dir: Path) -> None:
    def order(seed: int, epoch: int) -> list[str]:
        dataset = LatentShardDataset(encoded_dir, shuffle=True, shuffle_buffer=4, seed=seed)
        dataset.set_epoch(epoch)
        return keys_of(dataset)

    assert order(1, 0) == order(1, 0)
    orders = {tuple(order(1, e)) for e in range(4)} | {tuple(order(2, 0))}
    assert len(orders) > 2
    assert all(sorted(o) == sorted(all_keys(encoded_dir)) for o in orders)


def test_batches_hold_one_bucket(two_bucket_dir: Path) -> None:
    dataset = LatentShardDataset(two_bucket_dir, batch_size=3, layout="BTCHW", shuffle=True, shuffle_buffer=10)
    batches = list(dataset)
    spec = dataset.spec
    for batch in batches:
        buckets = {m["bucket"] for m in batch["meta"]}
        assert len(buckets) == 1
        frames, h, w = (int(v) for v in buckets.pop().split("x"))
        c, t, lh, lw = spec.latent_shape(frames, h, w)
        assert batch["latents"].shape == (len(batch["key"]), t, c, lh, lw)
    assert Counter(keys_of(batches)) == Counter(all_keys(two_bucket_dir))
    assert {tuple(b["latents"].shape[-2:]) for b in batches} == {(8, 12), (8, 8)}
    full = list(LatentShardDataset(two_bucket_dir, batch_size=3, drop_last=True))
    assert all(len(b["key"]) == 3 for b in full) and len(full) == 2  # 8 // 3 + 2 // 3


def test_posterior_normalisation_and_dtype(encoded_dir: Path) -> None:
    manifest = read_manifest(encoded_dir)
    spec = LatentSpec.from_dict(manifest["latent_spec"])
    shard = encoded_dir / manifest["shards"][0]["path"]
    raw = decode_sample(next(iter_tar(shard)), str(shard))
    mean = LatentShardDataset(encoded_dir, sample_posterior=False)
    first = next(iter(mean))
    assert first["key"] == raw["key"]
    torch.testing.assert_close(first["latents"], spec.normalize(raw["mean"].float()))  # scaled exactly once
    assert spec.scaling_factor and not torch.allclose(first["latents"], raw["mean"].float())
    unscaled = next(iter(LatentShardDataset(encoded_dir, sample_posterior=False, normalize=False)))
    torch.testing.assert_close(unscaled["latents"], raw["mean"].float())

    sampled = LatentShardDataset(encoded_dir, dtype=torch.bfloat16)
    epoch0, again = next(iter(sampled))["latents"], next(iter(sampled))["latents"]
    sampled.set_epoch(1)
    epoch1 = next(iter(sampled))["latents"]
    assert epoch0.dtype == torch.bfloat16
    assert torch.equal(epoch0, again)  # reproducible within an epoch
    assert not torch.equal(epoch0, epoch1)  # fresh noise each epoch
    assert not torch.allclose(epoch0.float(), first["latents"], atol=1e-3)


def _rest_after_resume(make, k: int, workers: int) -> tuple[list, list]:
    """Uninterrupted run vs (k items, save, rebuild, load, rest): both as (key, latents) lists."""
    full = [(b["key"], b["latents"]) for b in StatefulLoader(make(), num_workers=workers)]
    loader = StatefulLoader(make(), num_workers=workers)
    head = []
    for item in loader:
        head.append((item["key"], item["latents"]))
        if len(head) == k:
            break
    state = json.loads(json.dumps(loader.state_dict()))  # a checkpoint round trip
    resumed = StatefulLoader(make(), num_workers=workers)
    resumed.load_state_dict(state)
    rest = [(b["key"], b["latents"]) for b in resumed]
    return full, head + rest


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_does_not_replay(encoded_dir: Path, workers: int) -> None:
    def make() -> LatentShardDataset:
        dataset = LatentShardDataset(encoded_dir, batch_size=2, shuffle=True, shuffle_buffer=3, seed=7)
        dataset.set_epoch(3)
        return dataset

    full, resumed = _rest_after_resume(make, k=1 if workers == 0 else 2, workers=workers)
    assert [k for k, _ in resumed] == [k for k, _ in full]
    for (_, a), (_, b) in zip(full, resumed, strict=True):
        assert torch.equal(a, b)  # same posterior noise too


def test_resume_after_an_odd_batch_keeps_the_workers_turns(encoded_dir: Path) -> None:
    """Stopped after 3 batches of 2 workers (worker 0 gave two, worker 1 one): the resumed loader's first batch is
    worker 1's, as in the uninterrupted run, not worker 0's (DataLoader starts every iterator at worker 0)."""
    def make() -> LatentShardDataset:
        return LatentShardDataset(encoded_dir, shuffle=True, shuffle_buffer=3, seed=7)

    full, resumed = _rest_after_resume(make, k=3, workers=2)
    assert [k for k, _ in resumed] == [k for k, _ in full]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full, resumed, strict=True))


def test_resume_of_dataset_iterated_directly(encoded_dir: Path) -> None:
    make = lambda: LatentShardDataset(encoded_dir, shuffle=True, seed=1)  # noqa: E731
    full = keys_of(make())
    dataset, head = make(), []
    for item in dataset:
        head.append(item["key"])
        if len(head) == 3:
            break
    again = make()
    again.load_state_dict(dataset.state_dict())
    again.set_epoch(0)  # what a training loop does first: the same epoch keeps the resume position
    assert head + keys_of(again) == full
    assert len(keys_of(again)) == 8  # the skip applies to one pass only
    with pytest.raises(ValueError, match="seed"):
        LatentShardDataset(encoded_dir, shuffle=True, seed=2).load_state_dict(dataset.state_dict())


def test_resampled_is_endless_and_resumable(encoded_dir: Path) -> None:
    make = lambda: LatentShardDataset(encoded_dir, batch_size=2, resampled=True, seed=3)  # noqa: E731
    stream = iter(make())
    first = [next(stream)["key"] for _ in range(10)]  # 20 samples from 8: it never ends
    assert set(sum(first, [])) <= set(all_keys(encoded_dir))
    dataset = make()
    it = iter(dataset)
    head = [next(it)["key"] for _ in range(4)]
    again = make()
    again.load_state_dict(dataset.state_dict())
    it2 = iter(again)
    assert head + [next(it2)["key"] for _ in range(6)] == first


def test_count_and_checksum_mismatch(encoded_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "out"
    shutil.copytree(encoded_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][1]["samples"] = 3
    manifest["counts"]["samples"] = 9  # the manifest agrees with itself: the shard's own count is what is wrong
    (copy / "manifest.json").write_text(json.dumps(manifest))
    name = re.escape(Path(manifest["shards"][1]["path"]).name)
    with pytest.raises(ShardFormatError, match=rf"/{name}: 2 samples, the manifest lists 3"):
        list(LatentShardDataset(copy))
    manifest["shards"][1]["samples"], manifest["counts"]["samples"] = 2, 8
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shard = copy / manifest["shards"][2]["path"]
    data = bytearray(shard.read_bytes())
    data[data.index(b'"clip_index"') + 1] = ord("C")  # one byte of JSON metadata: still a valid tar
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match="sha256"):
        list(LatentShardDataset(copy))
    assert len(list(LatentShardDataset(copy, check_sha256=False))) == 8


def test_for_transformer_accepts_fitting_model(encoded_dir: Path) -> None:
    from latentcache.tools.demo import tiny_transformer

    model = tiny_transformer(5, 8, 12)
    dataset = LatentShardDataset.for_transformer(model, encoded_dir, batch_size=2, layout="BTCHW")
    batch = next(iter(dataset))
    with torch.no_grad():
        out = model(hidden_states=batch["latents"], encoder_hidden_states=torch.zeros(2, 8, 32),
                    timestep=torch.tensor([10, 500])).sample
    assert out.shape == batch["latents"].shape


def test_for_transformer_refuses_naming_numbers(encoded_dir: Path) -> None:
    from latentcache.tools.demo import tiny_transformer

    with pytest.raises(LatentMismatchError, match=r"in_channels=32 is twice the VAE's 16.*image-to-video"):
        LatentShardDataset.for_transformer(tiny_transformer(5, 8, 12, in_channels=32), encoded_dir)
    assert LatentShardDataset.for_transformer(tiny_transformer(5, 8, 12, in_channels=32), encoded_dir,
                                              image_to_video=True).spec.channels == 16
    with pytest.raises(LatentMismatchError, match=r"in_channels=4, the latents have 16 channels"):
        LatentShardDataset.for_transformer({"in_channels": 4}, encoded_dir)
    learned = {"in_channels": 16, "patch_size": 2, "sample_frames": 49, "sample_height": 60, "sample_width": 90,
               "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True}
    with pytest.raises(LatentMismatchError) as info:
        LatentShardDataset.for_transformer(learned, encoded_dir)
    for number in ("latent frames 5 vs the config's 13", "latent height 8 vs the config's 60",
                   "latent width 12 vs the config's 90", "encode at 49x480x720"):
        assert number in str(info.value)
    spec = LatentShardDataset(encoded_dir).spec
    odd = transformer_problems({"in_channels": 16, "patch_size": 3, "patch_size_t": 2}, spec, ["17x64x96"])
    assert any("latent height 8 is not a multiple of patch_size 3" in p for p in odd)
    assert any("5 latent frames is not a multiple of patch_size_t 2" in p for p in odd)
    rotary = dict(learned, use_learned_positional_embeddings=False)
    assert transformer_problems(rotary, spec, ["17x64x96"]) == []


def test_video_folder_is_not_latents(video_dir: Path) -> None:
    with pytest.raises(LatentMismatchError, match="latent_input: true"):
        LatentShardDataset(video_dir)


def test_epoch_items_gives_every_rank_the_same_number_of_steps(encoded_dir: Path) -> None:
    """3 ranks over 4 shards are uneven (one rank reads two shards); resampled + epoch_items evens the steps."""
    steps = []
    for rank in range(3):
        dataset = LatentShardDataset(encoded_dir, rank=rank, world_size=3, batch_size=2, resampled=True,
                                     epoch_items=5, seed=1)
        epoch0 = [batch["key"] for batch in dataset]
        dataset.set_epoch(1)
        epoch1 = [batch["key"] for batch in dataset]
        assert len(epoch0) == len(epoch1) == 5 and epoch0 != epoch1
        steps.append(len(epoch0))
    assert steps == [5, 5, 5]
    with pytest.raises(ValueError, match="epoch_items"):
        LatentShardDataset(encoded_dir, epoch_items=0)


def test_pad_frames_accepts_odd_latent_frames_for_patch_size_t(encoded_dir: Path) -> None:
    """CogVideoX 1.5 (patch_size_t 2) trains on 81 frames = 21 latent frames, padded in the step: on request."""
    spec = LatentShardDataset(encoded_dir).spec
    config = {"in_channels": 16, "patch_size": 2, "patch_size_t": 2}
    assert transformer_problems(config, spec, ["17x64x96"])
    assert transformer_problems(config, spec, ["17x64x96"], pad_frames=True) == []
    for in_channels in (16, 32, 33, 36):  # LTX/Wan 2.2 TI2V, CogVideoX I2V, HunyuanVideo I2V, Wan 2.1 I2V
        assert transformer_problems({"in_channels": in_channels}, spec, [], image_to_video=True) == []


def test_resampled_draws_fresh_noise_for_a_repeated_sample(encoded_dir: Path) -> None:
    dataset = LatentShardDataset(encoded_dir, resampled=True, epoch_items=24, seed=2)
    seen: dict[str, list[torch.Tensor]] = {}
    for item in dataset:
        seen.setdefault(item["key"], []).append(item["latents"])
    repeated = [v for v in seen.values() if len(v) > 1]
    assert repeated  # 24 draws from 8 samples
    assert all(not torch.equal(v[0], v[1]) for v in repeated)
    again = {}
    for item in LatentShardDataset(encoded_dir, resampled=True, epoch_items=24, seed=2):
        again.setdefault(item["key"], []).append(item["latents"])
    assert all(torch.equal(a, b) for k in seen for a, b in zip(seen[k], again[k], strict=True))  # reproducible


# ------------------------------------------------------------------ a shard is checked whole before it is handed out


def _copy(encoded_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(encoded_dir, copy)
    return copy


def _rewrite(root: Path, index: int, change, *, record: bool) -> Path:
    """Rewrite shard `index` with `change(EncodedClip)` applied to each sample (a valid tar, as the writer makes
    it); with `record`, list its new size and sha256 in the manifest, else leave the manifest as it was."""
    manifest = read_manifest(root)
    entry = manifest["shards"][index]
    path = root / entry["path"]
    clips = [change(EncodedClip(s["key"], s["mean"], s["logvar"], s["meta"], s["caption"]))
             for s in (decode_sample(raw, str(path)) for raw in iter_tar(path))]
    write_shard(path, clips)
    if record:
        entry["sha256"], entry["bytes"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
        (root / "manifest.json").write_text(json.dumps(manifest))
    return path


def _delivered(dataset: LatentShardDataset, error: str) -> list[dict]:
    """Items the dataset hands out before it raises `error`."""
    items = []
    with pytest.raises(ShardFormatError, match=error):
        for item in dataset:
            items.append(item)
    return items


def _poison(clip: EncodedClip) -> EncodedClip:
    clip.mean = clip.mean.clone()
    clip.mean[0, 0, 0, 0] = float("nan")
    return clip


def test_changed_shard_delivers_no_sample(encoded_dir: Path, tmp_path: Path) -> None:
    """The first shard is rewritten with a NaN in each sample and its sha256 no longer matches: nothing of it (no
    NaN) reaches the trainer; the checksum error comes first."""
    root = _copy(encoded_dir, tmp_path)
    _rewrite(root, 0, _poison, record=False)
    assert _delivered(LatentShardDataset(root), r"000000\.tar: sha256 .* the manifest lists") == []
    assert _delivered(LatentShardDataset(root, batch_size=2), "sha256") == []


def test_miscounted_shard_delivers_no_sample(encoded_dir: Path, tmp_path: Path) -> None:
    root = _copy(encoded_dir, tmp_path)
    manifest = read_manifest(root)
    manifest["shards"][0]["samples"] = 3
    manifest["counts"]["samples"] = 9  # the manifest agrees with itself: the shard's own count is what is wrong
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert _delivered(LatentShardDataset(root), r"000000\.tar: 2 samples, the manifest lists 3") == []


def test_truncated_shard_delivers_no_sample(encoded_dir: Path, tmp_path: Path) -> None:
    """Cut after its first sample's members (a tar that just stops): even unhashed, the good first sample stays in."""
    root = _copy(encoded_dir, tmp_path)
    shard = root / read_manifest(root)["shards"][0]["path"]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    first_key = members[0].name.split(".")[0]
    second = next(m for m in members if m.name.split(".")[0] != first_key)
    shard.write_bytes(shard.read_bytes()[: second.offset])
    assert _delivered(LatentShardDataset(root, check_sha256=False), "without its end-of-archive blocks") == []
    assert _delivered(LatentShardDataset(root), "sha256") == []


def test_shard_larger_than_the_manifest_says_is_refused_unread(encoded_dir: Path, tmp_path: Path) -> None:
    root = _copy(encoded_dir, tmp_path)
    entry = read_manifest(root)["shards"][1]
    with open(root / entry["path"], "ab") as f:
        f.write(bytes(1 << 20))
    name = re.escape(Path(entry["path"]).name)
    pattern = rf"/{name}: {entry['bytes'] + (1 << 20)} bytes, the manifest lists {entry['bytes']}"
    items = _delivered(LatentShardDataset(root, check_sha256=False), pattern)
    assert len(items) == 2  # shard 0 only


# ---------------------------------------------------------------- samples that verify refuses, the dataset refuses


BAD_SAMPLES = {
    # name: (change applied to each clip, what the error says)
    "shape not the bucket's": (lambda c: EncodedClip(c.key, c.mean[:, :1, :2, :2], c.logvar[:, :1, :2, :2], c.meta),
                               r"latents are \[16, 1, 2, 2\], bucket 17x64x96 and the manifest's VAE give "
                               r"\[16, 5, 8, 12\]"),
    "bool tensors": (lambda c: EncodedClip(c.key, c.mean > 0, c.logvar > 0, c.meta), "mean is torch.bool"),
    "int64 tensors": (lambda c: EncodedClip(c.key, c.mean.long(), c.logvar.long(), c.meta), "mean is torch.int64"),
    "logvar 1000": (lambda c: EncodedClip(c.key, c.mean, torch.full_like(c.logvar, 1000.0), c.meta),
                    r"logvar spans 1000\.\.1000, outside \[-30, 20\]"),
    "mean 3e38": (lambda c: EncodedClip(c.key, c.mean.float().index_fill(0, torch.tensor([1]), 3e38), c.logvar,
                                        c.meta), r"mean reaches 3e\+38: sampled and normalised .* overflows float32"),
    "NaN mean": (_poison, r"mean has 1 NaN/Inf value\(s\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_dataset_refuses_what_verify_refuses(encoded_dir: Path, tmp_path: Path, case: str, capsys) -> None:
    """One check, two callers: the same samples fail `latentcache verify` (exit 3) and never leave the dataset,
    whatever its settings, with the same message."""
    from latentcache.cli import main

    change, message = BAD_SAMPLES[case]
    root = _copy(encoded_dir, tmp_path)
    shard = _rewrite(root, 0, change, record=True)  # a consistent manifest: only the content is wrong
    for kwargs in ({}, {"sample_posterior": False}, {"normalize": False, "sample_posterior": False}):
        items = _delivered(LatentShardDataset(root, **kwargs), message)
        assert items == []
    with pytest.raises(ShardFormatError) as info:
        list(LatentShardDataset(root))
    assert str(shard) in str(info.value)
    assert main(["verify", str(root)]) == 3
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert all(str(shard) in p for p in problems) and sum(bool(re.search(message, p)) for p in problems) == 2
    # The dataset's message is verify's, word for word.
    assert str(info.value).split(". Run `latentcache verify`")[0].split(": sample ", 1)[1] in problems[0]


def test_extreme_but_fitting_values_stream_finite(encoded_dir: Path, tmp_path: Path) -> None:
    """The bounds are not too tight: logvar at diffusers' clamp ends and a large mean still stream, finite."""
    root = _copy(encoded_dir, tmp_path)
    hi = lambda c: EncodedClip(c.key, c.mean.float().clamp(-1, 1) * 1e30, torch.full_like(c.logvar, 20.0),  # noqa: E731
                               c.meta)
    _rewrite(root, 0, hi, record=True)
    _rewrite(root, 1, lambda c: EncodedClip(c.key, c.mean, torch.full_like(c.logvar, -30.0), c.meta), record=True)
    items = list(LatentShardDataset(root))
    assert len(items) == 8 and all(torch.isfinite(i["latents"]).all() for i in items)


@pytest.mark.parametrize(("kwargs", "name"), [({"shuffle_buffer": float("inf")}, "shuffle_buffer"),
                                              ({"seed": float("nan")}, "seed"), ({"world_size": 0}, "world_size"),
                                              ({"rank": 0.5, "world_size": 2}, "rank"),
                                              ({"epoch_items": float("inf")}, "epoch_items"),
                                              ({"batch_size": 2.5}, "batch_size")])
def test_bad_numbers_are_refused_naming_them(encoded_dir: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LatentShardDataset(encoded_dir, **kwargs)


def test_len_is_this_ranks_items_as_iterated(two_bucket_dir: Path) -> None:
    """len(dataset): this rank's samples, or batches when batching (one bucket each, short last ones unless
    drop_last), over its DataLoader workers, for the current epoch; compared with what each rank x worker slot
    really yields on 6 shards of unequal size in two buckets. A real DataLoader's len() agrees with its pass."""
    from torch.utils.data import DataLoader

    from latentcache.train.partition import Slot

    for world in (1, 2, 4):
        for rank in range(world):
            for workers in (0, 2, 4):
                for batch, drop in ((None, False), (3, False), (3, True)):
                    ds = LatentShardDataset(two_bucket_dir, rank=rank, world_size=world, num_workers=workers,
                                            batch_size=batch, drop_last=drop, shuffle=True, seed=3)
                    ds.set_epoch(1)
                    seen = sum(1 for w in range(max(1, workers))
                               for _ in ds.iter_slot(Slot.of(rank, world, w, max(1, workers))))
                    assert len(ds) == seen, (world, rank, workers, batch, drop)
    ds = LatentShardDataset(two_bucket_dir, rank=1, world_size=2, num_workers=2, batch_size=2)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert len(loader) == len(list(loader)) == len(StatefulLoader(ds, num_workers=2))
    with pytest.raises(TypeError, match="epoch_items"):
        len(LatentShardDataset(two_bucket_dir, resampled=True))
    assert len(LatentShardDataset(two_bucket_dir, resampled=True, epoch_items=5, num_workers=2)) == 10
