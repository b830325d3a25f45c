"""Object storage against a real S3 API: moto's server on 127.0.0.1, spoken to over HTTP by s3fs/botocore.

Nothing is mocked inside latentcache: the server is a separate S3 endpoint (AWS_ENDPOINT_URL), credentials are
dummy ones from the environment, exactly as a user's would come from theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="object storage tests need s3fs: pip install 'latentcache[s3]'")
moto_server = pytest.importorskip("moto.server", reason="object storage tests need moto[server] (test extra)")

from conftest import ENCODE_SMALL, ENCODE_TINY, SMALL_VIDEOS, tree_bytes  # noqa: E402
from s3_server import make_bucket, upload  # noqa: E402

from latentcache.format.shards import PAUSE_ENV  # noqa: E402


def test_dataset_verify_and_info_read_from_s3(s3_endpoint: str, encoded_dir: Path) -> None:
    from latentcache.tools.verify import info_lines, verify
    from latentcache.train.dataset import LatentShardDataset

    url = make_bucket("read-latents") + "/latents"
    upload(encoded_dir, url)
    local = {s["key"]: s["latents"] for s in LatentShardDataset(encoded_dir, shuffle=False, batch_size=None)}
    remote = {s["key"]: s["latents"] for s in LatentShardDataset(url, shuffle=False, batch_size=None)}
    assert sorted(remote) == sorted(local) and len(local) == 8
    for key, latents in local.items():
        assert remote[key].equal(latents), key
    report = verify(url)
    assert report.ok, report.problems
    assert report.samples == 8 and report.bytes == sum(p.stat().st_size for p in encoded_dir.rglob("*.tar"))
    assert any(line.startswith("dataset") and url in line for line in info_lines(url))


def test_changed_shard_in_s3_is_refused(s3_endpoint: str, encoded_dir: Path) -> None:
    import s3fs

    from latentcache.errors import ShardFormatError
    from latentcache.tools.verify import verify
    from latentcache.train.dataset import LatentShardDataset

    url = make_bucket("changed-latents") + "/latents"
    upload(encoded_dir, url)
    first = json.loads((encoded_dir / "manifest.json").read_text())["shards"][0]["path"]
    fs = s3fs.S3FileSystem()
    key = f"{url.removeprefix('s3://')}/{first}"
    data = bytearray(fs.cat_file(key))
    data[700] ^= 0xFF  # inside the first member's bytes: same size, other content
    fs.pipe_file(key, bytes(data))
    with pytest.raises(ShardFormatError, match="sha256"):
        list(LatentShardDataset(url, shuffle=False, batch_size=None))
    report = verify(url)
    assert not report.ok and any(first in p and "sha256" in p for p in report.problems)


def test_cli_verify_and_info_take_an_s3_url(s3_endpoint: str, encoded_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from latentcache.cli import main

    url = make_bucket("cli-latents") + "/latents"
    upload(encoded_dir, url)
    assert main(["info", url]) == 0
    assert main(["verify", url]) == 0
    assert "8 samples in 4 shard(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_encode_reads_inputs_from_s3(s3_endpoint: str, video_dir: Path, encoded_dir: Path, tmp_path: Path) -> None:
    """The same videos under s3://bucket/videos/ give byte-identical shards to the local folder: same keys (from
    the path relative to the prefix), same captions (NAME.txt beside the video), same decoded frames."""
    from latentcache.cli import main

    url = make_bucket("inputs") + "/videos/"
    upload(video_dir, url.rstrip("/"))
    out = tmp_path / "out"
    assert main(["encode", url, "--out", str(out), "--clips", "uniform:2", "--short", "pad",
                 "--samples-per-shard", "2", *ENCODE_TINY]) == 0
    local = json.loads((encoded_dir / "manifest.json").read_text())
    remote = json.loads((out / "manifest.json").read_text())
    assert [(s["path"], s["sha256"]) for s in remote["shards"]] == [(s["path"], s["sha256"]) for s in local["shards"]]


@pytest.mark.slow
def test_encode_reads_a_list_of_s3_urls(s3_endpoint: str, video_dir: Path, tmp_path: Path) -> None:
    from latentcache.cli import main
    from latentcache.train.dataset import LatentShardDataset

    url = make_bucket("listed") + "/v"
    upload(video_dir, url)
    rows = [{"path": f"{url}/{f.relative_to(video_dir).as_posix()}", "caption": f"caption of {f.stem}"}
            for f in sorted(video_dir.rglob("*")) if f.is_file() and f.suffix != ".txt"]
    listing = tmp_path / "videos.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["encode", str(listing), "--out", str(out), "--clips", "uniform:1", "--short", "pad",
                 *ENCODE_TINY]) == 0
    samples = list(LatentShardDataset(out, shuffle=False, batch_size=None))
    assert len(samples) == len(rows) == 4
    assert {s["caption"] for s in samples} == {r["caption"] for r in rows}
    assert {s["meta"]["source"] for s in samples} == {r["path"].removeprefix("s3://") for r in rows}


# The encode CLI with the shard writer frozen (LATENTCACHE_TEST_PAUSE_AT, see shards.PAUSE_ENV) just before the
# 2nd shard's sidecar PUT: the state "written, not done" with one shard done, held until the kill (issue 20.8).
ENCODE = "import sys; from latentcache.cli import main; sys.exit(main(sys.argv[1:]))"


def _objects(url: str) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = url.removeprefix("s3://")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in sorted(fs.find(root))}


@pytest.mark.slow
def test_kill_9_into_s3_then_resume_equals_an_uninterrupted_local_run(s3_endpoint: str, small_videos: Path,
                                                                       tmp_path: Path) -> None:
    """--out s3://...: a run killed with SIGKILL after a shard's PUT but before its sidecar's, then run again, leaves
    exactly the objects (plan, inputs, chunk plans, shards, sidecars, manifest, failures) an uninterrupted local run
    writes as files, byte for byte."""
    from latentcache.cli import main

    args = [*ENCODE_SMALL, "--device", "cpu", "--workers", "1"]
    reference = tmp_path / "reference"
    assert main(["encode", str(small_videos), "--out", str(reference), *args]) in (0, 3)  # broken.mp4 fails: 3
    url = make_bucket("resume") + "/latents"
    pause = tmp_path / "pause"
    pause.mkdir()
    log = tmp_path / "killed.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", ENCODE, "encode", str(small_videos), "--out", url, *args],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, PAUSE_ENV: f"sidecar#2:{pause}"})
    deadline = time.monotonic() + 240
    try:
        while not list(pause.glob("*.reached")):
            assert proc.poll() is None, f"finished before the kill:\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:  # also when the wait failed: a frozen writer never ends by itself
        with contextlib.suppress(ProcessLookupError):  # already ended (the wait failed)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    objects = _objects(url)
    unfinished = {n for n in objects if n.endswith(".tar") and n + ".json" not in objects}
    # Exactly the frozen moment: the 2nd shard PUT, its sidecar not; the 1st done; no manifest.
    assert len(unfinished) == 1 and len([n for n in objects if n.endswith(".tar.json")]) == 1, sorted(objects)
    assert "manifest.json" not in objects

    assert main(["encode", str(small_videos), "--out", url, *args]) in (0, 3)
    assert _objects(url) == tree_bytes(reference)
    assert len([n for n in tree_bytes(reference) if n.endswith(".tar")]) == SMALL_VIDEOS


@pytest.mark.slow
def test_a_late_clip_of_an_mp4_with_moov_at_the_end_is_read_with_range_requests(
        s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyAV's mp4 muxer puts `moov` at the end (no faststart): probing needs the end, a late clip needs its
    packets; neither downloads the object. Counted on the files PyAV reads through, with 64 KiB blocks."""
    import s3fs

    from latentcache.encode.decoding import decode, probing
    from latentcache.encode.settings import ClipSettings
    from latentcache.storage import store
    from latentcache.tools.synthetic import write_video

    video = write_video(tmp_path / "long", codec="h264", num_frames=1440, height=240, width=320, fps=24, gop=48)
    data = video.read_bytes()
    assert _top_level_boxes(data).index("moov") > _top_level_boxes(data).index("mdat")
    url = make_bucket("ranges") + "/long" + video.suffix
    s3fs.S3FileSystem().pipe_file(url.removeprefix("s3://"), data)
    opened = []
    real = store._fs_open

    def counted(u: str, block_size: int = store.BLOCK_SIZE):  # 64 KiB blocks: reads are counted finely
        f = real(u, 64 << 10)
        opened.append(f.cache)  # kept: a closed file drops its cache, and decode closes what it opens
        return f

    monkeypatch.setattr(store, "_fs_open", counted)
    info = probing.probe(url)
    assert abs(info.duration - 60.0) < 0.1
    probed = sum(c.total_requested_bytes for c in opened)
    opened.clear()
    clip = decode.decode_clip(url, 57.0, ClipSettings(frames=9, fps=8.0, height=64, width=96))
    assert clip.frames.shape[0] == 9
    read = sum(c.total_requested_bytes for c in opened)
    assert probed < len(data) / 4 and read < len(data) / 4, (probed, read, len(data))
    assert (clip.frames == decode.decode_clip(str(video), 57.0, ClipSettings(frames=9, fps=8.0, height=64,
                                                                            width=96)).frames).all()


