"""An input replaced in place (another file under the same name) is never served as its old latents.

Each chunk plan records what its inputs were when probed (size, mtime_ns and sha256; a tar member's tar stat; an
object's ETag). A rerun or append stats its own share's inputs once and reads the bytes only of those whose stat
differs: a changed one is refused (exit 2) naming it, a file only touched stays done, and `--reencode-changed`
plans and encodes again just the chunks that hold changed inputs, every other shard byte for byte as it was.
All through the real CLI on real videos."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import fast_cases, tree_bytes
from s3_server import make_bucket, upload  # the S3 fixture itself, `s3_endpoint`, is conftest's

from latentcache.cli import main
from latentcache.encode import chunks, input_stats, job_plan, reencode
from latentcache.encode.decoding import loader
from latentcache.tools.synthetic import write_video
from latentcache.train.dataset import LatentShardDataset

# --batch-size 1: an appended or re-encoded output is compared bit for bit with a fresh one, whose chunks (and so
# whose VAE batches, which cross shards of a chunk) are cut otherwise; on a CPU a clip's latents depend on its batch.
ARGS = ["--vae", "tiny-random-cogvideox", "--frames", "9", "--fps", "8", "--height", "64", "--width", "96",
        "--clips", "first", "--samples-per-shard", "1", "--device", "cpu", "--workers", "0", "--chunk-size", "2",
        "--batch-size", "1"]


def _videos(root: Path) -> Path:
    """Four videos of different lengths (so different bytes) and one file that is not a video (a failure)."""
    root.mkdir()
    for i, frames in enumerate((24, 28, 32, 36)):
        write_video(root / f"v{i}", codec="h264", num_frames=frames, height=64, width=96, fps=8)
    (root / "broken.mp4").write_bytes(b"this is not a video")
    return root


def _replace(path: Path, frames: int = 40) -> None:
    """Another video under the same name, put in place by a rename as a sync tool does."""
    tmp = path.with_name("new_" + path.stem)
    written = write_video(tmp, codec="h264", num_frames=frames, height=64, width=96, fps=8)
    os.replace(written, path)


def _shards(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "shards").rglob("*")) if p.is_file()}


def _chunk_of(out: Path, name: str) -> set[str]:
    """The shard paths (tars and sidecars) of the chunk holding input `name`."""
    plan = job_plan.read_job_plan(out)
    for ref in plan.chunk_refs():
        if any(v.relpath == name for v in chunks.read_chunk_inputs(out, ref)):
            shards = chunks.read_chunk_plan(out, plan, ref).shards
            return {s.relpath for s in shards} | {s.relpath + ".json" for s in shards}
    raise AssertionError(name)


def _latents(out: Path) -> dict[str, object]:
    return {s["key"]: s for s in LatentShardDataset(out)}


@pytest.fixture
def encoded(tmp_path: Path) -> tuple[Path, Path]:
    videos = _videos(tmp_path / "videos")
    out = tmp_path / "out"
    assert main(["encode", str(videos), "--out", str(out), *ARGS]) == 3  # broken.mp4 fails
    return videos, out


def test_a_replaced_video_is_refused_by_name_and_reencode_changed_redoes_only_its_chunk(
        encoded: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    videos, out = encoded
    before, shards_before = tree_bytes(out), _shards(out)
    _replace(videos / "v1.mp4")
    capsys.readouterr()
    assert main(["encode", str(videos), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "1 input(s) changed" in err and str(videos / "v1.mp4") in err and "--reencode-changed" in err
    assert tree_bytes(out) == before  # a refused run touches nothing

    redone = _chunk_of(out, "v1.mp4")
    assert main(["encode", str(videos), "--out", str(out), *ARGS, "--reencode-changed"]) == 3
    after = _shards(out)
    # Every shard of the other chunks byte for byte as it was; v1's chunk written again.
    assert {k: v for k, v in after.items() if k not in redone} == \
        {k: v for k, v in shards_before.items() if k not in redone}
    assert any(after.get(k) != shards_before.get(k) for k in redone)
    # The whole tree is what a fresh encode of the folder as it is now gives: manifest, failures, chunk plans.
    fresh = tmp_path / "fresh"
    assert main(["encode", str(videos), "--out", str(fresh), *ARGS]) == 3
    assert tree_bytes(out) == tree_bytes(fresh)
    served, expected = _latents(out), _latents(fresh)
    assert served.keys() == expected.keys()
    (key,) = [k for k, s in served.items() if s["meta"]["source"] == "v1.mp4"]
    assert served[key]["meta"] == expected[key]["meta"]
    assert (served[key]["latents"] == expected[key]["latents"]).all()
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["encode", str(videos), "--out", str(out), *ARGS]) == 0  # done now; its failure reported before
    assert "nothing to encode" in capsys.readouterr().out


def test_same_size_new_bytes_is_refused(encoded: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    videos, out = encoded
    path = videos / "v2.mp4"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of a packet: the size and the name stay
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["encode", str(videos), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "sha256 differs" in err


def test_a_touched_file_stays_done_and_is_not_read_again(encoded: tuple[Path, Path],
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    videos, out = encoded
    shards_before = _shards(out)
    path = videos / "v1.mp4"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # `touch`: same bytes, new mtime
    capsys.readouterr()
    assert main(["encode", str(videos), "--out", str(out), *ARGS]) == 0  # broken.mp4's failure was reported before
    assert "nothing to encode" in capsys.readouterr().out
    assert _shards(out) == shards_before
    # The new stat was recorded: the next run compares stats only and never reads a byte of any input.

    def no_read(path: str, quick: dict) -> None:
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(input_stats, "_content", no_read)
    assert main(["encode", str(videos), "--out", str(out), *ARGS]) == 0
    assert _shards(out) == shards_before


@pytest.mark.slow
def test_append_with_a_changed_input_is_refused_then_reencoded(encoded: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    videos, out = encoded
    shards_before = _shards(out)
    # The file that failed is now a real video (its failure record must go), and a new video is added.
    _replace(videos / "broken.mp4", frames=30)
    write_video(videos / "v4", codec="h264", num_frames=44, height=64, width=96, fps=8)
    capsys.readouterr()
    assert main(["encode", str(videos), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert str(videos / "broken.mp4") in err and "v4.mp4" not in err
    assert not list((out / "shards").rglob("p0001-*"))  # the new part is planned, nothing of it encoded

    redone = _chunk_of(out, "broken.mp4")
    assert main(["encode", str(videos), "--out", str(out), *ARGS, "--reencode-changed"]) == 0
    after = _shards(out)
    assert {k: v for k, v in after.items() if k in shards_before and k not in redone} == \
        {k: v for k, v in shards_before.items() if k not in redone}
    assert (out / "failures.jsonl").read_text() == ""  # the old content's failure record is gone
    served = _latents(out)
    fresh = tmp_path / "fresh"
    assert main(["encode", str(videos), "--out", str(fresh), *ARGS]) == 0
    expected = _latents(fresh)
    assert served.keys() == expected.keys() and len(served) == 6
    for key in served:
        assert (served[key]["latents"] == expected[key]["latents"]).all(), key
    assert main(["verify", str(out)]) == 0


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            t.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_tar_members_replaced_are_refused_and_a_rebuilt_tar_of_the_same_bytes_stays_done(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    videos = _videos(tmp_path / "videos")
    members = {f"{i:05d}.mp4": (videos / f"v{i}.mp4").read_bytes() for i in range(3)}
    tar = tmp_path / "data.tar"
    _tar(tar, members)
    out = tmp_path / "out"
    assert main(["encode", str(tar), "--out", str(out), *ARGS]) == 0
    shards_before = _shards(out)
    # Rebuilt from the same bytes (new tar, new mtime): stays done.
    os.utime(tar, ns=(0, tar.stat().st_mtime_ns + 5_000_000_000))
    _tar(tar, members)
    capsys.readouterr()
    assert main(["encode", str(tar), "--out", str(out), *ARGS]) == 0
    assert "nothing to encode" in capsys.readouterr().out
    # Member 00001 replaced by another video of the same name (the tar's header mtime kept: only bytes tell).
    _tar(tar, {**members, "00001.mp4": (videos / "v3.mp4").read_bytes()})
    assert main(["encode", str(tar), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert f"{tar}::00001.mp4" in err and "00000.mp4" not in err
    redone = _chunk_of(out, "data.tar/00001.mp4")
    assert main(["encode", str(tar), "--out", str(out), *ARGS, "--reencode-changed"]) == 0
    after = _shards(out)
    assert {k: v for k, v in after.items() if k not in redone} == \
        {k: v for k, v in shards_before.items() if k not in redone}
    fresh = tmp_path / "fresh"
    assert main(["encode", str(tar), "--out", str(fresh), *ARGS]) == 0
    assert _shards(out) == _shards(fresh)


def test_the_refusal_names_the_first_changes_then_counts_the_rest(tmp_path: Path) -> None:
    changes = [input_stats.Change(f"/d/{i}.mp4", "size 1 -> 2 bytes") for i in range(25)]
    errors = input_stats.changed_error(tmp_path, changes, 3)
    text = str(errors)
    assert "/d/9.mp4" in text and "/d/10.mp4" not in text and "and 15 more" in text and "3 chunk(s)" in text


def test_stats_are_not_settings(tmp_path: Path) -> None:
    """Recording stats changes no fingerprint: a directory encoded before keeps resuming (tests/test_settings.py)."""
    from latentcache.encode.settings import EncodeSettings, JobSettings

    assert "reencode_changed" in JobSettings.__slots__
    assert "reencode_changed" not in str(EncodeSettings().output_affecting())


def test_the_check_gives_the_same_answers_in_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow stats (a network filesystem) are checked in threads; the answers keep the inputs' order."""
    paths = []
    for i in range(600):
        (tmp_path / f"{i}.mp4").write_bytes(b"%d" % i)
        paths.append(str(tmp_path / f"{i}.mp4"))
    recorded = input_stats.input_stats(paths)
    (tmp_path / "500.mp4").write_bytes(b"another file")
    items = list(zip(paths, recorded, strict=True))
    monkeypatch.setattr(input_stats, "_SLOW_STAT", 0.0)
    threaded = input_stats.compare_all(items, 8)
    monkeypatch.setattr(input_stats, "_SLOW_STAT", float("inf"))
    assert threaded == input_stats.compare_all(items, 8)
    assert [c.path for c, _ in threaded if c is not None] == [paths[500]]


