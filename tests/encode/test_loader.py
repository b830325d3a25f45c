"""Decode workers: same clips, same order, same pixels as decoding in the main process; failures pass through."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from latentcache.encode.chunk_plan import PlannedClip
from latentcache.encode.decoding.loader import ClipStream, default_workers
from latentcache.errors import InputError
from tests.conftest import TINY_CLIP


def _planned(video_dir, tmp_path) -> list[PlannedClip]:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    sources = [video_dir / "a_h264.mp4", video_dir / "b_vp9.webm", broken, video_dir / "c_h264.mp4"]
    return [PlannedClip(f"k{i}", str(p), p.name, 0, 0.25 * i, TINY_CLIP.bucket) for i, p in enumerate(sources)]


def test_workers_match_main_process_decoding_in_order(video_dir, tmp_path):
    planned = _planned(video_dir, tmp_path)
    serial = list(ClipStream(planned, TINY_CLIP, workers=0))
    parallel = list(ClipStream(planned, TINY_CLIP, workers=2))
    assert [p.key for p, _ in parallel] == [p.key for p in planned]
    for (_, a), (_, b) in zip(serial, parallel, strict=True):
        if isinstance(a, InputError):
            assert isinstance(b, InputError) and b.path == a.path and b.stage == a.stage
        else:
            assert np.array_equal(np.asarray(a.frames), np.asarray(b.frames)) and a.meta == b.meta
    assert sum(isinstance(r, InputError) for _, r in parallel) == 1


def test_default_workers_leave_a_core_for_the_accelerator():
    assert 0 <= default_workers() <= 8
    assert default_workers(world_size_on_node=64) == 0


def test_each_decoder_gets_its_share_of_the_cores(monkeypatch):
    from latentcache.encode.decoding import loader

    monkeypatch.setattr(loader, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader.decoder_threads(8) == 2  # one GPU on 16 cores: 8 workers (the cap), 2 threads each
    assert loader.decoder_threads(15) == 1
    assert loader.decoder_threads(0) == 16  # the main process decodes: all of the rank's cores
    assert loader.decoder_threads(1, world_size_on_node=8) == 2  # 8 GPUs on 16 cores
    assert loader.decoder_threads(8, world_size_on_node=8) == 1  # never 0: that would be FFmpeg's own choice
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader.decoder_threads(2) == 2


def test_the_workers_decode_with_their_share_of_threads(video_dir, tmp_path, monkeypatch):
    """The thread count reaches decode_clip inside the forked workers (recorded there, read here)."""
    from latentcache.encode.decoding import loader

    record = tmp_path / "threads"
    real = loader.decode_clip

    def recording(*args, threads, **kwargs):
        with open(record, "a") as f:
            f.write(f"{threads}\n")
        return real(*args, threads=threads, **kwargs)

    monkeypatch.setattr(loader, "decode_clip", recording)  # before the fork: the workers inherit it
    monkeypatch.setattr(loader, "usable_cores", lambda: 6)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    planned = [p for p in _planned(video_dir, tmp_path) if not p.source.endswith("broken.mp4")]
    results = list(ClipStream(planned, TINY_CLIP, workers=2))
    assert all(not isinstance(r, InputError) for _, r in results)
    assert record.read_text().split() == ["3"] * len(planned)


@pytest.mark.slow
def test_nvdec_falls_back_to_the_cpu_with_the_same_frames(video_dir, tmp_path):
    """Without a GPU the cuvid decoders cannot open: the clip is decoded on the CPU, said once in the log."""
    import subprocess
    import sys

    import torch

    planned = _planned(video_dir, tmp_path)
    on_gpu = list(ClipStream(planned, TINY_CLIP, workers=0, nvdec=True))
    cpu = list(ClipStream(planned, TINY_CLIP, workers=0))
    for (_, a), (_, b) in zip(cpu, on_gpu, strict=True):
        if isinstance(a, InputError):
            assert isinstance(b, InputError)
        else:
            assert np.array_equal(a.frames, b.frames)
    if not torch.cuda.is_available():
        # "Once" is per process: a fresh one decodes twice and must say it exactly once.
        code = ("import logging, sys; logging.basicConfig(level=logging.INFO); "
                "from latentcache.encode.decoding.decode import decode_clip; "
                "from latentcache.encode.settings import ClipSettings; "
                "[decode_clip(sys.argv[1], 0.0, ClipSettings(frames=9, height=64, width=96), nvdec=True) "
                "for _ in range(2)]")
        done = subprocess.run([sys.executable, "-c", code, planned[0].source], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[2], check=True)
        assert done.stderr.count("on the CPU") == 1, done.stderr


def test_frames_held_for_a_batch_survive_the_ring_coming_round(video_dir):
    """Frames travel in shared-memory slots reused lap after lap: a consumer holding `held` clips at a time (a batch
    being gathered) must still see each one's own pixels when its batch is complete, over several laps."""
    sources = sorted(p for p in Path(video_dir).iterdir() if p.suffix in (".mp4", ".webm"))[:3]
    planned = [PlannedClip(f"k{i}", str(p), p.name, 0, 0.125 * (i // len(sources)), TINY_CLIP.bucket)
               for i, p in enumerate(sources * 8)]
    expected = [r.frames.copy() for _, r in ClipStream(planned, TINY_CLIP, workers=0)]
    held = 4
    stream = iter(ClipStream(planned, TINY_CLIP, workers=2, prefetch=2, held=held))
    seen = []
    for start in range(0, len(planned), held):
        batch = [next(stream) for _ in planned[start : start + held]]
        seen.extend(np.array(r.frames) for _, r in batch)  # copied once the whole batch is in hand, as stage() does
    ring = 2 * 2 + held + 2
    assert len(planned) > 2 * ring  # the slots came round more than twice
    assert all(np.array_equal(a, b) for a, b in zip(expected, seen, strict=True))
    assert len({a.tobytes() for a in expected}) > 3  # distinct clips, so a stale slot would show


def test_workers_decode_videos_straight_into_their_ring_slot(video_dir, tmp_path, monkeypatch):
    """A worker writes a video clip's frames into the clip's shared-memory slot as it decodes (no fresh array, no
    second copy: `FrameRing.put` is never called for it); a still image, decoded into an array of its own, is still
    copied in. Both arrive with the pixels the main process decodes."""
    import dataclasses

    from PIL import Image

    from latentcache.encode.decoding import loader

    picture = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "still.png")
    clip = dataclasses.replace(TINY_CLIP, images=True)
    videos = [video_dir / "a_h264.mp4", video_dir / "b_vp9.webm", video_dir / "c_h264.mp4"]
    planned = [PlannedClip(f"k{i}", str(p), p.name, 0, 0.25 * i, TINY_CLIP.bucket) for i, p in enumerate(videos)]
    planned.insert(1, PlannedClip("still", str(tmp_path / "still.png"), "still.png", 0, 0.0, "1x64x96"))
    expected = [r.frames.copy() for _, r in ClipStream(planned, clip, workers=0)]

    record = tmp_path / "put"
    real_put = loader.FrameRing.put

    def recording_put(self, position, frames):
        with open(record, "a") as f:
            f.write(f"{frames.shape[0]}\n")
        return real_put(self, position, frames)

    monkeypatch.setattr(loader.FrameRing, "put", recording_put)  # before the fork: the workers inherit it
    seen = [np.array(r.frames) for _, r in ClipStream(planned, clip, workers=2)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, seen, strict=True))
    assert record.read_text().split() == ["1"]  # the image alone was copied into its slot


