"""`latentcache preview`: latents decoded back through the manifest's VAE into a real h264 mp4."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from latentcache.cli import main
from latentcache.encode.models.vae import load_vae
from latentcache.encode.settings import VAESettings
from latentcache.format.manifest import Manifest, read_manifest
from latentcache.format.reader import decode_sample, iter_tar
from latentcache.tools.preview import preview


def _read_mp4(path: Path) -> tuple[str, np.ndarray]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return stream.codec_context.name, frames


@pytest.mark.slow
def test_preview_side_by_side(encoded_dir: Path, tmp_path: Path, tiny_vae, capsys) -> None:
    manifest = read_manifest(encoded_dir)
    shard = encoded_dir / manifest["shards"][1]["path"]
    sample = decode_sample(next(iter_tar(shard)), str(shard))
    out = tmp_path / "preview.mp4"
    assert main(["preview", str(encoded_dir), "--key", sample["key"], "--out", str(out)]) == 0
    assert "source | reconstruction" in capsys.readouterr().out
    codec, frames = _read_mp4(out)
    assert codec == "h264" and frames.shape == (17, 64, 192, 3)
    # Right half: the VAE's reconstruction of the stored latents (h264 at crf 18 is close, not exact).
    expected = tiny_vae.decode(sample["mean"].float()[None])[0]
    assert np.abs(frames[:, :, 96:].astype(int) - expected.astype(int)).mean() < 6
    # Left half: the same clip decoded from the source again; the marker square sits top-left in every frame.
    left = frames[:, :, :96].astype(int)
    assert np.abs(left - expected.astype(int)).mean() > 20  # random VAE weights: not the source
    assert (left[:, :4, :4] > 200).all()


@pytest.mark.slow
def test_preview_random_samples_and_missing_source(video_dir: Path, tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(video_dir / "a_h264.mp4", videos)
    shutil.copy(video_dir / "c_h264.mp4", videos)
    data = tmp_path / "latents"
    assert main(["encode", str(videos), "--out", str(data), "--vae", "tiny-random-cogvideox", "--device", "cpu",
                 "--frames", "17", "--height", "64", "--width", "96"]) == 0
    (videos / "c_h264.mp4").unlink()  # moved after encoding: the preview shows the reconstruction alone
    result = preview(data, tmp_path / "two.mp4", random_count=2, seed=1)
    assert sorted(result.with_source) == [False, True]
    assert result.frames == 34 and result.size == (192, 64)
    _, frames = _read_mp4(tmp_path / "two.mp4")
    gone = result.with_source.index(False)
    assert frames[gone * 17 : gone * 17 + 17, :, :96].mean() < 3  # black where the source would be
    assert frames[gone * 17 : gone * 17 + 17, :, 96:].mean() > 20


@pytest.mark.parametrize(("count", "seed"), [(1, 0), (1, 5), (3, 2)])
def test_random_samples_are_read_from_their_shards_alone(encoded_dir: Path, tmp_path: Path, count: int,
                                                         seed: int) -> None:
    """`--random N` drew its samples by reading (and hashing) every shard, minutes on a large output for one sample:
    now the manifest's counts choose them, the same ones for a seed, and only their shards are read. Every other
    shard is damaged here: reading one would be refused."""
    import random

    from latentcache.tools.preview import pick_samples
    from latentcache.train.shard_sources import resolve_source

    data = tmp_path / "data"
    shutil.copytree(encoded_dir, data)
    manifest = read_manifest(data)
    places = [(shard["path"], sample["__key__"]) for shard in manifest["shards"]
              for sample in iter_tar(data / shard["path"])]
    rng, expected = random.Random(seed), []  # the reservoir over every sample, as it was drawn before
    for n, place in enumerate(places):
        if len(expected) < count:
            expected.append(place)
        elif (j := rng.randrange(n + 1)) < len(expected):
            expected[j] = place
    for shard in {path for path, _ in places} - {path for path, _ in expected}:
        damaged = bytearray((data / shard).read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        (data / shard).write_bytes(bytes(damaged))
    _, _, shards = resolve_source(data)
    assert [s["key"] for s in pick_samples(shards, None, count, seed)] == [key for _, key in expected]


def test_preview_unknown_key(encoded_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["preview", str(encoded_dir), "--key", "nosuchkey_0000", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "nosuchkey_0000" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
@pytest.mark.parametrize("count", [3])
def test_preview_uses_the_manifest_vae(encoded_dir: Path, tmp_path: Path, count: int) -> None:
    """The VAE is rebuilt from the manifest's identity (tiny-random: same seeded weights as at encode time)."""
    from latentcache.tools.preview import load_manifest_vae

    manifest = Manifest.read(encoded_dir)
    vae = load_manifest_vae(manifest)
    assert vae.identity.config_hash == manifest.vae["config_hash"]
    again = load_vae(VAESettings(source="tiny-random-cogvideox", subfolder=None, dtype="fp32"), "cpu")
    for a, b in zip(vae.model.parameters(), again.model.parameters(), strict=True):
        assert (a == b).all()
    result = preview(encoded_dir, tmp_path / "many.mp4", random_count=count)
    assert len(result.keys) == count and len(set(result.keys)) == count and all(result.with_source)


