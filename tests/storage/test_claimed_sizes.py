"""Sizes and names a manifest claims are bounded by what storage says before any request (issue 33 items 12, 16):
a manifest claiming 2**40 bytes for a small shard made the S3 reader send 131,072 ranged GETs, 2**60 a MemoryError;
a missing shard object raised a bare FileNotFoundError naming neither shard nor dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="object storage tests need s3fs: pip install 'latentcache[s3]'")
pytest.importorskip("moto.server", reason="object storage tests need moto[server] (test extra)")

from s3_server import make_bucket, upload  # noqa: E402

from latentcache.errors import ShardFormatError  # noqa: E402
from latentcache.tools.verify import verify  # noqa: E402
from latentcache.train.dataset import LatentShardDataset  # noqa: E402


class _Counting:
    """An fsspec filesystem that records every GET latentcache asks of it: cat_file is one, cat_ranges one per
    range."""

    def __init__(self, fs, calls: list[tuple]) -> None:
        self._fs, self._calls = fs, calls

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._calls.append((path, start, end))
        return self._fs.cat_file(path, start=start, end=end, **kwargs)

    def cat_ranges(self, paths, starts, ends, **kwargs):
        self._calls.extend(zip(paths, starts, ends, strict=True))
        return self._fs.cat_ranges(paths, starts, ends, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fs, name)


@pytest.fixture
def gets(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every GET latentcache sends through the storage layer (whole or ranged), as (path, start, end)."""
    from latentcache.storage import store

    calls: list[tuple] = []
    real = store.filesystem

    def counting(url: str):
        fs, path = real(url)
        return _Counting(fs, calls), path

    monkeypatch.setattr(store, "filesystem", counting)
    return calls


def _lying(encoded_dir: Path, tmp_path: Path, claim: int) -> Path:
    out = tmp_path / "out"
    shutil.copytree(encoded_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["bytes"] = claim
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("claim", [2**40, 2**60])
def test_a_claimed_size_past_the_object_costs_one_get(s3_endpoint: str, encoded_dir: Path, tmp_path: Path,
                                                      gets: list[tuple], claim: int) -> None:
    local = _lying(encoded_dir, tmp_path, claim)
    url = make_bucket(f"claims{claim.bit_length()}") + "/latents"
    upload(local, url)
    first = json.loads((local / "manifest.json").read_text())["shards"][0]["path"]
    shard = LatentShardDataset(url).shards[0]
    gets.clear()
    from latentcache.train.shard_sources import read_bytes

    data = read_bytes(shard)  # the object's real size is read in one GET, not claim / 8 MiB ranged ones
    assert len(data) == (encoded_dir / first).stat().st_size
    assert len([g for g in gets if g[0].endswith(first)]) == 1
    # The shard itself reads (its sha256 and count are right); what verify says, the dataset does, in a few requests
    gets.clear()
    report = verify(url)
    assert report.ok, report.problems
    assert len(gets) < 20
    # Locally the claim is bounded by the file's size too
    assert verify(local).ok


def test_a_manifest_read_from_s3_costs_one_get(s3_endpoint: str, encoded_dir: Path, gets: list[tuple]) -> None:
    """The manifest's read limit (256 MiB) is a bound, not a size: it was fetched as 32 ranged parts."""
    from latentcache.format.manifest import read_manifest

    url = make_bucket("manifest-gets") + "/latents"
    upload(encoded_dir, url)
    gets.clear()
    assert read_manifest(url)["shards"]
    assert len(gets) == 1


def test_an_object_larger_than_claimed_is_refused_before_any_get(s3_endpoint: str, encoded_dir: Path,
                                                                 tmp_path: Path, gets: list[tuple]) -> None:
    local = _lying(encoded_dir, tmp_path, 100)
    url = make_bucket("claims-small") + "/latents"
    upload(local, url)
    first = json.loads((local / "manifest.json").read_text())["shards"][0]["path"]
    gets.clear()
    with pytest.raises(ShardFormatError, match="the manifest lists 100"):
        list(LatentShardDataset(url))
    assert not [g for g in gets if g[0].endswith(first)]  # (the next shards' prefetch may have begun)


def test_a_missing_shard_object_names_shard_and_dataset(s3_endpoint: str, encoded_dir: Path,
                                                        tmp_path: Path) -> None:
    import s3fs

    url = make_bucket("missing-shard") + "/latents"
    upload(encoded_dir, url)
    first = json.loads((encoded_dir / "manifest.json").read_text())["shards"][0]["path"]
    s3fs.S3FileSystem().rm_file(f"{url.removeprefix('s3://')}/{first}")
    with pytest.raises(ShardFormatError, match=f"shard '{first}' of {url}/manifest.json is missing from storage"):
        list(LatentShardDataset(url))
    report = verify(url)
    assert any(f"shard '{first}' of {url}/manifest.json is missing" in p for p in report.problems)
    # Locally the same words
    local = tmp_path / "out"
    shutil.copytree(encoded_dir, local)
    (local / first).unlink()
    with pytest.raises(ShardFormatError, match=f"shard '{first}' of {local}/manifest.json is missing from storage"):
        list(LatentShardDataset(local))
