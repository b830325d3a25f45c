"""Damaged and mistimed video, on real bitstreams: a clip is written only when it is what the undamaged file gives.

The damage matrix: for h264 (mp4), hevc (mp4), vp9 (webm) and av1 (mkv), a 3 s 160x96 video with a keyframe every
2 s, and 4 copies of it, each with ~5% of one P/B packet inside the first clip overwritten (synthetic.damage_packet).
Every clip decoded from a damaged copy is either dropped with a CorruptVideo InputError or equal (to a small
tolerance) to the clip of the undamaged file.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import ENCODE_SMALL, TINY_CLIP

from latentcache.cli import main
from latentcache.encode.chunk_plan import plan_video
from latentcache.encode.decoding.decode import decode_clip
from latentcache.encode.decoding.probing import probe
from latentcache.errors import InputError
from latentcache.tools.synthetic import damage_packet, write_video

DAMAGE_CODECS = ("h264", "hevc", "vp9", "av1")
DAMAGED_PACKETS = 4
# Decoding is exact: an undamaged frame differs from the clean decode by nothing at all; 2 levels of slack only so
# that a decoder's harmless rounding in a frame far from the damage does not count as damage.
TOLERANCE = 2


def _first_clip_packets(path: Path) -> list[int]:
    """File-order indices of DAMAGED_PACKETS non-key packets spread over the first clip (0-2 s), big enough that 5%
    of them is some bytes (AV1's few-byte "show an existing frame" packets are left out)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        packets = [p for p in c.demux(s) if p.size]
        candidates = [i for i, p in enumerate(packets)
                      if not p.is_keyframe and p.size >= 32 and p.pts is not None and float(p.pts * p.time_base) < 1.9]
    picks = np.linspace(0, len(candidates) - 1, DAMAGED_PACKETS).round().astype(int)
    return [candidates[i] for i in picks]


@pytest.fixture(scope="module")
def damage_matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    """codec -> (clean file, damaged copies)."""
    d = tmp_path_factory.mktemp("damage")
    matrix = {}
    for codec in DAMAGE_CODECS:
        clean = write_video(d / f"clean_{codec}", codec=codec, num_frames=72, height=96, width=160, gop=48)
        damaged = [damage_packet(clean, d / f"bad_{codec}_{i}{clean.suffix}", i)
                   for i in _first_clip_packets(clean)]
        matrix[codec] = (clean, damaged)
    return matrix


# 0: FFmpeg's own thread count (frame threads); 1: what a decode worker gets when the workers fill the cores.
@pytest.mark.parametrize("threads", [0, 1])
@pytest.mark.parametrize("number", range(DAMAGED_PACKETS))
@pytest.mark.parametrize("codec", DAMAGE_CODECS)
def test_a_damaged_clip_is_dropped_or_equals_the_clean_one(damage_matrix, codec, number, threads):
    clean, damaged = damage_matrix[codec]
    reference = decode_clip(clean, 0.0, TINY_CLIP).frames.astype(int)
    try:
        clip = decode_clip(damaged[number], 0.0, TINY_CLIP, threads=threads)
    except InputError as e:
        assert type(e.__cause__).__name__ == "CorruptVideo" and e.stage == "decode", e.reason
        assert not e.skipped and e.path == str(damaged[number])
        return
    worst = int(np.abs(clip.frames.astype(int) - reference).max())
    assert worst <= TOLERANCE, f"{damaged[number].name}: written with frames up to {worst} levels off the clean decode"


def _retimed_mkv(src: Path, dst: Path, ticks: int) -> Path:
    """`src`'s packets in Matroska with one frame every `ticks` milliseconds: what `-bsf setts=ts=N*ticks` does."""
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        s = i.streams.video[0]
        t = o.add_stream_from_template(s)
        t.time_base = Fraction(1, 1000)
        for n, packet in enumerate(p for p in i.demux(s) if p.size):  # no B-frames: decode order is shown order
            packet.stream, packet.time_base = t, Fraction(1, 1000)
            packet.pts = packet.dts = n * ticks
            packet.duration = ticks
            o.mux(packet)
    return dst


@pytest.mark.parametrize("ticks", [1_000_000, 2_147_483_647])
def test_absurd_timestamps_are_reported_not_planned(tmp_path, ticks):
    """72 frames, one every 1000 s (or every 2^31 ms, the issue's 152-million-second file): not millions of clips."""
    src = write_video(tmp_path / "src", codec="h264", num_frames=72, height=64, width=96)
    info = probe(_retimed_mkv(src, tmp_path / "absurd.mkv", ticks))
    assert info.frames == 72 and info.duration > 70_000
    for strategy in ("all", "uniform:3", "sliding:1"):
        with pytest.raises(InputError, match="broken timestamps") as err:
            plan_video(info, dataclasses.replace(TINY_CLIP, strategy=strategy))
        assert err.value.stage == "plan" and not err.value.skipped and err.value.path == info.path


def test_no_two_planned_clips_start_on_the_same_frame(tmp_path):
    """2 frames at 1 fps with uniform:3: two clips, not three of which two are the same."""
    path = write_video(tmp_path / "two", codec="h264", num_frames=2, fps=1, height=64, width=96)
    info = probe(path)
    assert info.frames == 2
    clip = dataclasses.replace(TINY_CLIP, frames=3, strategy="uniform:3")
    _, starts = plan_video(info, clip)
    assert len(starts) == 2
    times = [tuple(decode_clip(path, s, clip).meta["frame_times"]) for s in starts]
    assert len(set(times)) == 2  # the clips really are different


def test_raw_h264_stream_probes_its_real_duration(tmp_path):
    src = write_video(tmp_path / "src", codec="h264", num_frames=72, height=64, width=96)
    raw = tmp_path / "raw.h264"
    with av.open(str(src)) as i, av.open(str(raw), "w", format="h264") as o:
        s = i.streams.video[0]
        t = o.add_stream_from_template(s)
        for packet in i.demux(s):
            if packet.size:
                packet.stream = t
                o.mux(packet)
    info = probe(raw)
    assert info.frames == 72 and info.duration == pytest.approx(72 / info.fps, rel=0.01)
    clip = decode_clip(raw, 0.0, TINY_CLIP)  # and the planned clip decodes
    assert clip.frames.shape == (17, 64, 96, 3)


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_decode_check_through_the_cli(damage_matrix, tmp_path, mode):
    """HEVC damage the decoder conceals: `--decode-check auto` (the second decode) drops the clip, with a failure
    record naming the file; `off` trusts the corpus and writes it."""
    clean, damaged = damage_matrix["hevc"]
    videos = tmp_path / "in"
    videos.mkdir()
    (videos / "bad.mp4").write_bytes(damaged[0].read_bytes())
    (videos / "good.mp4").write_bytes(clean.read_bytes())
    out = tmp_path / "out"
    code = main(["encode", str(videos), "--out", str(out), *ENCODE_SMALL, "--workers", "0", "--decode-check", mode])
    failures = out / "failures.jsonl"
    text = failures.read_text() if failures.exists() else ""
    if mode == "auto":
        assert "bad.mp4" in text and "differs from the first decode" in text and "good.mp4" not in text, text
    else:
        assert code == 0 and "bad.mp4" not in text, text