def test_preview_refuses_pickled_vae_weights(encoded_dir: Path, tmp_path: Path, tiny_vae) -> None:
    """A manifest naming a VAE directory with only .bin weights: refused, never torch.load-ed (issue 12.10)."""
    from latentcache.errors import ConfigError
    from latentcache.tools.preview import load_manifest_vae

    manifest = Manifest.read(encoded_dir)
    pickled, safe = tmp_path / "pickled", tmp_path / "safe"
    tiny_vae.model.save_pretrained(pickled, safe_serialization=False)
    tiny_vae.model.save_pretrained(safe)
    for folder in (pickled, safe):
        manifest = dataclasses.replace(manifest, vae={**manifest.vae, "source": str(folder), "subfolder": None})
        if folder is pickled:
            with pytest.raises(ConfigError, match=r"no diffusion_pytorch_model.safetensors \(found: config.json, "
                                                  r"diffusion_pytorch_model.bin\); preview loads safetensors"):
                load_manifest_vae(manifest)
        else:
            assert load_manifest_vae(manifest).identity.config_hash == manifest.vae["config_hash"]


@pytest.mark.slow
def test_preview_finds_a_source_inside_a_tar(video_dir: Path, tmp_path: Path) -> None:
    """A `tar::member` input is looked up through the source opener, so the preview has its source side."""
    import tarfile

    tar = tmp_path / "videos.tar"
    with tarfile.open(tar, "w") as t:
        t.add(video_dir / "a_h264.mp4", arcname="000000.mp4")
    data = tmp_path / "latents"
    assert main(["encode", str(tar), "--out", str(data), "--vae", "tiny-random-cogvideox", "--device", "cpu",
                 "--frames", "17", "--height", "64", "--width", "96"]) == 0
    result = preview(data, tmp_path / "one.mp4", random_count=1)
    assert result.with_source == [True]
    _, frames = _read_mp4(tmp_path / "one.mp4")
    assert (frames[:, :4, :4] > 200).all()  # the marker square of the source, top-left


