"""A manifest's informational fields of other JSON types are the manifest's problem, named when it is read, by every
reader alike (issue 33 item 15: `info` and `verify` raised AttributeError/TypeError on `software` a string,
`counts.skipped_by_reason` a list, `settings.clip` or `vae.weights` of other types)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from latentcache.errors import ShardFormatError
from latentcache.format.manifest import read_manifest
from latentcache.tools.verify import info_lines, verify
from latentcache.train.dataset import LatentShardDataset

ODD = [None, True, 0, -1, 1.5, 10**30, "x", [], [1, "a"], {}, {"a": [1]}]
# Each path latentcache writes (and readers use); `None` in ODD is a legal "not recorded" for most of them.
PATHS = [("software",), ("software", 0), ("software", 0, "shards"), ("software", 0, "torch"), ("counts",),
         ("counts", "samples"), ("counts", "skipped_by_reason"), ("counts", "failed_by_reason"), ("settings",),
         ("settings", "clip"), ("settings", "clip", "fps"), ("settings", "clip", "frames"),
         ("settings", "clip", "resize"), ("settings", "image_latents"), ("vae",), ("vae", "weights"),
         ("vae", "class_name"), ("vae", "random_weights"), ("vae", "source"), ("buckets",), ("dtype",),
         ("latent_spec", "channels"), ("latent_spec", "scaling_factor"), ("latent_spec", "shift_factor")]


@pytest.fixture(scope="module")
def copy(encoded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fields") / "out"
    shutil.copytree(encoded_dir, out)
    return out


def _set(manifest: dict, path: tuple, value) -> None:
    node = manifest
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


@pytest.mark.parametrize("path", PATHS, ids=lambda p: ".".join(map(str, p)))
def test_every_reader_reads_or_names_the_field(copy: Path, encoded_dir: Path, path: tuple) -> None:
    base = json.loads((encoded_dir / "manifest.json").read_text())
    for value in ODD:
        manifest = json.loads(json.dumps(base))
        _set(manifest, path, value)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        try:
            read_manifest(copy)
        except ShardFormatError as e:
            assert str(copy / "manifest.json") in str(e)
            for reader in (info_lines, verify, LatentShardDataset):
                with pytest.raises(ShardFormatError, match="manifest.json"):
                    reader(copy)
            continue
        # Accepted: every reader reads it to the end; what verify reports, the dataset refuses.
        assert info_lines(copy)
        report = verify(copy)
        report.lines()
        if report.ok:
            assert len(list(LatentShardDataset(copy))) == 8
        else:
            assert path == ("counts", "samples"), (path, value, report.problems)
            with pytest.raises(ShardFormatError, match="counts.samples"):
                LatentShardDataset(copy)


def test_the_types_latentcache_writes_and_nulls_are_accepted(copy: Path, encoded_dir: Path) -> None:
    manifest = json.loads((encoded_dir / "manifest.json").read_text())
    for name in ("software", "counts", "settings", "vae", "buckets"):
        manifest[name] = None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(copy)["vae"] == {} and verify(copy).ok and info_lines(copy)


@pytest.mark.parametrize(("path", "value", "named"), [
    (("software",), "x", "software is 'x', expected a list"),
    (("counts", "skipped_by_reason"), [1], "counts.skipped_by_reason is [1], expected an object"),
    (("settings", "clip"), "x", "settings.clip is 'x', expected an object"),
    (("vae", "weights"), ["a"], "vae.weights is ['a'], expected an object of file name -> sha256"),
    (("latent_spec", "channels"), 10**30, "latent_spec.channels is 1000000000000000000000000000000, expected"),
])
def test_the_message_names_field_and_value(copy: Path, encoded_dir: Path, path: tuple, value, named: str) -> None:
    manifest = json.loads((encoded_dir / "manifest.json").read_text())
    _set(manifest, path, value)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=named.replace("[", r"\[").replace("]", r"\]")):
        info_lines(copy)