def test_decoding_into_a_buffer_gives_the_same_frames_in_it(video_dir):
    from latentcache.encode.decoding.decode import decode_clip

    source = video_dir / "a_h264.mp4"
    fresh = decode_clip(source, 0.25, TINY_CLIP)
    buffer = np.full(fresh.frames.nbytes + 100, 7, np.uint8)
    into = decode_clip(source, 0.25, TINY_CLIP, out=buffer)
    assert np.shares_memory(into.frames, buffer) and into.frames.shape == fresh.frames.shape
    assert np.array_equal(into.frames, fresh.frames) and into.meta == fresh.meta
    assert (buffer[fresh.frames.nbytes :] == 7).all()  # nothing written past the clip
    with pytest.raises(ValueError, match="cannot hold"):
        decode_clip(source, 0.25, TINY_CLIP, out=buffer[:100])
    with pytest.raises(ValueError, match="flat, contiguous, writeable uint8"):
        decode_clip(source, 0.25, TINY_CLIP, out=buffer.view(np.int16))


@pytest.mark.slow
def test_the_whole_next_batch_is_decoding_while_a_batch_is_encoded(video_dir, tmp_path, monkeypatch):
    """A consumer that has taken a batch and is encoding it must find the next batch's clips already dispatched to
    the workers, not only `prefetch` (2) per worker: with one worker and batch 4 it otherwise waited after each batch
    for the clips never handed out. Workers mark each clip they start (the marks are made in the forked workers)."""
    import time

    from latentcache.encode.decoding import loader

    marks = tmp_path / "started"
    marks.mkdir()
    real = loader.decode_planned

    def marking(planned, *args):
        (marks / planned.key).touch()
        return real(planned, *args)

    monkeypatch.setattr(loader, "decode_planned", marking)  # before the fork: the workers inherit it
    sources = sorted(p for p in Path(video_dir).iterdir() if p.suffix in (".mp4", ".webm"))[:3]
    planned = [PlannedClip(f"k{i:02d}", str(p), p.name, 0, 0.0, TINY_CLIP.bucket) for i, p in enumerate(sources * 4)]
    held = 4
    stream = iter(ClipStream(planned, TINY_CLIP, workers=1, held=held))
    first = [next(stream) for _ in range(held)]
    assert [p.key for p, _ in first] == [p.key for p in planned[:held]]
    # "Encoding" the first batch: the worker goes on with what it was given; wait until it stops starting clips.
    seen, deadline = -1, time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1.0)
        started = len(list(marks.iterdir()))
        if started == seen:
            break
        seen = started
    assert seen >= 2 * held, f"only {seen} clips started while the first batch of {held} was in use"
    assert [p.key for p, _ in stream] == [p.key for p in planned[held:]]


