"""Each defect the fuzz targets found, as a fixed, named case (fuzz_targets.py builds the same crafted inputs)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
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