@pytest.mark.slow
def test_an_object_replaced_in_s3_is_refused_and_the_same_bytes_put_again_stay_done(
        s3_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Objects are checked by size and ETag (one HEAD each, nothing downloaded), against a real S3 server (moto)."""
    import s3fs

    videos = _videos(tmp_path / "videos")
    (videos / "broken.mp4").unlink()
    url = make_bucket("changed") + "/videos"
    upload(videos, url)
    out = tmp_path / "out"
    assert main(["encode", url, "--out", str(out), *ARGS]) == 0
    shards_before = _shards(out)
    fs = s3fs.S3FileSystem()
    key = url.removeprefix("s3://") + "/v1.mp4"
    fs.pipe_file(key, (videos / "v1.mp4").read_bytes())  # PUT again, same bytes: a new LastModified, the same ETag
    capsys.readouterr()
    assert main(["encode", url, "--out", str(out), *ARGS]) == 0
    assert "nothing to encode" in capsys.readouterr().out
    fs.pipe_file(key, (videos / "v3.mp4").read_bytes())  # another video under the same name
    assert main(["encode", url, "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert f"{url}/v1.mp4" in err and "v0.mp4" not in err
    redone = _chunk_of(out, "v1.mp4")
    assert main(["encode", url, "--out", str(out), *ARGS, "--reencode-changed"]) == 0
    assert {k: v for k, v in _shards(out).items() if k not in redone} == \
        {k: v for k, v in shards_before.items() if k not in redone}
    assert any(_shards(out).get(k) != shards_before.get(k) for k in redone)


@pytest.mark.slow
def test_reencode_changed_killed_half_way_is_finished_by_a_rerun(encoded: tuple[Path, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped after the changed chunk's sidecars went but before its plan did: a plain rerun still refuses (the
    plan still records the old stats), a rerun with --reencode-changed ends as a fresh encode of the folder."""
    videos, out = encoded
    _replace(videos / "v1.mp4")

    def killed(path: Path) -> list[Path]:
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(reencode, "remove_temporaries", killed)
        with pytest.raises(RuntimeError, match="killed"):
            main(["encode", str(videos), "--out", str(out), *ARGS, "--reencode-changed"])
    assert not (out / "manifest.json").exists()  # readers find no manifest naming a shard that is going
    capsys.readouterr()
    assert main(["encode", str(videos), "--out", str(out), *ARGS]) == 2
    assert str(videos / "v1.mp4") in capsys.readouterr().err
    assert main(["encode", str(videos), "--out", str(out), *ARGS, "--reencode-changed"]) == 3
    fresh = tmp_path / "fresh"
    assert main(["encode", str(videos), "--out", str(fresh), *ARGS]) == 3
    assert tree_bytes(out) == tree_bytes(fresh)


@pytest.mark.slow
def test_a_caption_changed_in_a_list_or_a_sidecar_is_refused_by_name(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An input's key is its relative path, so a recaptioned input is no new input: given again with another caption
    (in the list, or in its NAME.txt sidecar) or other extra columns, it is refused, never kept silently stale."""
    videos = _videos(tmp_path / "videos")
    (videos / "broken.mp4").unlink()
    listing = tmp_path / "list.csv"
    rows = ["path,caption,score", "videos/v0.mp4,a red ball,1", "videos/v1.mp4,a blue cube,2",
            "videos/v2.mp4,a green cone,3"]
    listing.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["encode", str(listing), "--out", str(out), *ARGS]) == 0
    before = tree_bytes(out)

    listing.write_text("\n".join([*rows[:3], "videos/v2.mp4,a yellow cone,3"]) + "\n")
    assert main(["encode", str(listing), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "1 input(s) planned in" in err and "videos/v2.mp4 (caption was 'a green cone', now 'a yellow cone')" in err
    assert tree_bytes(out) == before  # refused before anything was written

    listing.write_text("\n".join([*rows[:3], "videos/v2.mp4,a green cone,4"]) + "\n")  # another extra column value
    assert main(["encode", str(listing), "--out", str(out), *ARGS]) == 2
    assert "videos/v2.mp4 (extra was {'score': '3'}, now {'score': '4'})" in capsys.readouterr().err

    # The earlier values again, and a new input: appended.
    listing.write_text("\n".join([*rows, "videos/v3.mp4,a new one,5"]) + "\n")
    assert main(["encode", str(listing), "--out", str(out), *ARGS]) == 0
    captions = sorted(s["caption"] for s in _latents(out).values())
    assert captions == ["a blue cube", "a green cone", "a new one", "a red ball"]

    folder_out = tmp_path / "folder_out"
    (videos / "v0.txt").write_text("a red ball")
    assert main(["encode", str(videos), "--out", str(folder_out), *ARGS]) == 0
    (videos / "v0.txt").write_text("a red ball, rolling")
    assert main(["encode", str(videos), "--out", str(folder_out), *ARGS]) == 2
    assert "v0.mp4 (caption was 'a red ball', now 'a red ball, rolling')" in capsys.readouterr().err

    # A list without a caption column takes each video's sidecar: a file the list's identity does not cover, so such
    # a list is read again on every run and the changed sidecar is still found.
    paths_list, paths_out = tmp_path / "paths.txt", tmp_path / "paths_out"
    paths_list.write_text("videos/v0.mp4\nvideos/v1.mp4\n")
    assert main(["encode", str(paths_list), "--out", str(paths_out), *ARGS]) == 0
    (videos / "v0.txt").write_text("a red ball, at rest")
    assert main(["encode", str(paths_list), "--out", str(paths_out), *ARGS]) == 2
    assert "v0.mp4 (caption was 'a red ball, rolling', now 'a red ball, at rest')" in capsys.readouterr().err


# Two samples a shard and one chunk: a changed input's shard also holds another input's sample, which is carried over.
SHARED = [*ARGS[: ARGS.index("--samples-per-shard")], "--samples-per-shard", "2", "--chunk-size", "8",
          "--batch-size", "1"]


def _members(out: Path) -> dict[str, bytes]:
    """Every sample member of every shard, by member name: what a trainer reads, wherever a sample lies."""
    found = {}
    for tar in sorted((out / "shards").rglob("*.tar")):
        with tarfile.open(tar) as t:
            found.update({m.name: t.extractfile(m).read() for m in t.getmembers()})
    return found


def _of_source(members: dict[str, bytes], out: Path) -> dict[str, set[str]]:
    """Member names by the sample's source video."""
    by = {}
    for s in LatentShardDataset(out):
        by.setdefault(s["meta"]["source"], set()).update(n for n in members if n.startswith(s["key"] + "."))
    return by


def _four_listed_videos(tmp_path: Path) -> Path:
    """videos/v0..v3.mp4 (24 to 36 frames) and the list videos.txt that names them."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for i, frames in enumerate((24, 28, 32, 36)):
        write_video(folder / f"v{i}", codec="h264", num_frames=frames, height=64, width=96, fps=8)
    videos = tmp_path / "videos.txt"
    videos.write_text("".join(f"videos/v{i}.mp4\n" for i in range(4)))
    return videos


def _deleted_and_replaced(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """Four videos of a list encoded into one chunk of two-sample shards; then two of them deleted (the cache kept,
    the sources gone) and one other replaced. Returns the list, the output and its members before."""
    videos = _four_listed_videos(tmp_path)
    folder = tmp_path / "videos"
    out = tmp_path / "out"
    assert main(["encode", str(videos), "--out", str(out), *SHARED]) == 0
    before = _members(out)
    (folder / "v0.mp4").unlink()
    (folder / "v2.mp4").unlink()
    _replace(folder / "v1.mp4")
    return videos, out, before


@pytest.mark.slow
def test_reencode_changed_keeps_the_samples_of_deleted_inputs(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Only the changed input's clips are encoded again: the samples of the deleted (unchanged) inputs of its chunk,
    and of its shard, stay byte for byte, and nothing is recorded as failed."""
    videos, out, before = _deleted_and_replaced(tmp_path)
    by_source = _of_source(before, out)
    assert main(["encode", str(videos), "--out", str(out), *SHARED]) == 2  # v1 changed; gone ones are not changes
    assert main(["encode", str(videos), "--out", str(out), *SHARED, "--reencode-changed"]) == 0
    after = _members(out)
    for name in ("videos/v0.mp4", "videos/v2.mp4", "videos/v3.mp4"):
        assert {n: after.get(n) for n in by_source[name]} == {n: before[n] for n in by_source[name]}, name
    assert any(after[n] != before[n] for n in by_source["videos/v1.mp4"] if n.endswith(".safetensors"))
    assert (out / "failures.jsonl").read_text() == ""
    assert not list((out / "chunks").rglob("*.carry.tar*"))  # the carry goes once its chunk is done
    # v1's new latents are what a fresh encode of the new file gives (under the same key: a list in the same folder).
    alone = tmp_path / "v1.txt"
    alone.write_text("videos/v1.mp4\n")
    fresh = tmp_path / "fresh"
    assert main(["encode", str(alone), "--out", str(fresh), *SHARED]) == 0
    (new,) = LatentShardDataset(fresh)
    served = {s["meta"]["source"]: s for s in LatentShardDataset(out)}
    assert served.keys() == {f"videos/v{i}.mp4" for i in range(4)}
    assert (served["videos/v1.mp4"]["latents"] == new["latents"]).all()
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["encode", str(videos), "--out", str(out), *SHARED]) == 0
    assert "nothing to encode" in capsys.readouterr().out


@pytest.mark.parametrize("stage", fast_cases(["carried", "removed", "planned", "written"], fast=["removed"]))
def test_reencode_changed_killed_at_each_step_ends_as_an_uninterrupted_run(tmp_path: Path, stage: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the carry is written, after the old shards went, after the new chunk plan, or after the shards
    were written but before the carry went: the same command again gives the tree an uninterrupted run gives."""
    videos, out, _ = _deleted_and_replaced(tmp_path)
    whole = tmp_path / "whole"
    shutil.copytree(out, whole)
    assert main(["encode", str(videos), "--out", str(whole), *SHARED, "--reencode-changed"]) == 0
    target = {"carried": (reencode, "sidecar_of"), "removed": (reencode, "remove_temporaries"),
              "planned": (reencode.log, "warning"), "written": (reencode, "drop_carry")}[stage]
    real = getattr(*target)
    calls = {"n": 0}

    def killed(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if stage == "removed" and calls["n"] == 1:
            return real(*args, **kwargs)  # one old shard gone, the next not yet
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(*target, killed)
        with pytest.raises(RuntimeError, match="killed"):
            main(["encode", str(videos), "--out", str(out), *SHARED, "--reencode-changed"])
    assert main(["encode", str(videos), "--out", str(out), *SHARED, "--reencode-changed"]) == 0
    assert tree_bytes(out) == tree_bytes(whole)


def _copy_folder(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=shutil.copy2)  # same bytes and mtimes: a mirror, a moved copy


@pytest.mark.parametrize("how", fast_cases(["folder link repointed", "dataset moved", "file links repointed"],
                                            fast=["folder link repointed"]))
def test_an_input_is_checked_at_what_it_names_now(tmp_path: Path, how: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A replaced video reached through a repointed folder link, a dataset moved with one video replaced, or a
    git-annex/DVC-style link of a folder repointed at another object: refused by name (the planned path still holds
    the old bytes, or nothing), never "already done" with the old latents; --reencode-changed refuses it too, since
    it reads the planned path."""
    first = _videos(tmp_path / "first")
    data = tmp_path / "data"
    if how == "file links repointed":
        objects = tmp_path / "objects"
        _copy_folder(first, objects)
        data.mkdir()
        for f in sorted(objects.iterdir()):
            (data / f.name).symlink_to(f)
    else:
        data.symlink_to(first)
    out = tmp_path / "out"
    assert main(["encode", str(data), "--out", str(out), *ARGS]) == 3  # broken.mp4
    given = data
    if how == "folder link repointed":
        second = tmp_path / "second"
        _copy_folder(first, second)
        _replace(second / "v1.mp4")
        data.unlink()
        data.symlink_to(second)
        changed = second / "v1.mp4"
    elif how == "dataset moved":
        given = tmp_path / "moved"
        os.rename(first, given)
        _replace(given / "v1.mp4")
        changed = given / "v1.mp4"
    else:
        _replace(objects / "v1.mp4")
        new_object = objects / "v1.mp4"
        os.rename(new_object, objects / "other.mp4")
        (data / "v1.mp4").unlink()
        (data / "v1.mp4").symlink_to(objects / "other.mp4")
        changed = objects / "other.mp4"
        # The old object stays where the plan recorded it, unchanged (an annex keeps every version).
        shutil.copy2(first / "v1.mp4", objects / "v1.mp4")
    before = tree_bytes(out)
    for extra in ([], ["--reencode-changed"]):
        capsys.readouterr()
        assert main(["encode", str(given), "--out", str(out), *ARGS, *extra]) == 2
        err = capsys.readouterr().err
        assert str(changed) in err and "another path than they were planned at" in err
        assert tree_bytes(out) == before


def test_a_listed_link_repointed_at_a_file_of_the_same_size_and_mtime_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A list names a link (git-annex, DVC): repointed at another object of the same size and mtime, its bytes are
    read and compared, where a stat of what it names would call it unchanged."""
    objects = tmp_path / "objects"
    objects.mkdir()
    one = write_video(objects / "one", codec="h264", num_frames=24, height=64, width=96, fps=8)
    other = objects / "other.mp4"
    data = bytearray(one.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    other.write_bytes(bytes(data))
    st = one.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    link = tmp_path / "v.mp4"
    link.symlink_to(one)
    listed = tmp_path / "videos.txt"
    listed.write_text("v.mp4\n")
    out = tmp_path / "out"
    assert main(["encode", str(listed), "--out", str(out), *ARGS]) == 0
    link.unlink()
    link.symlink_to(other)
    capsys.readouterr()
    assert main(["encode", str(listed), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert str(link) in err and "sha256 differs" in err
    assert main(["encode", str(listed), "--out", str(out), *ARGS, "--reencode-changed"]) == 0
    link.unlink()
    link.symlink_to(one)  # back: the same link target and bytes as the stat recorded first
    assert main(["encode", str(listed), "--out", str(out), *ARGS]) == 2


@pytest.mark.parametrize("when", fast_cases(["before its clip is decoded", "while its clip is decoded"],
                                             fast=["while its clip is decoded"]))
@pytest.mark.slow
def test_a_video_replaced_while_its_chunk_is_encoded_and_put_back_later_keeps_no_other_latents(
        tmp_path: Path, when: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Replaced after its chunk was planned, then put back as it was after the run: the run stops (exit 2, naming it)
    before any shard holds the other video's latents, and the rerun encodes the bytes that were planned."""
    videos = _videos(tmp_path / "videos")
    target = videos / "v1.mp4"
    saved = tmp_path / "saved.mp4"
    shutil.copy2(target, saved)  # same bytes and mtime: putting it back restores what the plan recorded
    name = "decode_planned" if when.startswith("before") else "decode_clip"
    real = getattr(loader, name)

    def swapping(first: object, *args: object, **kwargs: object) -> object:
        source = first.source if name == "decode_planned" else first  # type: ignore[attr-defined]
        if source == str(target) and not target.with_name("swapped").exists():
            target.with_name("swapped").touch()
            _replace(target)
        return real(first, *args, **kwargs)

    out = tmp_path / "out"
    # While: in a decode worker process (the error crosses the worker queue), before: in this process.
    workers = ["--workers", "1" if name == "decode_clip" else "0"]
    with monkeypatch.context() as m:
        m.setattr(loader, name, swapping)
        capsys.readouterr()
        assert main(["encode", str(videos), "--out", str(out), *ARGS, *workers]) == 2
    err = capsys.readouterr().err
    assert f"{target} changed" in err and "nothing of it was written" in err
    key = chunks.clip_key("v1.mp4", 0)
    assert not any(key in s for s in _members_names(out))
    shutil.copy2(saved, tmp_path / "back.mp4")
    os.replace(tmp_path / "back.mp4", target)  # put back later
    assert main(["encode", str(videos), "--out", str(out), *ARGS]) == 3  # broken.mp4
    fresh = tmp_path / "fresh"
    assert main(["encode", str(videos), "--out", str(fresh), *ARGS]) == 3
    served, expected = _latents(out), _latents(fresh)
    assert (served[key]["latents"] == expected[key]["latents"]).all()


def _members_names(out: Path) -> list[str]:
    names = []
    for tar in (out / "shards").rglob("*.tar"):
        with tarfile.open(tar) as t:
            names += t.getnames()
    return names


@pytest.mark.slow
def test_reencode_changed_carries_samples_over_in_object_storage(s3_endpoint: str, tmp_path: Path) -> None:
    """`--out s3://...`: the old shards are read back from the store (one GET each, checked against their sidecars'
    sha256) and the deleted inputs' samples carried over, as on disk."""
    videos = _four_listed_videos(tmp_path)
    folder = tmp_path / "videos"
    out = make_bucket("carried") + "/latents"
    assert main(["encode", str(videos), "--out", out, *SHARED]) == 0

    def served() -> dict[str, object]:
        return {s["meta"]["source"]: s for s in LatentShardDataset(out, sample_posterior=False)}

    before = served()
    (folder / "v0.mp4").unlink()
    (folder / "v2.mp4").unlink()
    _replace(folder / "v1.mp4")
    assert main(["encode", str(videos), "--out", out, *SHARED, "--reencode-changed"]) == 0
    after = served()
    assert after.keys() == before.keys()
    for name in ("videos/v0.mp4", "videos/v2.mp4", "videos/v3.mp4"):
        assert (after[name]["latents"] == before[name]["latents"]).all(), name
    assert not (after["videos/v1.mp4"]["latents"].shape == before["videos/v1.mp4"]["latents"].shape
                and (after["videos/v1.mp4"]["latents"] == before["videos/v1.mp4"]["latents"]).all())
    assert main(["verify", out]) == 0


@pytest.mark.slow
def test_overwrite_counts_a_left_carry_apart_from_the_shard_tars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A --reencode-changed run killed before its carry went leaves chunks/.../*.carry.tar beside the new shards:
    --overwrite removes it with its sidecar and says so apart, so "N shard tar(s)" is the shard tars it removed."""
    videos, out, _ = _deleted_and_replaced(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(reencode, "drop_carry", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            main(["encode", str(videos), "--out", str(out), *SHARED, "--reencode-changed"])
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    ours = [n for n in files if n != ".latentcache" and not n.startswith("chunks/done/")]
    shards = [n for n in ours if n.startswith("shards/") and n.endswith(".tar")]
    [carry] = [n for n in ours if n.endswith(".carry.tar")]
    assert f"{carry}.json" in ours and shards
    (tmp_path / "videos" / "v0.mp4").write_bytes((tmp_path / "videos" / "v3.mp4").read_bytes())
    (tmp_path / "videos" / "v2.mp4").write_bytes((tmp_path / "videos" / "v3.mp4").read_bytes())
    caplog.clear()
    assert main(["encode", str(videos), "--out", str(out), *SHARED, "--overwrite"]) == 0
    [said] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--overwrite: removed")]
    assert said.startswith(f"--overwrite: removed {len(ours)} file(s) that latentcache wrote in {out} "
                           f"({len(shards)} shard tar(s) and 1 carry tar(s) of --reencode-changed with their "
                           "sidecars, ")
    assert not list((out / "chunks").rglob("*.carry.tar*"))
