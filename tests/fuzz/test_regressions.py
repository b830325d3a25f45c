"""Each defect the fuzz targets found, as a fixed, named case (fuzz_targets.py builds the same crafted inputs)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import fast_cases
from fuzz_targets import _members, _tar, first_shard, rewrite_shard

from latentcache.cli import main
from latentcache.errors import ShardFormatError
from latentcache.tools.verify import verify
from latentcache.train.dataset import LatentShardDataset


@pytest.fixture
def out(fuzz_base: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(fuzz_base, copy)
    return copy


def _export(out: Path) -> tuple[int, str]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["export", "musubi", str(out), "--to", str(out.parent / "export")])
    return code, err.getvalue()


def test_sample_json_naming_another_bucket_is_refused_by_every_reader(out: Path) -> None:
    """sample_json target: verify reported a sample whose JSON names another bucket, the dataset and the musubi
    export delivered it."""
    index, blob = first_shard(out)
    members = _members(blob)
    i = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".json"))
    meta = json.loads(members[i][1])
    meta["bucket"] = [-10, -18.4, 2.7e-216]
    members[i] = (members[i][0], json.dumps(meta).encode())
    rewrite_shard(out, index, _tar(members))
    report = verify(out)
    assert any("says bucket [-10, -18.4, 2.7e-216], its shard is in bucket 13x64x96" in p for p in report.problems)
    with pytest.raises(ShardFormatError, match="says bucket"):
        list(LatentShardDataset(out))
    code, err = _export(out)
    assert code == 2 and "says bucket" in err


def test_a_shard_without_sha256_is_refused_by_the_dataset_as_verify_reports(out: Path) -> None:
    """manifest target: a shard entry without sha256 was read unchecked by the dataset (and exported), while verify
    reported that its content cannot be checked."""
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shards"][0]["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = verify(out)
    assert [p for p in report.problems if "has no sha256" in p] and len(report.problems) == 1
    with pytest.raises(ShardFormatError, match="the manifest has no sha256 for it"):
        list(LatentShardDataset(out))
    assert len(list(LatentShardDataset(out, check_sha256=False))) == 4  # the documented way past it
    code, err = _export(out)
    assert code == 2 and "has no sha256" in err


def test_counts_samples_disagreeing_with_the_shards_is_not_exported(out: Path) -> None:
    """manifest target: verify reported counts.samples that disagrees with the shards; the export wrote them."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["counts"]["samples"] = 0
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert not verify(out).ok
    with pytest.raises(ShardFormatError, match="counts.samples is 0, its shards list 4"):
        LatentShardDataset(out)
    code, err = _export(out)
    assert code == 2 and "counts.samples is 0" in err


@pytest.mark.parametrize(("params", "named"), [
    ({"seed": {"a": 1}}, r"SATLatentDataset \(.*\): data.params: seed is \{'a': 1\}"),
    ({"shuffle_buffer": [1]}, r"SATLatentDataset \(.*\): data.params: shuffle_buffer is \[1\]"),
    ({"video_size": 336064}, r"SATLatentDataset: data.params.video_size is 336064: it must be \[height, width\]"),
    ({"video_size": [None, 96]}, r"data.params.video_size is \[None, 96\]: it must be \[height, width\]"),
])
def test_sat_params_of_other_types_are_config_errors_naming_sat(fuzz_base: Path, params: dict, named: str) -> None:
    """sat target: a data.params seed of another type raised a bare ValueError naming only "seed", an int
    video_size a TypeError."""
    from latentcache.errors import ConfigError
    from latentcache.sat import SATLatentDataset

    with pytest.raises(ConfigError, match=named):
        SATLatentDataset(str(fuzz_base), **params)


def test_dataset_arguments_of_other_types_are_config_errors(fuzz_base: Path) -> None:
    """The same class in LatentShardDataset's own arguments: typed (ConfigError, still a ValueError)."""
    from latentcache.errors import ConfigError

    for kwargs in ({"seed": {}}, {"batch_size": "2"}, {"layout": ["BCTHW"]}, {"weights": ["x"]}, {"rank": 3,
                                                                                             "world_size": 2}):
        with pytest.raises(ConfigError):
            list(LatentShardDataset(fuzz_base, **kwargs))


