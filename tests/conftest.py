"""Shared fixtures: real videos written once per session with PyAV's encoders, and the tiny random VAE."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from latentcache.encode.settings import ClipSettings, EncodeSettings, VAESettings
from latentcache.tools.synthetic import write_video

# One intra-op thread for the in-process tests (a run's --cpu-threads still sets its own): the tiny models gain
# nothing from a second one, and on a 2-core machine shared with other work OpenMP's waiting threads made a 3-clip
# encode 4 to 6 times slower (0.3 s with one thread, 1.1 to 1.8 s with two). Subprocesses choose their own count.
torch.set_num_threads(1)

# Small enough for a 2-core CI machine, real enough to exercise codecs, seeking and the VAE's shape rules.
TINY_CLIP = ClipSettings(frames=17, fps=8.0, height=64, width=96)
TINY_VAE = VAESettings(source="tiny-random-cogvideox", subfolder=None)


def tiny_settings(**overrides) -> EncodeSettings:
    return EncodeSettings(clip=overrides.pop("clip", TINY_CLIP), vae=overrides.pop("vae", TINY_VAE), **overrides)


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixed mp4/webm folder: 3 s at 24 fps, 96x128 and bigger, one with a caption sidecar."""
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "a_h264", codec="h264", num_frames=72, height=96, width=128)
    write_video(d / "b_vp9", codec="vp9", num_frames=72, height=96, width=128)
    write_video(d / "c_h264", codec="h264", num_frames=90, height=120, width=160, fps=30)
    (d / "sub").mkdir()
    write_video(d / "sub" / "d_vp9", codec="vp9", num_frames=60, height=96, width=128, fps=20)
    (d / "a_h264.txt").write_text("a red square crosses the frame", encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tiny_vae():
    from latentcache.encode.models.vae import load_vae

    return load_vae(TINY_VAE, "cpu")


ENCODE_TINY = ["--vae", "tiny-random-cogvideox", "--device", "cpu", "--frames", "17", "--fps", "8",
               "--height", "64", "--width", "96"]


@pytest.fixture(scope="session")
def encoded_dir(video_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`latentcache encode` of video_dir with the tiny random VAE: 8 clips (2 per video) in 4 shards of 2."""
    from latentcache.cli import main

    out = tmp_path_factory.mktemp("encoded") / "out"
    code = main(["encode", str(video_dir), "--out", str(out), "--clips", "uniform:2", "--short", "pad",
                 "--samples-per-shard", "2", *ENCODE_TINY])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def two_bucket_dir(encoded_dir: Path, video_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """encoded_dir plus a 17x64x64 bucket (2 clips of video_dir/sub, other keys), merged into one manifest the way
    a multi-bucket encode lays it out: shards/BUCKET/NNNNNN.tar."""
    import json
    import shutil

    from latentcache.cli import main

    other = tmp_path_factory.mktemp("encoded64") / "out"
    args = [a if a != "96" else "64" for a in ENCODE_TINY]
    assert main(["encode", str(video_dir / "sub"), "--out", str(other), "--clips", "uniform:2", *args]) == 0
    merged = tmp_path_factory.mktemp("two_buckets") / "out"
    shutil.copytree(encoded_dir, merged)
    manifest = json.loads((merged / "manifest.json").read_text())
    extra = json.loads((other / "manifest.json").read_text())
    for shard in extra["shards"]:
        target = merged / shard["path"].replace("000000", "000100")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(other / shard["path"], target)
        manifest["shards"].append({**shard, "path": target.relative_to(merged).as_posix()})
    manifest["buckets"].update(extra["buckets"])
    manifest["counts"]["samples"] += extra["counts"]["samples"]
    manifest["counts"]["shards"] += extra["counts"]["shards"]
    (merged / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return merged


# The decoding matrix: every codec/container synthetic.write_video knows, 3 s at 24 fps, 96x128.
MATRIX_CODECS = ("h264", "h264_bframes", "h264_444", "hevc10", "vp9", "av1", "prores", "mjpeg", "gif", "mpegts",
                 "mpeg4")
MATRIX_FRAMES, MATRIX_FPS, MATRIX_HEIGHT, MATRIX_WIDTH = 72, 24, 96, 128


@pytest.fixture(scope="session")
def codec_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """codec name -> a real file of that codec and container, with the moving square and the corner marker."""
    d = tmp_path_factory.mktemp("matrix")
    return {codec: write_video(d / f"m_{codec}", codec=codec, num_frames=MATRIX_FRAMES, height=MATRIX_HEIGHT,
                               width=MATRIX_WIDTH, fps=MATRIX_FPS) for codec in MATRIX_CODECS}


# ------------------------------------------------------------------ multi-process encoding (accelerate, SLURM)
# Six 3 s videos give six one-clip shards: enough for ranks to interleave and for a kill to land mid-run.
SMALL_VIDEOS = 6
ENCODE_SMALL = ["--vae", "tiny-random-cogvideox", "--frames", "17", "--fps", "8", "--height", "64", "--width", "96",
                "--clips", "first", "--samples-per-shard", "1", "--chunk-size", "1", "--cpu-threads", "1"]
# --chunk-size 1: the default chunk size follows the first planner's world size (job_plan.auto_chunk_size), and these
# runs compare outputs planned by 1, 2 and 6 processes byte for byte, which holds for the same plan. --cpu-threads 1:
# each shard's software record holds the thread count (the latents' last bits depend on it), and these runs compare
# one process with several, each of which would otherwise take its own share of the cores.
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six short h264 videos plus one file that is not a video (a plan-time failure record)."""
    d = tmp_path_factory.mktemp("small_videos")
    for i in range(SMALL_VIDEOS):
        write_video(d / f"v{i}", codec="h264", num_frames=24, height=64, width=96, fps=8)
    (d / "broken.mp4").write_bytes(b"this is not a video")
    return d


@pytest.fixture(scope="session")
def launch_encode():
    """start(out, log, *extra, nproc=2, script=...) -> Popen: `accelerate launch` of jobs/encode.py (or a wrapper
    script) over `small_videos` with CPU processes, in its own session, output in `log`."""
    import os
    import socket
    import subprocess
    import sys

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def start(videos: Path, out: Path, log: Path, *extra: str, nproc: int = 2,
              script: Path = REPO_ROOT / "jobs" / "encode.py", env: dict[str, str] | None = None):
        accelerate = Path(sys.executable).parent / "accelerate"
        cmd = [str(accelerate), "launch", "--num_machines", "1", "--num_processes", str(nproc),
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
        if nproc > 1:
            cmd.append("--multi_gpu")  # with no GPU visible, jobs/encode.py connects the processes over gloo
        cmd += [str(script), str(videos), "--out", str(out), *ENCODE_SMALL, *extra]
        # CPU only, even on a GPU machine: the byte-identity checks compare runs of the same kind.
        full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "w") as f:
            return subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    return start


@pytest.fixture(scope="session")
def encoded_reference(small_videos: Path, launch_encode, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process run: what every resumed or differently sliced run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "out"
    log = out.parent / "log.txt"
    code = launch_encode(small_videos, out, log).wait(timeout=240)
    assert code == 0, log.read_text()
    assert "broken.mp4" in (out / "failures.jsonl").read_text()
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path: two runs agree when these are equal."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def shard_members(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member extension: bytes}, across every shard an output's manifest lists."""
    import json
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One good video and every kind of broken input a scraped corpus holds, in one folder."""
    import numpy as np
    from PIL import Image

    from latentcache.tools.synthetic import corrupt_frame, write_audio

    d = tmp_path_factory.mktemp("bad")
    files = {"good": write_video(d / "good", codec="h264", num_frames=72)}
    files["empty"] = d / "empty.mp4"
    files["empty"].write_bytes(b"")
    mp4 = write_video(tmp_path_factory.mktemp("src") / "whole", codec="h264", num_frames=72).read_bytes()
    files["truncated_mp4"] = d / "truncated.mp4"  # the index (moov) is at the end: cut off
    files["truncated_mp4"].write_bytes(mp4[: len(mp4) // 3])
    webm = write_video(tmp_path_factory.mktemp("src") / "whole", codec="vp9", num_frames=72).read_bytes()
    files["truncated_webm"] = d / "truncated.webm"  # streamable: opens, announces 3 s, holds 1.3 s
    files["truncated_webm"].write_bytes(webm[: len(webm) // 2])
    files["random"] = d / "random.mp4"
    files["random"].write_bytes(np.random.default_rng(0).bytes(20000))
    files["text"] = d / "text.mp4"
    files["text"].write_text("<html>404 not found</html>\n" * 20, encoding="utf-8")
    files["audio"] = write_audio(d / "audio.mp4")
    files["cover_art"] = write_audio(d / "song.mp3", cover=True)  # its cover picture demuxes as a "video" stream
    files["png"] = d / "image.mp4"
    Image.new("RGB", (64, 48)).save(files["png"], format="PNG")
    # 5 s, a keyframe every second, damaged at 2.2 s: the clip over the damage must go, the others must survive.
    ts = write_video(tmp_path_factory.mktemp("src") / "whole", codec="mpegts", num_frames=120, gop=24)
    files["corrupt_ts"] = corrupt_frame(ts, d / "corrupt.ts", at=2.2)
    mp4 = write_video(tmp_path_factory.mktemp("src") / "whole", codec="h264", num_frames=120, gop=24)
    files["corrupt_mp4"] = corrupt_frame(mp4, d / "corrupt.mp4", at=2.2)
    return files



def fast_cases(cases, fast) -> list:
    """A test matrix whose fast tier runs only the cases in `fast`; the others are marked slow, so CI runs them all.

    The fast tier keeps one representative of each matrix (the default family, the case a bug was found in), so a
    developer's minute still goes through every code path once; the full matrix is CI's. A tuple case is passed as
    the parametrize arguments it holds."""
    out = []
    for case in cases:
        if case in fast:
            out.append(case)
        else:
            out.append(pytest.param(*case if isinstance(case, tuple) else (case,), marks=pytest.mark.slow))
    missing = [case for case in fast if case not in cases]
    assert not missing, f"fast cases not in the matrix: {missing}"
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs `encoded_reference` (a 2-process `accelerate launch` encode) is multi-process: slow tier."""
    for item in items:
        if "encoded_reference" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API server (moto's, on 127.0.0.1) for the session: tests/s3_server.py."""
    pytest.importorskip("s3fs", reason="object storage tests need s3fs: pip install 'latentcache[s3]'")
    pytest.importorskip("moto.server", reason="object storage tests need moto[server] (test extra)")
    from s3_server import running_server

    with running_server() as url:
        yield url


@pytest.fixture(scope="session")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fuzz tier's base output, encoded once per session (tests/fuzz/fuzz_targets.py's build_base).

    Here rather than in a tests/fuzz/conftest.py: a second module named `conftest` would shadow this one for the
    test modules that `from conftest import ...` and stop the whole suite's collection."""
    from fuzz_targets import build_base  # tests/fuzz is on sys.path once one of its modules is collected

    return build_base(tmp_path_factory.mktemp("fuzz_base"))