def test_too_little_shared_memory_is_a_usage_error_saying_what_to_change(video_dir, tmp_path, monkeypatch, capsys):
    """Docker gives /dev/shm 64 MB unless told otherwise: a frame ring that does not fit is refused with the
    space it needs and the flags that change it (exit 2), not a traceback from torch mid-run."""
    from latentcache.cli import main
    from latentcache.encode.decoding import loader

    monkeypatch.setattr(loader, "shm_free_bytes", lambda: 1 << 20)
    args = ["encode", str(video_dir / "a_h264.mp4"), "--out", str(tmp_path / "out"), "--vae", "tiny-random-cogvideox",
            "--device", "cpu", "--frames", "9", "--height", "64", "--width", "96", "--workers", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(r"decode workers need \d+ MiB of shared memory for their frame ring \(\d+ slots of 0\.2 MiB", err)
    assert "/dev/shm has 1 MiB free" in err and "--shm-size" in err and "--workers 0" in err
    assert main([*args[:-1], "0"]) == 0  # in the main process: no shared memory needed


@pytest.mark.slow
def test_a_real_small_dev_shm_is_refused_before_decoding(video_dir, tmp_path):
    """The same under a real 1 MiB /dev/shm (a private mount namespace; needs root)."""
    import subprocess
    import sys

    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True)
    if probe.returncode:
        pytest.skip("cannot mount a private /dev/shm here (needs root and unshare)")
    encode = [sys.executable, "-m", "latentcache.cli", "encode", str(video_dir / "a_h264.mp4"), "--out",
              str(tmp_path / "out"), "--vae", "tiny-random-cogvideox", "--device", "cpu", "--frames", "9",
              "--height", "64", "--width", "96", "--workers", "1", "--batch-size", "8"]
    script = "mount -t tmpfs -o size=1m tmpfs /dev/shm && exec \"$@\""
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *encode], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MiB of shared memory for their frame ring" in result.stderr and "/dev/shm has" in result.stderr
    assert "Traceback" not in result.stderr
