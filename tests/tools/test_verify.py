"""`latentcache verify`, `info` and `check-config` on real encoded shards, clean and damaged."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from latentcache.cli import main
from latentcache.format.manifest import Manifest, read_manifest
from latentcache.format.reader import decode_sample, iter_tar
from latentcache.format.shards import EncodedClip, write_shard
from latentcache.tools.verify import verify
from latentcache.train.trainer_config import config_problems, load_trainer_config

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "cogvideox_tiny_sat.yaml"


@pytest.fixture()
def damaged(encoded_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(encoded_dir, copy)
    return copy


def _rewrite_shard(root: Path, index: int, change) -> None:
    """Rewrite shard `index` with `change(EncodedClip)` applied to each sample, and record it in the manifest the
    way the writer would (so only the content is wrong, not the checksum)."""
    manifest = read_manifest(root)
    entry = manifest["shards"][index]
    path = root / entry["path"]
    clips = []
    for raw in iter_tar(path):
        s = decode_sample(raw, str(path))
        clips.append(change(EncodedClip(s["key"], s["mean"], s["logvar"], s["meta"], s["caption"])))
    write_shard(path, clips)
    entry["sha256"], entry["bytes"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_clean_dataset_verifies(encoded_dir: Path, capsys) -> None:
    report = verify(encoded_dir)
    assert report.ok, report.problems
    assert report.samples == 8 and report.shards == 4 and report.buckets == {"17x64x96": 8}
    means, stds, overall = report.stats.normalized(report.spec)
    assert len(means) == len(stds) == 16 and all(s > 0 for s in stds)
    # The statistics derived from raw sums equal those of the normalised latents computed directly.
    manifest = read_manifest(encoded_dir)
    z = torch.cat([report.spec.normalize(decode_sample(raw, "")["mean"].float()).flatten(1)
                   for s in manifest["shards"] for raw in iter_tar(encoded_dir / s["path"])], dim=1)
    torch.testing.assert_close(torch.tensor(stds), z.std(dim=1, correction=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(means), z.mean(dim=1), rtol=1e-4, atol=1e-5)
    assert abs(overall - float(z.std(correction=0))) < 1e-4
    assert main(["verify", str(encoded_dir)]) == 0
    out = capsys.readouterr().out
    assert "8 samples in 4 shard(s)" in out and "s/GB" in out and out.rstrip().endswith("OK")


def test_checksum_missing_shard_and_count(damaged: Path, capsys) -> None:
    manifest = read_manifest(damaged)
    first = damaged / manifest["shards"][0]["path"]
    data = bytearray(first.read_bytes())
    data[data.index(b'"clip_index"') + 1] = ord("C")
    first.write_bytes(bytes(data))
    (damaged / manifest["shards"][1]["path"]).unlink()
    manifest["shards"][2]["samples"] = 5
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    report = verify(damaged)
    text = "\n".join(report.problems)
    names = [s["path"] for s in manifest["shards"]]
    assert f"{names[0]}: sha256" in text
    assert f"{names[1]}: shard '{names[1]}' of {damaged}/manifest.json is missing from storage" in text
    assert f"{names[2]}: 2 samples, the manifest lists 5" in text
    assert "counts.samples is 8, its shards list 11" in text
    assert main(["verify", str(damaged)]) == 3
    assert "FAILED: 4 problem(s)" in capsys.readouterr().out


def test_non_finite_wrong_shape_and_duplicate_keys(damaged: Path) -> None:
    def poison(clip: EncodedClip) -> EncodedClip:
        clip.mean = clip.mean.clone()
        clip.mean[0, 0, 0, 0] = float("nan")
        return clip

    _rewrite_shard(damaged, 0, poison)
    _rewrite_shard(damaged, 1, lambda c: EncodedClip(c.key, c.mean[:3], c.logvar[:3], c.meta))  # "pixels"
    first_keys = [raw["__key__"] for raw in iter_tar(damaged / read_manifest(damaged)["shards"][0]["path"])]
    renamed = iter([first_keys[0]])
    _rewrite_shard(damaged, 2, lambda c: EncodedClip(next(renamed, c.key), c.mean, c.logvar, c.meta))
    problems = "\n".join(verify(damaged).problems)
    assert "mean has 1 NaN/Inf value(s)" in problems
    assert "latents are [3, 5, 8, 12] (3 channels: pixels, not latents), bucket 17x64x96" in problems
    assert f"key {first_keys[0]} also appears in" in problems


def test_scaling_factor_warning(damaged: Path) -> None:
    manifest = read_manifest(damaged)
    manifest["latent_spec"]["scaling_factor"] = 40.0
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    report = verify(damaged)
    assert report.ok
    assert any("std" in w and "(z * 40)" in w and "a factor of" in w for w in report.warnings)


def test_stray_shard_warns(damaged: Path) -> None:
    shutil.copy(damaged / read_manifest(damaged)["shards"][0]["path"], damaged / "shards" / "17x64x96" / "000077.tar")
    report = verify(damaged)
    assert report.ok and any("000077.tar" in w for w in report.warnings)


def test_info_table(two_bucket_dir: Path, capsys) -> None:
    assert main(["info", str(two_bucket_dir)]) == 0
    out = capsys.readouterr().out
    assert "10 in 5 shard(s)" in out
    assert "bucket 17x64x96  8 samples, latents [16, 5, 8, 12]" in out
    assert "bucket 17x64x64  2 samples, latents [16, 5, 8, 8]" in out
    assert "AutoencoderKLCogVideoX from tiny-random-cogvideox (random weights" in out
    assert "per sample" in out


def _config(tmp_path: Path, **changes) -> Path:
    tree = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    for dotted, value in changes.items():
        node = tree
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_check_config_example_fits(encoded_dir: Path, capsys) -> None:
    assert main(["check-config", str(EXAMPLE_CONFIG), "--data", str(encoded_dir)]) == 0
    assert "fits" in capsys.readouterr().out


def test_check_config_latent_input_false(encoded_dir: Path, tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, model__latent_input=False)
    assert main(["check-config", str(path), "--data", str(encoded_dir)]) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("PROBLEM")]
    assert len(lines) == 1
    assert "model.latent_input: False" in lines[0] and "conv error" in lines[0]
    assert "Fix: set model.latent_input: true" in lines[0]
    unset = _config(tmp_path, model__latent_input=None)
    assert "SAT defaults to False" in config_problems(load_trainer_config(unset), Manifest.read(encoded_dir))[0]


def test_check_config_one_line_per_mismatch(encoded_dir: Path, tmp_path: Path, capsys) -> None:
    net = "model__network_config__params__"
    path = _config(tmp_path, **{f"{net}in_channels": 32, f"{net}num_frames": 49, f"{net}latent_height": 60,
                                f"{net}latent_width": 90, "model__scale_factor": 0.7, "data__params__fps": 16,
                                "data__params__video_size": [480, 720]})
    assert main(["check-config", str(path), "--data", str(encoded_dir)]) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("PROBLEM")]
    expected = ["in_channels: 32 is twice the latents' 16 channels: an image-to-video model",
                "num_frames: 49 frames (13 latent frames), the shards hold 17-frame clips (5 latent frames)",
                "latent_height: 60, the shards' latents are 8", "latent_width: 90, the shards' latents are 12",
                "video_size: [480, 720], the shards were encoded at 64x96",
                "scale_factor: 0.7, the shards' VAE scaling factor is 1.15258",
                "fps: 16, the shards were sampled at 8 fps"]
    assert len(lines) == len(expected)
    for text in expected:
        assert sum(text in line for line in lines) == 1, text
    assert all("Fix:" in line for line in lines)


def test_check_config_merges_files_like_sat_base(encoded_dir: Path, tmp_path: Path, capsys) -> None:
    tree = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    model, sft = tmp_path / "model.yaml", tmp_path / "sft.yaml"
    model.write_text(yaml.safe_dump({"model": tree["model"]}))
    sft.write_text(yaml.safe_dump({"data": tree["data"], "model": {"latent_input": False}}))
    assert main(["check-config", str(model), "--data", str(encoded_dir)]) == 0
    assert main(["check-config", str(model), str(sft), "--data", str(encoded_dir)]) == 2  # the later file wins
    out = capsys.readouterr().out
    assert out.count("PROBLEM") == 1 and "model.latent_input: False" in out


def test_verify_with_trainer_config(encoded_dir: Path, tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, model__latent_input=False, model__network_config__params__in_channels=4)
    assert main(["verify", str(encoded_dir), "--trainer-config", str(path)]) == 3
    out = capsys.readouterr().out
    assert "latent_input" in out and "in_channels: 4" in out and "FAILED: 2 problem(s)" in out


def test_pixel_shards_are_named(damaged: Path) -> None:
    """A dataset whose shards hold 3-channel 'latents' (pixels) fails verify, with the hint."""
    for i in range(4):
        _rewrite_shard(damaged, i, lambda c: EncodedClip(c.key, torch.zeros(3, 5, 8, 12), torch.zeros(3, 5, 8, 12),
                                                         c.meta))
    report = verify(damaged)
    assert len(report.problems) == 8 and all("pixels, not latents" in p for p in report.problems)


def _manifest_with(root: Path, change) -> Path:
    """Rewrite root/manifest.json as `change(parsed manifest)` returns it: an object to dump, or raw text."""
    path = root / "manifest.json"
    new = change(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    return path


def _set(tree: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = tree
    for p in parents:
        node = node[p] if not isinstance(node, list) else node[int(p)]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return tree


BAD_MANIFESTS = {
    # name: (change, what the message says)
    "not JSON": (lambda m: json.dumps(m)[:-40], "not a JSON manifest"),
    "a list": (lambda m: [m], "holds a JSON list, expected an object"),
    "no latent_spec": (lambda m: {k: v for k, v in m.items() if k != "latent_spec"}, "no latent_spec"),
    "shards a string": (lambda m: _set(m, "shards", "shards/17x64x96/000000.tar"), "shards is 'shards/17x64x96"),
    "bucket evil": (lambda m: _set(m, "shards.0.bucket", "evil"), r"shards\[0\] has bucket 'evil', expected"),
    "buckets evil": (lambda m: _set(m, "buckets", {"evil": 8}), "buckets has 'evil'"),
    "samples a string": (lambda m: _set(m, "shards.1.samples", "2"), r"shards\[1\] has samples '2', expected a count"),
    "scaling_factor NaN": (lambda m: _set(m, "latent_spec.scaling_factor", float("nan")),
                           "latent_spec.scaling_factor is nan, expected a finite number"),
    "latents_std zero": (lambda m: _set(_set(m, "latent_spec.latents_mean", [0.0] * 16), "latent_spec.latents_std",
                                        [0.0] * 16), "non-finite gains or offsets"),
    "channels a string": (lambda m: _set(m, "latent_spec.channels", "16"), "latent_spec.channels is '16'"),
    "vae a string": (lambda m: _set(m, "vae", "AutoencoderKLCogVideoX"), "vae is a str, expected an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_malformed_manifest_is_a_clear_error(damaged: Path, case: str, capsys) -> None:
    """No traceback (exit 1): `verify` and `info` exit 2 naming the file and the fault; the dataset refuses."""
    from latentcache import LatentShardDataset, ShardFormatError

    change, message = BAD_MANIFESTS[case]
    path = _manifest_with(damaged, change)
    for command in ("verify", "info"):
        assert main([command, str(damaged)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and re.search(message, err) and "Traceback" not in err
    with pytest.raises(ShardFormatError, match=message):
        LatentShardDataset(damaged)


def test_manifest_that_is_a_fifo_is_refused(damaged: Path, capsys) -> None:
    (damaged / "manifest.json").unlink()
    os.mkfifo(damaged / "manifest.json")
    assert main(["verify", str(damaged)]) == 2
    assert "manifest.json: is a FIFO; latentcache reads only regular files" in capsys.readouterr().err