@pytest.mark.parametrize(("change", "named"), [
    ({"num_res_blocks": {}}, "num_res_blocks is {}, expected a whole number from 0 to 16"),
    ({"temperal_downsample": []}, "temperal_downsample is [], expected a value like"),
    ({"temperal_downsample": [True]}, "list index out of range"),
    ({"dim_mult": []}, "dim_mult is [], expected a value like"),
    ({"latents_mean": [10**400] + [0.0] * 15, "latents_std": [1.0] * 16}, "latents_mean is [1000"),
    # A model of any size: diffusers allocated 11 trillion parameters, or built 60000 layers a block for minutes.
    ({"base_dim": 60000}, "the config builds a model of 10,990,975,141,363 parameters (AutoencoderKLWan), past"),
    ({"num_res_blocks": 60000}, "num_res_blocks is 60000, expected a whole number from 0 to 16"),
    ({"dim_mult": [1] * 60000}, "dim_mult has 60000 entries, expected at most 12"),
])
def test_a_vae_directory_whose_config_fields_disagree_is_a_config_error(tmp_path: Path, change: dict,
                                                                        named: str) -> None:
    """vae_dir target: a config field of another type (an object for a count) or fields that disagree (a
    temperal_downsample shorter than dim_mult) failed inside diffusers' constructor: TypeError, IndexError."""
    from fuzz_targets import _tiny_vae_dir

    from latentcache.encode.models.vae import load_vae
    from latentcache.encode.settings import VAESettings
    from latentcache.errors import ConfigError

    vae = tmp_path / "vae"
    shutil.copytree(_tiny_vae_dir(tmp_path), vae)
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=f"{vae}.*{re.escape(named)}"):
        load_vae(VAESettings(source=str(vae), family="wan", subfolder=None), "cpu")


def test_preview_of_a_manifest_without_a_vae_source_names_it(out: Path, tmp_path: Path) -> None:
    """preview target: a manifest whose vae is null (read as {}) raised KeyError: 'source'."""
    from latentcache.errors import ConfigError
    from latentcache.tools.preview import preview

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["vae"] = None
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=f"{out}/manifest.json: vae.source is None"):
        preview(out, tmp_path / "p.mp4", random_count=1)
    assert not (tmp_path / "p.mp4").exists()


def test_an_empty_latents_mean_is_refused_when_the_manifest_is_read(out: Path) -> None:
    """manifest target (bench/fuzz.py): latents_mean [] passed the spec check, then every reader raised a bare
    RuntimeError (tensor sizes 0 and 16) normalising."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["latent_spec"]["latents_mean"] = []
    (out / "manifest.json").write_text(json.dumps(manifest))
    for reader in (verify, LatentShardDataset):
        with pytest.raises(ShardFormatError, match="latent_spec.latents_mean has 0 values, latent_spec.channels is 16"):
            reader(out)


@pytest.mark.parametrize("change", fast_cases([{"clip_start": None}, {"clip_start": [1]}, {"clip_start": 8.76e152},
                                               {"clip_start": 10**400}, {"frames": None}, {"fps": [24]}, {"fps": "x"}],
                                              fast=[{"clip_start": 8.76e152}, {"frames": None}]))
def test_preview_of_a_sample_whose_clip_bounds_are_no_numbers(out: Path, tmp_path: Path, change: dict) -> None:
    """preview target (bench/fuzz.py): a sample JSON's clip_start None, a list or 8.8e152, frames missing or fps a
    list raised TypeError, KeyError or OverflowError; such a sample is previewed without its source."""
    from latentcache.tools.preview import preview

    index, blob = first_shard(out)
    members = _members(blob)
    for i, (info, payload) in enumerate(members):
        if info.name.endswith(".json"):
            meta = {**json.loads(payload), **change}
            members[i] = (info, json.dumps({k: v for k, v in meta.items() if v is not None}).encode())
    rewrite_shard(out, index, _tar(members))
    manifest = json.loads((out / "manifest.json").read_text())
    keys = [m.name.split(".")[0] for m, _ in members if m.name.endswith(".json")]
    assert manifest["shards"][0]["samples"] == len(set(keys))
    result = preview(out, tmp_path / "p.mp4", keys=keys[:1])
    assert result.keys == keys[:1] and result.with_source == [False] and (tmp_path / "p.mp4").stat().st_size