def _top_level_boxes(data: bytes) -> list[str]:
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        boxes.append(data[pos + 4:pos + 8].decode("latin-1"))
        if size == 1:
            size = int.from_bytes(data[pos + 8:pos + 16], "big")
        if size < 8:
            break
        pos += size
    return boxes


def test_a_large_object_is_read_in_concurrent_parts_and_bounded(s3_endpoint: str) -> None:
    import s3fs

    from latentcache.storage import store

    url = make_bucket("parts") + "/big.tar"
    data = os.urandom(2 * store.PART_SIZE + 12345)
    s3fs.S3FileSystem().pipe_file(url.removeprefix("s3://"), data)
    assert store.read_url(url, len(data)) == data  # the manifest's size: parts, then the one byte past it is absent
    assert store.read_url(url, len(data) - 10) == data[: len(data) - 9]  # smaller than it is: limit + 1 bytes
    assert store.read_url(url, len(data) + 3 * store.PART_SIZE) == data  # larger: a part past the end, one GET


def test_a_mirrored_image_in_s3_is_shown_as_the_same_file_on_disk(s3_endpoint: str, tmp_path: Path) -> None:
    """--images from s3://: the EXIF orientation is read through the source opener, so orientation 2 (mirrored)
    gives the local file's pixels, not a picture rotated 180 degrees; the encoded shards are byte-identical."""
    import numpy as np

    Image = pytest.importorskip("PIL.Image")
    from latentcache.cli import main
    from latentcache.encode.decoding.decode import decode_clip
    from latentcache.encode.decoding.image import exif_orientation
    from latentcache.encode.settings import ClipSettings

    local = tmp_path / "pics"
    local.mkdir()
    rgb = np.random.default_rng(2).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    rgb[:20, :24] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 2
    Image.fromarray(rgb).save(local / "mirrored.png", exif=exif.tobytes())
    url = make_bucket("pictures") + "/pics"
    upload(local, url)
    assert exif_orientation(f"{url}/mirrored.png") == 2
    clip = ClipSettings(frames=1, fps=8.0, height=64, width=96, images=True)
    here, there = decode_clip(local / "mirrored.png", 0.0, clip), decode_clip(f"{url}/mirrored.png", 0.0, clip)
    np.testing.assert_array_equal(here.frames[0], rgb[:, ::-1])
    np.testing.assert_array_equal(there.frames, here.frames)
    outs = {}
    for name, source in (("local", str(local)), ("s3", url + "/")):
        outs[name] = tmp_path / name
        assert main(["encode", source, "--out", str(outs[name]), "--images", *ENCODE_TINY]) == 0
    shards = [json.loads((outs[n] / "manifest.json").read_text())["shards"] for n in ("local", "s3")]
    assert [(s["path"], s["sha256"]) for s in shards[0]] == [(s["path"], s["sha256"]) for s in shards[1]]


