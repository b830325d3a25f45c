"""What every `latentcache export` shares (latentcache/tools/export_common.py), on real encoded Wan shards exported
for musubi-tuner: it removes only files it wrote (by name and hash), refuses what the dataset refuses, checks each
name against the trainer's discovery rule, writes the same bytes twice, resumes, and turns every write error into a
message naming the file."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from latentcache.cli import main
from latentcache.errors import ConfigError, LatentMismatchError
from latentcache.format.shards import EncodedClip
from latentcache.tools import export_common
from latentcache.tools.export_common import JOURNAL, MARKER
from latentcache.tools.export_musubi import export_musubi
from tests.tools.test_export_musubi import _encode, _read_with_musubi, musubi, videos  # noqa: F401 (fixtures)
from tests.tools.test_verify import _rewrite_shard


@pytest.fixture(scope="module")
def wan(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return _encode(videos, tmp_path_factory.mktemp("wan") / "out", "wan")


@pytest.fixture()
def copy(wan: Path, tmp_path: Path) -> Path:
    shutil.copytree(wan, tmp_path / "copy")
    return tmp_path / "copy"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _musubi_text_caches(musubi, cache: Path, stems: list[str]) -> dict[str, bytes]:  # noqa: F811
    """What musubi-tuner's own wan_cache_text_encoder_outputs.py writes into the same cache directory."""
    for stem in stems:
        item = musubi.dataset.ItemInfo(stem, "a caption", (96, 64))
        item.text_encoder_output_cache_path = str(cache / f"{stem}_wan_te.safetensors")
        musubi.cache_io.save_text_encoder_output_cache_wan(item, torch.ones(5, 8, dtype=torch.bfloat16))
    return {p.name: p.read_bytes() for p in cache.glob("*_wan_te.safetensors")}


def test_a_rerun_and_a_smaller_export_keep_musubis_own_text_caches(musubi, wan, videos, tmp_path):  # noqa: F811
    """Issue 33 item 1: the docs tell users to run musubi's text caching into the export's CACHE_DIR; a rerun, or an
    export of a smaller output, deleted those files as "an earlier export's". Only files the export wrote (by name
    and hash in its marker) may go."""
    cache = tmp_path / "cache"
    assert main(["export", "musubi", str(wan), "--to", str(cache)]) == 0
    theirs = _musubi_text_caches(musubi, cache, ["red_clip", "blue_clip"])
    assert len(theirs) == 2
    assert main(["export", "musubi", str(wan), "--to", str(cache)]) == 0
    assert {p.name: p.read_bytes() for p in cache.glob("*_wan_te.safetensors")} == theirs
    assert len(_read_with_musubi(musubi, cache, videos, "wan")) == 2

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(videos / "red_clip.mp4", one / "red_clip.mp4")
    red_only = _encode(one, tmp_path / "red_only", "wan")
    result = export_musubi(red_only, cache)
    assert [n.split("_0")[0] for n in result.removed] == ["blue_clip"]  # the export's own blue latents, nothing else
    assert {p.name: p.read_bytes() for p in cache.glob("*_wan_te.safetensors")} == theirs
    assert sorted(json.loads((cache / MARKER).read_text())["files"]) == result.files
    assert not (cache / JOURNAL).exists()


def test_a_file_changed_since_it_was_exported_is_not_ours_any_more(wan, tmp_path):
    cache = tmp_path / "cache"
    first = export_musubi(wan, cache)
    changed = cache / first.files[0]
    changed.write_bytes(b"the user's own bytes")
    with pytest.raises(ConfigError, match=rf"latentcache did not export \(e.g. {changed.name}\)"):
        export_musubi(wan, cache)
    assert changed.read_bytes() == b"the user's own bytes"


def test_foreign_latent_caches_refuse_the_directory(wan, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "other_00000-013_0096x0064_wan.safetensors").write_bytes(b"musubi's own")
    with pytest.raises(ConfigError, match=r"holds 1 musubi wan latent cache file\(s\) latentcache did not export"):
        export_musubi(wan, theirs)
    assert [p.name for p in theirs.iterdir()] == ["other_00000-013_0096x0064_wan.safetensors"]