def test_a_samples_own_source_path_is_looked_up_only_under_the_working_directory(video_dir: Path, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """Without the output's plan (shards copied alone, or a stranger's), the sample JSON's `source` is the only
    clue: a relative path under the working directory is used; an absolute path, `..` or a scheme never is."""
    from latentcache.tools.preview import _source_path

    work = tmp_path / "work"
    (work / "videos").mkdir(parents=True)
    shutil.copy(video_dir / "a_h264.mp4", work / "videos" / "a.mp4")
    monkeypatch.chdir(work)
    no_plan = tmp_path / "shards_only"
    no_plan.mkdir()
    elsewhere = str(video_dir / "c_h264.mp4")
    size = (work / "videos" / "a.mp4").stat().st_size
    assert _source_path(no_plan, "k", {"source": "videos/a.mp4", "source_size_bytes": size}) == "videos/a.mp4"
    # Its own source is shown only with the size the sample recorded: not a file that took its name since.
    assert _source_path(no_plan, "k", {"source": "videos/a.mp4", "source_size_bytes": size + 1}) is None
    assert _source_path(no_plan, "k", {"source": "videos/a.mp4"}) is None
    for hostile in (elsewhere, "../work/videos/a.mp4", "videos/../videos/a.mp4", "file:videos/a.mp4",
                    "concat:videos/a.mp4", "videos/a.mp4\n", 7, None, ""):
        assert _source_path(no_plan, "k", {"source": hostile, "source_size_bytes": size}) is None, hostile


def _one_video_encoded(video_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(video_dir / "a_h264.mp4", videos / "a.mp4")
    data = tmp_path / "latents"
    assert main(["encode", str(videos), "--out", str(data), "--vae", "tiny-random-cogvideox", "--device", "cpu",
                 "--frames", "17", "--height", "64", "--width", "96"]) == 0
    return videos, data


@pytest.mark.slow
def test_a_video_replaced_since_encoding_is_not_shown_beside_the_old_latents(video_dir: Path, tmp_path: Path,
                                                                             caplog) -> None:
    """The plan's path holds another video now (same name): the preview shows the reconstruction alone and says why,
    never the new video as if it were what was encoded."""
    videos, data = _one_video_encoded(video_dir, tmp_path)
    assert preview(data, tmp_path / "before.mp4", random_count=1).with_source == [True]
    shutil.copy(video_dir / "c_h264.mp4", videos / "a.mp4")
    result = preview(data, tmp_path / "after.mp4", random_count=1)
    assert result.with_source == [False]
    assert "it is not the file that was encoded" in caplog.text


@pytest.mark.slow
def test_a_file_a_plan_names_is_shown_only_if_it_is_the_encoded_one(video_dir: Path, tmp_path: Path) -> None:
    """A stranger's output whose plan names another file on this machine (its inputs file and plan.json rewritten to
    agree, its chunk plans left out): nothing records that file's identity, so it is not decoded into the preview;
    nor is a path under another scheme."""
    import hashlib
    import json

    _, data = _one_video_encoded(video_dir, tmp_path)
    secret = tmp_path / "private" / "holiday.mp4"
    secret.parent.mkdir()
    shutil.copy(video_dir / "c_h264.mp4", secret)
    for named in (str(secret), f"concat:{secret}", "pipe:cat"):
        inputs = data / "inputs" / "part-0000.jsonl"
        row = json.loads(inputs.read_text())
        row["path"] = named
        line = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode()
        inputs.write_bytes(line)
        plan = json.loads((data / "plan.json").read_text())
        digest = hashlib.sha256(line).hexdigest()
        plan["parts"][0]["sha256"], plan["parts"][0]["chunks"] = digest, [[0, len(line), digest]]
        (data / "plan.json").write_text(json.dumps(plan))
        shutil.rmtree(data / "chunks", ignore_errors=True)
        assert preview(data, tmp_path / "crafted.mp4", random_count=1).with_source == [False], named


def test_preview_names_each_sample_by_its_source_file(encoded_dir: Path, tmp_path: Path, capsys) -> None:
    """A user knows their videos, not the keys: each previewed sample is named by its source file and start."""
    assert main(["preview", str(encoded_dir), "--random", "2", "--out", str(tmp_path / "p.mp4")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "reconstruction" in line]
    assert len(lines) == 2
    assert all(re.match(r"\S+\.(mp4|webm) from \d+\.\d\ds \([0-9a-f]{16}_\d+\): ", line) for line in lines), lines