@pytest.mark.parametrize("path", ["pipe:touch {marker}; cat /dev/null", "s3://other-bucket/latents/000000.tar",
                                  "../other/shards/17x64x96/000000.tar"])
def test_a_manifest_in_s3_naming_a_url_or_another_place_is_refused(s3_endpoint: str, encoded_dir: Path,
                                                                    tmp_path: Path, path: str) -> None:
    """A stranger's dataset in S3 whose manifest names a pipe: command, another bucket or a parent folder: the
    dataset and verify refuse it, naming the shard path, and nothing runs."""
    from latentcache.cli import main
    from latentcache.errors import ShardFormatError
    from latentcache.train.dataset import LatentShardDataset

    marker = tmp_path / "pwned"
    path = path.format(marker=marker)
    url = make_bucket("stranger-latents") + f"/latents-{abs(hash(path))}"
    upload(encoded_dir, url)
    import s3fs

    manifest = json.loads((encoded_dir / "manifest.json").read_text())
    manifest["shards"][0]["path"] = path
    s3fs.S3FileSystem().pipe_file(f"{url.removeprefix('s3://')}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ShardFormatError, match="not a plain relative path") as info:
        LatentShardDataset(url)
    assert repr(path) in str(info.value)
    assert main(["verify", url]) == 2
    assert not marker.exists()


def test_urls_typed_that_are_not_object_storage_are_usage_errors(tmp_path: Path, capsys) -> None:
    from latentcache.cli import main

    assert main(["encode", "http://example.invalid/videos/", "--out", str(tmp_path / "o"), *ENCODE_TINY]) == 2
    assert "not an object-storage url" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["encode", str(tmp_path), "--out", "http://example.invalid/out", *ENCODE_TINY])
    assert info.value.code == 2
    # The reason, not argparse's bare "invalid value".
    assert ("argument --out: http://example.invalid/out: not an object-storage url latentcache reads"
            in capsys.readouterr().err)


def test_a_store_whose_package_is_missing_is_a_usage_error_naming_it(tmp_path: Path, capsys) -> None:
    """gs:// is object storage, but gcsfs is not installed here: exit 2 with fsspec's reason, not a traceback."""
    import importlib.util

    from latentcache.cli import main
    from latentcache.tools.synthetic import write_video

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a", codec="h264", num_frames=36, height=64, width=96, fps=8)
    assert main(["encode", str(videos), "--out", "gs://bucket/out", *ENCODE_TINY]) == 2
    err = capsys.readouterr().err
    assert "error: gs://bucket/out" in err and "gcsfs" in err and "Traceback" not in err