@pytest.mark.parametrize(("change", "match"), [
    (lambda c: EncodedClip(c.key, c.mean.clone().fill_(float("nan")), c.logvar, c.meta), r"mean has \d+ NaN/Inf"),
    (lambda c: EncodedClip(c.key, c.mean.to(torch.int64), c.logvar, c.meta), r"mean is torch.int64, expected"),
    (lambda c: EncodedClip(c.key, c.mean[:, :, :4], c.logvar[:, :, :4], c.meta), r"latents are \[16, 4, 4, 12\]"),
    (lambda c: EncodedClip(c.key, c.mean[:4], c.logvar[:4], c.meta), r"latents of shape \[4, 4, 8, 12\], the "
                                                                      r"manifest says 16 channels"),
], ids=["nan", "int64", "shape", "channels"])
def test_what_the_dataset_refuses_is_never_exported(copy, tmp_path, change, match, capsys):
    """Issue 33 item 6: NaN, int64, a wrong shape or 4 channels exported with exit 0 (or crashed)."""
    _rewrite_shard(copy, 0, change)
    with pytest.raises(LatentMismatchError, match=match):
        export_musubi(copy, tmp_path / "cache")
    assert main(["export", "musubi", str(copy), "--to", str(tmp_path / "cache2")]) == 2
    assert "not exported" in capsys.readouterr().err
    assert not list((tmp_path / "cache2").glob("*.safetensors"))


def _with_meta(root: Path, **fields) -> None:
    def change(c: EncodedClip) -> EncodedClip:
        c.meta = {**c.meta, **fields}
        return c

    _rewrite_shard(root, 0, change)


def test_a_dot_file_video_is_refused_not_hidden_from_musubi(copy, tmp_path):
    """Issue 33 item 7: `.intro.mp4` became a hidden cache file, which musubi's glob skips (N reported, N-1 trained)."""
    _with_meta(copy, source=".intro.mp4")
    with pytest.raises(LatentMismatchError, match=r"\.intro_00000-013_.*_wan\.safetensors, which musubi-tuner never "
                                                  r"reads: its name starts with a dot"):
        export_musubi(copy, tmp_path / "cache")


