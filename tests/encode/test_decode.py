"""decode.py on real files: the codec/container matrix, geometry, rotation, timing, seeking.

Every video comes from synthetic.write_video: a red square moves left to right over time and a white marker sits in
the top-left corner. So a decoded clip can be checked for orientation (where the marker is) and for real, ordered
content (the square is where the frame's own timestamp says it should be).
"""

from __future__ import annotations

import dataclasses

import av
import numpy as np
import pytest
from conftest import MATRIX_CODECS, MATRIX_FPS, MATRIX_FRAMES, MATRIX_HEIGHT, MATRIX_WIDTH, TINY_CLIP

from latentcache.encode.decoding.decode import decode_clip
from latentcache.encode.decoding.frames import Geometry
from latentcache.encode.decoding.probing import probe
from latentcache.encode.settings import ClipSettings
from latentcache.errors import InputError
from latentcache.tools.synthetic import square_origin, write_video


def red_center(frame: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of the red square in a decoded RGB frame."""
    r, g, b = (frame[..., c].astype(int) for c in range(3))
    ys, xs = np.nonzero((r > 170) & (g < 110) & (b < 100))
    assert len(xs) >= 4, "no red square in the frame: the frame is not the synthetic content"
    return float(xs.mean()), float(ys.mean())


def marker_corner(frame: np.ndarray) -> str:
    """Which corner holds the white marker: 'tl', 'tr', 'bl' or 'br'."""
    m = 3
    corners = {"tl": frame[:m, :m], "tr": frame[:m, -m:], "bl": frame[-m:, :m], "br": frame[-m:, -m:]}
    white = [name for name, px in corners.items() if px.min() > 190]
    assert len(white) == 1, f"expected the marker in exactly one corner, found white corners: {white}"
    return white[0]


def expected_x(t: float, meta: dict, *, num_frames: int = MATRIX_FRAMES, fps: float = MATRIX_FPS,
               height: int = MATRIX_HEIGHT, width: int = MATRIX_WIDTH) -> float:
    """Where the square's centre must be in the output for the source frame shown at `t` (no rotation)."""
    index = round(t * fps)
    x0, _ = square_origin(index, num_frames, height, width)
    side = max(4, min(height, width) // 4)
    scale = meta["scaled_size"][0] / width
    return (x0 + side / 2) * scale - meta["box"][0]


def assert_real_ordered_content(clip, **source) -> None:
    """Each frame shows the source frame its timestamp names, and the square moves left to right."""
    xs = [red_center(f)[0] for f in clip.frames]
    for x, t in zip(xs, clip.meta["frame_times"], strict=False):
        assert abs(x - expected_x(t, clip.meta, **source)) < 2.5, (xs, clip.meta["frame_times"])
    # Left to right over time (sub-pixel steps may jitter by rounding, hence the small tolerance).
    assert (np.diff(xs) > -0.6).all() and xs[-1] > xs[0], f"square does not move right over time: {xs}"


@pytest.mark.parametrize("codec", MATRIX_CODECS)
def test_codec_matrix_first_clip(codec_videos, codec):
    clip = decode_clip(codec_videos[codec], 0.0, TINY_CLIP)
    assert clip.frames.shape == (17, 64, 96, 3) and clip.frames.dtype == np.uint8
    times = clip.meta["frame_times"]
    assert len(times) == 17 and times == sorted(times) and len(set(times)) == 17
    # Each taken frame is the one on screen at its target time i/8 s (within one source frame period).
    for i, t in enumerate(times):
        assert i / 8 - 1 / 20 <= t <= i / 8 + 1e-6
    assert {marker_corner(f) for f in clip.frames} == {"tl"}
    assert_real_ordered_content(clip)
    assert clip.meta["padded_frames"] == 0 and clip.meta["repeated_frames"] == 0
    assert not clip.meta["upscaled"]


@pytest.mark.parametrize("codec", MATRIX_CODECS)
def test_codec_matrix_late_clip_seeks(codec_videos, codec):
    """A clip that starts mid-file: seek (or, for MPEG-TS, decode from the start) and land on the right frames."""
    clip = decode_clip(codec_videos[codec], 0.9, dataclasses.replace(TINY_CLIP, frames=9))
    times = clip.meta["frame_times"]
    assert times[0] <= 0.9 + 1e-6 and times[0] > 0.9 - 1 / 20
    assert_real_ordered_content(clip)


@pytest.mark.parametrize("codec", MATRIX_CODECS)
def test_probe_matrix(codec_videos, codec):
    info = probe(codec_videos[codec])
    assert (info.width, info.height, info.rotation) == (MATRIX_WIDTH, MATRIX_HEIGHT, 0)
    assert abs(info.duration - MATRIX_FRAMES / MATRIX_FPS) < 0.1
    assert 23 <= info.fps <= 25.5  # gif stores delays in centiseconds: 1/24 s becomes 4 cs, 25 fps


def test_bframes_are_really_reordered(codec_videos):
    """The B-frame file must have B-frames, or the matrix would not test decode-order != presentation order."""
    with av.open(str(codec_videos["h264_bframes"])) as c:
        kinds = {int(f.pict_type) for f in c.decode(c.streams.video[0])}
    assert int(av.video.frame.PictureType.B) in kinds


@pytest.mark.parametrize("codec", ["h264_444", "vp9", "av1", "mjpeg"])
def test_odd_width_and_height(tmp_path, codec):
    # libx264/libx265 refuse odd sizes in 4:2:0; phones and screen recorders still produce them in other codecs.
    path = write_video(tmp_path / "odd", codec=codec, num_frames=48, height=95, width=127)
    info = probe(path)
    assert (info.width, info.height) == (127, 95)
    clip = decode_clip(path, 0.0, dataclasses.replace(TINY_CLIP, frames=9))
    assert clip.frames.shape == (9, 64, 96, 3)
    assert (clip.meta["source_width"], clip.meta["source_height"]) == (127, 95)
    assert marker_corner(clip.frames[0]) == "tl"
    assert_real_ordered_content(clip, num_frames=48, height=95, width=127)


def test_portrait_fit_keeps_the_whole_frame(tmp_path):
    path = write_video(tmp_path / "portrait", codec="h264", num_frames=48, height=160, width=96)
    clip = decode_clip(path, 0.0, dataclasses.replace(TINY_CLIP, frames=9, resize="fit"))
    assert clip.frames.shape == (9, 64, 96, 3)
    x, y, w, h = clip.meta["box"]
    assert (h, y) == (64, 0) and w < 96  # pillarboxed: black bars left and right
    assert clip.frames[:, :, : x - 1].max() == 0 and clip.frames[:, :, x + w + 1 :].max() == 0
    inner = clip.frames[:, :, x : x + w]
    assert marker_corner(inner[0]) == "tl"
    xs = [red_center(f)[0] for f in inner]
    assert all(b > a for a, b in zip(xs, xs[1:], strict=False))


def test_portrait_in_a_portrait_bucket(tmp_path):
    path = write_video(tmp_path / "portrait", codec="vp9", num_frames=48, height=128, width=96)
    clip = decode_clip(path, 0.0, ClipSettings(frames=9, fps=8, height=96, width=64))  # a 96x64 (HxW) bucket
    assert clip.frames.shape == (9, 96, 64, 3) and clip.meta["box"] == [4, 0, 64, 96]  # 72x96, 4 px off each side
    assert marker_corner(clip.frames[0]) == "tl"
    assert_real_ordered_content(clip, num_frames=48, height=128, width=96)


def test_tiny_source_is_upscaled_and_recorded(tmp_path):
    path = write_video(tmp_path / "tiny", codec="h264", num_frames=48, height=32, width=48)
    clip = decode_clip(path, 0.0, dataclasses.replace(TINY_CLIP, frames=9))
    assert clip.frames.shape == (9, 64, 96, 3)
    assert clip.meta["upscaled"] is True and (clip.meta["source_width"], clip.meta["source_height"]) == (48, 32)
    assert marker_corner(clip.frames[0]) == "tl"
    assert_real_ordered_content(clip, num_frames=48, height=32, width=48)


def test_geometry_never_upscales_a_large_source():
    geo = Geometry.plan(1920, 1080, 720, 480, "crop")
    assert not geo.upscaled and geo.scaled_h == 480 and geo.box[2:] == (720, 480)
    assert Geometry.plan(64, 48, 96, 64, "crop").upscaled


# Counter-clockwise display rotation -> where a viewer sees the top-left marker, and where the square moves.
# (Checked once against the ffmpeg command line, which applies the display matrix as players do.)
ROTATIONS = {0: ("tl", (1, 0)), 90: ("bl", (0, -1)), 180: ("br", (-1, 0)), 270: ("tr", (0, 1))}


@pytest.mark.parametrize("codec", ["h264", "vp9"])
@pytest.mark.parametrize("rotation", sorted(ROTATIONS))
def test_rotation_from_display_matrix(tmp_path, codec, rotation):
    path = write_video(tmp_path / f"rot{rotation}", codec=codec, num_frames=48, rotation=rotation)
    info = probe(path)
    assert info.rotation == rotation
    # As displayed: portrait for 90/270.
    assert (info.width, info.height) == ((96, 128) if rotation in (90, 270) else (128, 96))
    size = {"height": 64, "width": 48} if rotation in (90, 270) else {"height": 48, "width": 64}
    clip = decode_clip(path, 0.0, ClipSettings(frames=9, fps=8, **size))
    assert clip.meta["rotation_applied"] == rotation
    corner, (dx, dy) = ROTATIONS[rotation]
    assert {marker_corner(f) for f in clip.frames} == {corner}
    centers = np.array([red_center(f) for f in clip.frames])
    steps = np.diff(centers, axis=0)
    assert (steps @ np.array([dx, dy]) > 0).all(), f"square does not move the way a viewer sees it: {centers}"


def test_variable_frame_rate_takes_frames_by_timestamp(tmp_path):
    rng = np.random.default_rng(0)
    pts = np.cumsum(np.r_[0, rng.integers(20, 70, size=79)]).tolist()  # ms, 14-50 fps
    path = write_video(tmp_path / "vfr", codec="h264", num_frames=80, pts=pts)
    clip = decode_clip(path, 0.0, TINY_CLIP)
    times = clip.meta["frame_times"]
    for i, t in enumerate(times):
        # The frame on screen at i/8 s: the last pts at or before it.
        expected = max(p for p in pts if p <= i * 125) / 1000
        assert t == pytest.approx(expected, abs=1e-3)
    # The content is that frame's: the square's position follows the frame index of that pts.
    xs = [red_center(f)[0] for f in clip.frames]
    indices = [pts.index(round(t * 1000)) for t in times]
    want = [expected_x(i / 24, clip.meta, num_frames=80) for i in indices]
    assert np.abs(np.array(xs) - np.array(want)).max() < 2.5


def test_60fps_and_vfr_sources_give_the_same_wall_clock_spacing(tmp_path):
    fast = write_video(tmp_path / "fast", codec="h264", num_frames=180, fps=60)
    rng = np.random.default_rng(1)
    vfr = write_video(tmp_path / "vfr", codec="vp9", num_frames=90,
                      pts=np.cumsum(np.r_[0, rng.integers(15, 50, size=89)]).tolist())
    clips = [decode_clip(p, 0.5, TINY_CLIP) for p in (fast, vfr)]
    for clip, max_period in zip(clips, (1 / 60, 0.05), strict=True):
        times = np.array(clip.meta["frame_times"])
        targets = 0.5 + np.arange(17) / 8
        assert ((targets - times) >= -1e-6).all() and ((targets - times) < max_period + 1e-6).all()
    spacing = [np.diff(c.meta["frame_times"]).mean() for c in clips]
    assert spacing[0] == pytest.approx(0.125, abs=0.01) and spacing[1] == pytest.approx(0.125, abs=0.01)


def test_audio_stream_before_video(tmp_path):
    path = write_video(tmp_path / "audio_first", codec="h264", num_frames=48, audio_first=True)
    with av.open(str(path)) as c:
        assert c.streams[0].type == "audio"
    clip = decode_clip(path, 0.0, dataclasses.replace(TINY_CLIP, frames=9))
    assert_real_ordered_content(clip, num_frames=48)


def test_video_shorter_than_a_clip_is_skipped_not_shortened(tmp_path):
    path = write_video(tmp_path / "short", codec="h264", num_frames=24)  # 1 s; a 17-frame clip needs 2 s
    with pytest.raises(InputError, match="too short") as err:
        decode_clip(path, 0.0, TINY_CLIP)
    assert err.value.skipped and err.value.stage == "decode"


def test_short_pad_repeats_the_last_frame_and_records_it(tmp_path):
    path = write_video(tmp_path / "short", codec="vp9", num_frames=24)
    clip = decode_clip(path, 0.0, dataclasses.replace(TINY_CLIP, short="pad"))
    real = 8  # targets 0..0.875 s are inside the 1 s video
    assert clip.meta["padded_frames"] == 17 - real and len(clip.meta["frame_times"]) == real
    assert (clip.frames[real:] == clip.frames[real - 1]).all()
    xs = [red_center(f)[0] for f in clip.frames[:real]]
    assert all(b > a for a, b in zip(xs, xs[1:], strict=False))


def test_low_frame_rate_source_repeats_are_recorded(tmp_path):
    path = write_video(tmp_path / "slow", codec="h264", num_frames=12, fps=4)  # 3 s at 4 fps, sampled at 8 fps
    clip = decode_clip(path, 0.0, TINY_CLIP)
    assert clip.meta["repeated_frames"] == 8


def test_seek_decodes_from_the_keyframe_before_the_clip_not_from_the_start(tmp_path):
    path = write_video(tmp_path / "long", codec="h264", num_frames=480, gop=24)  # 20 s, a keyframe every second
    clip = decode_clip(path, 15.3, dataclasses.replace(TINY_CLIP, frames=9))
    assert clip.meta["frame_times"][0] == pytest.approx(367 / 24, abs=1e-3)  # on screen at 15.3 s
    # From the keyframe at 15 s to the clip end at 16.3 s: about 32 frames, never the 390 before the clip.
    assert clip.meta["frames_decoded"] <= 24 + 9 * 3 + 8
    assert_real_ordered_content(clip, num_frames=480)


def test_mpegts_without_index_falls_back_to_decoding_from_the_start(codec_videos):
    clip = decode_clip(codec_videos["mpegts"], 2.0, dataclasses.replace(TINY_CLIP, frames=5))
    assert clip.meta["frame_times"][0] == pytest.approx(2.0, abs=1e-3)
    assert_real_ordered_content(clip)


def test_preroll_skips_b_frames_but_never_a_frame_of_the_clip(tmp_path):
    # One keyframe at 0 s: a clip at 7 s decodes from the start, but needs no B-frame shown before 6 s.
    path = write_video(tmp_path / "bframes", codec="h264_bframes", num_frames=240)
    clip = decode_clip(path, 7.0, dataclasses.replace(TINY_CLIP, frames=9))
    assert clip.meta["frames_decoded"] < 7 * 24 + 8 * 3  # fewer than every frame up to the clip's end
    times = clip.meta["frame_times"]
    assert times == [round((168 + 3 * i) / 24, 6) for i in range(9)]  # exactly the frames on screen at 7 + i/8 s
    assert_real_ordered_content(clip, num_frames=240)


def test_a_frame_exactly_at_a_target_is_taken_when_the_stream_starts_late(tmp_path):
    """Stream start 7.3 s: in floats 7.7 - 7.3 = 0.40000000000000036, which used to take the previous frame."""
    path = write_video(tmp_path / "late.mkv", codec="h264", num_frames=75, pts=[7300 + 40 * i for i in range(75)])
    clip = decode_clip(path, 0.4, ClipSettings(frames=9, fps=5.0, height=64, width=96))
    assert clip.meta["frame_times"] == [round(0.4 + 0.2 * i, 6) for i in range(9)]


def test_anamorphic_pixels_are_sized_as_displayed(tmp_path):
    """128x96 stored with 2:1 pixels is a 256x96 picture: buckets and crops must see that, not the stored size."""
    from fractions import Fraction

    path = write_video(tmp_path / "wide", codec="h264", num_frames=48, pixel_aspect=Fraction(2, 1))
    info = probe(path)
    assert (info.width, info.height) == (256, 96)
    clip = decode_clip(path, 0.0, ClipSettings(frames=9, fps=8.0, height=64, width=96))
    assert clip.meta["scaled_size"] == [171, 64] and clip.frames.shape == (9, 64, 96, 3)


# ------------------------------------------------------------------ skipping frames no target shows (issue 22 item 3)
# Every codec this PyAV wheel writes, plus B-frames in HEVC, VFR and rotated files: the frames taken with skipping
# must be bit-identical to a decode of every frame.
SKIP_CASES = {
    **{codec: {"codec": codec} for codec in MATRIX_CODECS},
    "hevc": {"codec": "hevc"},
    "h264_vfr": {"codec": "h264_bframes", "pts": [round(i * 1000 / 24 + (i % 5) * 9) for i in range(MATRIX_FRAMES)]},
    "hevc_rotated": {"codec": "hevc", "rotation": 90},
    "h264_rotated": {"codec": "h264_bframes", "rotation": 270},
}


@pytest.fixture(scope="module")
def skip_videos(tmp_path_factory, codec_videos) -> dict:
    d = tmp_path_factory.mktemp("skip")
    out = dict(codec_videos)
    for name, kwargs in SKIP_CASES.items():
        if name not in out:
            out[name] = write_video(d / f"s_{name}", num_frames=MATRIX_FRAMES, height=MATRIX_HEIGHT,
                                    width=MATRIX_WIDTH, fps=MATRIX_FPS, **kwargs)
    return out


@pytest.mark.parametrize("name", sorted(SKIP_CASES))
def test_skipping_unseen_frames_gives_bit_identical_clips(skip_videos, name):
    path = skip_videos[name]
    clip = dataclasses.replace(TINY_CLIP, frames=9, fps=5.0)  # 5 fps from 24: most frames are shown at no target
    for start in (0.0, 0.35, 1.1):
        fast = decode_clip(path, start, clip)
        full = decode_clip(path, start, clip, exhaustive=True)
        assert fast.meta == full.meta | {"frames_decoded": fast.meta["frames_decoded"]}
        assert np.array_equal(fast.frames, full.frames), (name, start)
        assert fast.meta["frames_decoded"] <= full.meta["frames_decoded"]
        # A decoder's thread count (a decode worker's share of the cores) changes what it costs, never its frames.
        for threads in (1, 2):
            threaded = decode_clip(path, start, clip, threads=threads)
            assert threaded.meta == fast.meta | {"frames_decoded": threaded.meta["frames_decoded"]}
            assert np.array_equal(threaded.frames, full.frames), (name, start, threads)


@pytest.mark.parametrize("codec", ["h264_bframes", "hevc"])
def test_b_frames_no_target_shows_are_not_decoded(tmp_path, codec):
    path = write_video(tmp_path / codec, codec=codec, num_frames=240, gop=240)
    clip = dataclasses.replace(TINY_CLIP, frames=9, fps=4.0)
    fast = decode_clip(path, 2.0, clip)
    full = decode_clip(path, 2.0, clip, exhaustive=True)
    assert np.array_equal(fast.frames, full.frames)
    assert fast.meta["frame_times"] == full.meta["frame_times"]
    # 2 s to 4 s at 24 fps is 49 frames; with 3 B-frames in 4, about half of those are shown at no target.
    assert fast.meta["frames_decoded"] < full.meta["frames_decoded"] - 15


@pytest.mark.parametrize("codec", ["av1", "vp9", "h264_bframes", "hevc"])
def test_a_clip_after_the_first_second_decodes_on_every_codec(tmp_path, codec):
    # The preroll once sent libdav1d skip_frame NONREF, which it applies frames late: it dropped a frame the clip
    # needed and an intact AV1 file failed as "the decoder returned no frame" at 1.1 s.
    path = write_video(tmp_path / codec, codec=codec, num_frames=MATRIX_FRAMES, height=MATRIX_HEIGHT,
                       width=MATRIX_WIDTH, fps=MATRIX_FPS)
    clip = decode_clip(path, 1.1, dataclasses.replace(TINY_CLIP, frames=9, fps=5.0))
    assert clip.meta["frame_times"][0] == pytest.approx(26 / 24, abs=1e-3)  # mkv/webm count in milliseconds
    assert_real_ordered_content(clip)