def test_the_same_output_exports_to_the_same_bytes(wan, tmp_path):
    """Issue 33 item 11: safetensors wrote its metadata in a per-process order, so every re-export changed every
    file; a rerun into the same folder now rewrites nothing."""
    first = export_musubi(wan, tmp_path / "a")
    second = export_musubi(wan, tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    for name in first.files:
        data = (tmp_path / "a" / name).read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    mtimes = {n: (tmp_path / "a" / n).stat().st_mtime_ns for n in first.files}
    again = export_musubi(wan, tmp_path / "a")
    assert sorted(again.unchanged) == first.files and not again.written
    assert {n: (tmp_path / "a" / n).stat().st_mtime_ns for n in first.files} == mtimes
    assert second.files == first.files


@pytest.mark.parametrize(("fields", "match"), [
    ({"source": "v" * 240 + ".mp4"}, r"is 2\d\d bytes; the file system allows 255 \(ENAMETOOLONG\)"),
    ({"clip_start": 1e300}, r"its JSON field clip_start is '1e\+300', expected a number from 0 to"),
    ({"source_fps": 1e300}, r"its JSON field source_fps is"),
    ({"source_width": 10**300}, r"its JSON field source_width is '1000000"),
], ids=["name-too-long", "clip_start", "source_fps", "source_width"])
def test_absurd_sample_fields_are_refused_naming_the_field(copy, tmp_path, fields, match, capsys):
    """Issue 33 item 14: a 240-character video name plus the suffix (ENAMETOOLONG) and 1e300 fields crashed."""
    _with_meta(copy, **fields)
    with pytest.raises(LatentMismatchError, match=match):
        export_musubi(copy, tmp_path / "cache")
    assert main(["export", "musubi", str(copy), "--to", str(tmp_path / "cache2")]) == 2


def test_to_a_file_or_under_one_is_a_clean_error(wan, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("mine")
    assert main(["export", "musubi", str(wan), "--to", str(file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["export", "musubi", str(wan), "--to", str(file / "below")]) == 2
    assert "a part of the path is a file" in capsys.readouterr().err
    assert file.read_text() == "mine"


@pytest.mark.parametrize(("code", "hint"), [(errno.ENOSPC, "the disk is full"),
                                            (errno.EROFS, "the file system is read-only")])
def test_write_errors_name_the_file_and_a_rerun_resumes(wan, tmp_path, monkeypatch, code, hint):
    """A full disk or a read-only folder is an OSError at the rename: a message naming the file (exit 2); the rerun
    then finishes, and the earlier run's temporary (recorded in its journal) is gone."""
    cache = tmp_path / "cache"
    real = export_common.os.replace
    calls = []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(code, "simulated")
        return real(src, dst)

    monkeypatch.setattr(export_common.os, "replace", fail_second)
    with pytest.raises(ConfigError, match=rf"{Path(calls[1]).name if len(calls) > 1 else ''}.*cannot write \({hint}"):
        export_musubi(wan, cache)
    monkeypatch.setattr(export_common.os, "replace", real)
    assert (cache / JOURNAL).exists() and not (cache / MARKER).exists()
    result = export_musubi(wan, cache)
    assert len(result.unchanged) == 1 and len(result.written) == 1
    assert sorted(p.name for p in cache.iterdir()) == sorted([MARKER, *result.files])


def test_a_killed_export_leaves_a_temporary_the_rerun_removes(wan, tmp_path, monkeypatch):
    """kill -9 between writing a temporary and renaming it: the journal names the temporary, the rerun removes it."""
    cache = tmp_path / "cache"

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_common.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        export_musubi(wan, cache)
    monkeypatch.undo()
    (left,) = [p.name for p in cache.iterdir() if p.name.endswith(".lcx-tmp")]
    (cache / "notes.txt").write_text("mine")
    result = export_musubi(wan, cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([MARKER, "notes.txt", *result.files])
    assert left not in result.files


def test_dry_run_lists_and_writes_nothing(wan, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["export", "musubi", str(wan), "--to", str(cache), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("would write ") == 3 and "would write 2 file(s)" in out
    assert not cache.exists()


def test_unknown_trainer_or_architecture_lists_what_is_supported(wan, tmp_path, capsys):
    assert main(["export", "diffusion-pipe", str(wan), "--to", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "not a trainer latentcache exports to (it caches into torch.save'd shards" in err
    assert "Supported: musubi:" in err
    assert main(["export", "musubi", str(wan), "--to", str(tmp_path / "c"), "--arch", "fp"]) == 2
    assert "--arch fp: not exported: FramePack's cache" in capsys.readouterr().err
    assert main(["export", "musubi", str(wan), "--to", str(tmp_path / "c"), "--arch", "hv"]) == 2
    assert "musubi-tuner's hunyuan_video cache holds hunyuanvideo VAE latents" in capsys.readouterr().err
    assert main(["export", "ltx2", str(wan), "--to", str(tmp_path / "c"), "--arch", "wan"]) == 2
    assert "export ltx2: --arch is not an option of this export" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_ai_toolkit_is_answered_with_why_not(wan, tmp_path, capsys):
    assert main(["export", "ai-toolkit", str(wan), "--to", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "its cache file is named by an md5 of its own bucketing" in err and "Supported: musubi:" in err
    assert "ltx2:" in err and "fastvideo:" in err


def test_an_earlier_versions_export_is_not_removed_but_named(wan, tmp_path):
    """Markers of the earlier `export musubi` list names without hashes: those files cannot be proven the export's,
    so they are left alone, and the refusal says where they came from."""
    cache = tmp_path / "cache"
    cache.mkdir()
    old = cache / "red_clip_00000-013_0096x0064_wan.safetensors"
    old.write_bytes(b"written by an earlier version, metadata in another order")
    (cache / MARKER).write_text(json.dumps({"source": "x", "complete": True, "files": [old.name]}))
    with pytest.raises(ConfigError, match="earlier latentcache version, which recorded no hashes"):
        export_musubi(wan, cache)
    assert old.read_bytes().startswith(b"written by an earlier version")
