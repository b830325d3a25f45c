"""Stage 1: video file -> uint8 RGB frames of one clip, chosen by presentation time.

Frames are picked by timestamps, not by index, so a 60 fps, a 24 fps and a variable-frame-rate source sampled at
`fps=8` give the same wall-clock spacing. Resizing happens in swscale (`VideoFrame.reformat`) on the frames that
are actually taken, so a 4K source is never held or upscaled at full resolution in numpy or torch.

Damaged files are the norm in scraped corpora. A clip is only returned when every frame in it is intact: a corrupt
packet, a decoder error or a hole in the timestamps taints the decoder's output until the next keyframe, and a clip
that would use a tainted frame, or repeat a frame across a hole, is dropped with the reason (`InputError`).
The damage checks themselves are `integrity`'s.

Longer than 600 lines because probing, seeking, the one demux/decode loop and the still-image path share the
container handling and the frame geometry of one file; split further, each piece would need the others' private
state. A candidate split, when this grows: probing (`probe`, `VideoInfo`) and still images into modules of their own.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from latentcache.encode import image
from latentcache.encode.integrity import (
    _SECOND_OPINION,
    _SEEK_START,
    _Decoded,
    _Integrity,
    _MatroskaCRC,
    _second_decoder,
    _why,
)
from latentcache.encode.settings import DECODE_CHECKS, ClipSettings
from latentcache.errors import InputError
from latentcache.storage import sources

log = logging.getLogger(__name__)

# Demuxers that read one still image: a PNG or JPEG renamed .mp4 opens as a one-frame "video" through these.
_STILL_IMAGE_FORMATS = ("image2", "_pipe")
# No coded frame with its container framing is smaller than this (an H.264 skip frame is a few bytes, plus its
# length prefix and index entry): a file that claims more frames than its size allows has broken timestamps.
_MIN_FRAME_BYTES = 8
# Consecutive packets that fail to decode before the file is given up on (one bad packet is decoded around).
_MAX_BAD_PACKETS = 32
# Stream containers, where a hole in the timestamps means lost packets. In indexed containers (mp4, mkv, webm, avi,
# gif) a hole is the file's own variable frame rate (a held frame) and the frame is repeated as the file says.
_LOSSY_TIMING_FORMATS = {"mpegts", "mpegtsraw", "mpeg", "mpegvideo", "h264", "hevc", "flv", "rtp", "rtsp"}
# Make the decoder report bitstream errors instead of concealing them: H.264 otherwise turns a damaged frame into a
# plausible-looking smear with no flag on the frame. (VP9, AV1 and HEVC conceal without telling either way.)
_DECODER_OPTIONS = {"err_detect": "aggressive+explode"}


# Causes attached to InputError (`raise InputError(...) from NotAVideo()`): their names are the `error` column of
# failures.jsonl, so the run summary can count failures by kind.
class NotAVideo(Exception):
    """The file opens, but holds no video: audio only, a still image."""


class CorruptVideo(Exception):
    """Corrupt packets, decoder errors or missing frames inside the clip."""


class TruncatedVideo(Exception):
    """The video stream ends before the duration the container announces."""


@dataclass(slots=True, frozen=True)
class VideoInfo:
    """What the container says about a video, without decoding it."""

    path: str
    duration: float  # seconds, from the stream start
    fps: float
    width: int  # as displayed, i.e. after rotation
    height: int
    rotation: int  # counter-clockwise degrees from the display matrix, one of 0/90/180/270
    codec: str
    size_bytes: int
    # Frames in the stream where the container counts them (mp4, mov) or probe had to count them (a raw stream, or
    # timestamps that claim more frames than the file's bytes can hold); 0 when unknown.
    frames: int = 0
    # "image": a still image taken as a 1-frame input (--images); "video" otherwise.
    source_kind: str = "video"


@dataclass(slots=True)
class Clip:
    """One decoded clip: frames [T, H, W, 3] uint8 and the record of how they were taken."""

    key: str
    frames: np.ndarray
    meta: dict[str, Any]


def _file_size(path: str, stage: str) -> int:
    try:
        size = sources.source_size(path)
    except sources.MemberNotFound as e:
        raise InputError(path, stage, f"{e} (the tar was replaced since it was listed?)") from e
    except FileNotFoundError as e:
        raise InputError(path, stage, "file not found (moved or deleted during the run?)") from e
    except sources.UnsafeMember as e:
        raise InputError(path, stage, str(e)) from e
    except OSError as e:
        raise InputError(path, stage, f"cannot read the file ({_why(e)})") from e
    if size == 0:
        raise InputError(path, stage, "empty file (0 bytes): an interrupted download or copy? "
                         "Fetch it again or remove it from the inputs") from TruncatedVideo()
    return size


@contextlib.contextmanager
def _open(path: str, stage: str) -> Iterator[av.container.InputContainer]:
    """The container, opened by name where FFmpeg can read the file itself, else from `sources.open_source` (a tar
    member, an object); the file object is closed with the container (PyAV leaves a caller's file open).

    A local path goes to FFmpeg as `file:PATH`: FFmpeg reads a bare name's `xxx:` prefix as a protocol (`pipe:`,
    `concat:`, `subfile:`, `http:`...), and paths come from lists, plans and tars that may be a stranger's. A still
    image's header is read first (through the same opener) and an image over image.MAX_IMAGE_PIXELS is refused
    before anything decodes it."""
    with contextlib.ExitStack() as stack:
        try:
            if sources.is_local(path):
                with sources.open_source(path) as f:
                    _check_image_size(f, path, stage)
                source: Any = "file:" + path
            else:
                source = stack.enter_context(sources.open_source(path))
                _check_image_size(source, path, stage)
                source.seek(0)
            container = stack.enter_context(av.open(source, metadata_errors="ignore"))
        except Exception as e:
            error = _open_error(e, path, stage)
            if error is e:
                raise
            raise error from e
        yield container


def _check_image_size(f: Any, path: str, stage: str) -> None:
    try:
        found = image.image_size(f)
    except (OSError, struct.error):
        return  # not a header this reads: FFmpeg's own checks decide
    if found is None:
        return
    _check_pixels(path, stage, found[0], found[1], found[2])


def _check_pixels(path: str, stage: str, kind: str, width: int, height: int) -> None:
    if width * height > image.MAX_IMAGE_PIXELS:
        raise InputError(path, stage, f"a {width}x{height} {kind} image: {width * height / 1e6:.0f} megapixels, "
                         f"over the {image.MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit for still images "
                         f"(decoding it would take {width * height * 3 / 1e9:.1f} GB or more); refused before "
                         "decoding. Downscale it first")


# A video frame over 8192x8192 (8K DCI is 8192x4320) is refused before it is decoded: FFmpeg accepts up to ~268
# megapixels, and a few-KB file can declare that, which frame threading then multiplies by its ~17 frames in flight.
MAX_VIDEO_PIXELS = 8192 * 8192


def _check_video_size(path: str, stage: str, width: int, height: int, where: str) -> None:
    if width * height > MAX_VIDEO_PIXELS:
        raise InputError(path, stage, f"{where} is {width}x{height}: {width * height / 1e6:.0f} megapixels a frame, "
                         f"over the {MAX_VIDEO_PIXELS / 1e6:.0f}-megapixel limit for videos (8192x8192; each decoded "
                         f"frame would take {width * height * 1.5 / 1e9:.1f} GB or more); refused. Downscale it first")


def _open_error(e: Exception, path: str, stage: str) -> Exception:
    if isinstance(e, FileNotFoundError):
        return InputError(path, stage, "file not found (moved or deleted during the run?)")
    if isinstance(e, PermissionError):
        return InputError(path, stage, "permission denied")
    if isinstance(e, sources.UnsafeMember):
        return InputError(path, stage, str(e))
    if isinstance(e, av.FFmpegError | OSError | UnicodeDecodeError):
        return InputError(path, stage, f"not a readable video container ({_why(e)}); expected a "
                          "video file such as mp4/mkv/webm/mov: is it truncated, or not a video?")
    return e


def _video_stream(container: av.container.InputContainer, path: str, stage: str) -> av.video.stream.VideoStream:
    fmt = container.format.name
    if fmt == _STILL_IMAGE_FORMATS[0] or fmt.endswith(_STILL_IMAGE_FORMATS[1]):
        raise InputError(path, stage, f"a still image ({fmt} format), not a video; pass --images to encode still "
                         "images as 1-frame samples") from NotAVideo()
    # The first *video* stream: many files put audio first. Cover art in music files is a "video" stream of one
    # picture, marked as attached.
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    for stream in videos:
        if stream.codec_context is not None and stream.codec_context.width > 0:
            # What the container declares, before any frame is decoded (each frame's own size is checked as well).
            _check_video_size(path, stage, stream.codec_context.width, stream.codec_context.height, "the video stream")
            return stream
    if videos:
        codec = videos[0].codec_context.name if videos[0].codec_context is not None else "unknown"
        raise InputError(path, stage, f"the video stream's codec ({codec}) cannot be decoded by this PyAV/FFmpeg "
                         "build, or its frame size is missing") from NotAVideo()
    kinds = ", ".join(s.type + (" (cover art)" if s.disposition & av.stream.Disposition.attached_pic else "")
                      for s in container.streams) or "none"
    raise InputError(path, stage, f"no video stream (streams found: {kinds})") from NotAVideo()


def _stream_start(stream: av.video.stream.VideoStream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _frame_period(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return 1.0 / float(rate) if rate else 1.0 / 25.0


def _sample_aspect(stream: av.video.stream.VideoStream) -> Fraction:
    """Pixel aspect ratio (anamorphic DVD/broadcast/HDV sources store non-square pixels); 1 when unknown."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return Fraction(sar) if sar and sar > 0 else Fraction(1)


def _displayed_width(width: int, sar: Fraction) -> int:
    return max(1, round(width * sar))


def _rotation(frame: av.VideoFrame) -> int:
    """Display-matrix rotation snapped to 0/90/180/270, counter-clockwise (np.rot90's direction)."""
    return int(round(frame.rotation / 90.0)) * 90 % 360


def probe(path: str | os.PathLike, *, images: bool = False) -> VideoInfo:
    """Read container metadata (one frame is decoded only to learn the rotation). Raises InputError.

    Whether a file is a video is decided here, by opening it, never by its extension. A still image is refused as
    not a video, unless `images` (--images) takes it as a 1-frame input.
    """
    path = str(path)
    size = _file_size(path, "probe")
    with _open(path, "probe") as container:
        if images and _is_still_image(container):
            return probe_image(container, path, size)
        stream = _video_stream(container, path, "probe")
        duration = None
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base - max(_stream_start(stream), 0.0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise InputError(path, "probe", f"the first frame does not decode ({_why(e)})") from e
        if first is None:
            raise InputError(path, "probe", "the video stream holds no decodable frame") from CorruptVideo()
        _check_video_size(path, "probe", first.width, first.height, "the first frame")
        rotation = _rotation(first)
        width, height = _displayed_width(first.width, _sample_aspect(stream)), first.height
        if rotation in (90, 270):
            width, height = height, width
        if fps <= 0:
            fps = 25.0
        frames = max(stream.frames or 0, 0)
        if duration is None or duration <= 0 or (not frames and duration * fps * _MIN_FRAME_BYTES > size):
            # No duration (raw .h264/.hevc, some gifs), or a duration the file is far too small to fill: demux the
            # packets (no decoding) to learn how many frames there really are and where they end.
            counted, end = _count_by_demux(path, stream)
            frames = frames or counted
            if duration is None or duration <= 0:
                duration = end if end > 0 else counted / fps
        return VideoInfo(
            path=path,
            duration=duration,
            fps=fps,
            width=width,
            height=height,
            rotation=rotation,
            codec=stream.codec_context.name,
            size_bytes=size,
            frames=frames,
        )


def _count_by_demux(path: str, stream: av.video.stream.VideoStream) -> tuple[int, float]:
    """(packets, last packet end time) of the video stream; the time is 0 when no packet has a timestamp (raw
    elementary streams)."""
    # A fresh demuxer rather than a seek back: raw elementary streams (.h264, .hevc) cannot seek.
    with _open(path, "probe") as fresh:
        return _last_packet_end(fresh, fresh.streams[stream.index])


def _last_packet_end(container: av.container.InputContainer,
                     stream: av.video.stream.VideoStream) -> tuple[int, float]:
    start, end, count = None, 0.0, 0
    try:
        for packet in container.demux(stream):
            count += bool(packet.size)
            if packet.pts is None:
                continue
            t = float(packet.pts * packet.time_base)
            start = t if start is None else min(start, t)
            end = max(end, t + float((packet.duration or 0) * packet.time_base))
    except av.FFmpegError as e:
        log.debug("%s: demuxing stopped at %.3fs (%s)", container.name, end, e)
    return count, end - (start or 0.0)


@dataclass(slots=True, frozen=True)
class Geometry:
    """How a displayed source frame of src_w x src_h becomes the target: scale, then crop or pad."""

    scaled_w: int
    scaled_h: int
    # Region of the scaled frame that is kept (crop) or where it is placed in the output (fit): x, y, w, h.
    box: tuple[int, int, int, int]
    mode: str
    upscaled: bool

    @staticmethod
    def plan(src_w: int, src_h: int, width: int, height: int, mode: str) -> Geometry:
        if mode == "crop":
            scale = max(width / src_w, height / src_h)
        elif mode == "fit":
            scale = min(width / src_w, height / src_h)
        else:
            raise ValueError(f"resize mode {mode!r} is not one of 'crop', 'fit'")
        # Round up for crop so the scaled frame always covers the target; down for fit so it always fits. The nudge
        # keeps float error (160 * 0.4 = 63.99999...) from costing a row.
        if mode == "crop":
            sw, sh = int(np.ceil(src_w * scale - 1e-6)), int(np.ceil(src_h * scale - 1e-6))
        else:
            sw = min(max(int(np.floor(src_w * scale + 1e-6)), 1), width)
            sh = min(max(int(np.floor(src_h * scale + 1e-6)), 1), height)
        if mode == "crop":
            sw, sh = max(sw, width), max(sh, height)
            box = ((sw - width) // 2, (sh - height) // 2, width, height)
        else:
            box = ((width - sw) // 2, (height - sh) // 2, sw, sh)
        return Geometry(sw, sh, box, mode, upscaled=scale > 1.0)

    def apply(self, rgb: np.ndarray, width: int, height: int) -> np.ndarray:
        """The scaled frame at the clip's size, in an array of its own."""
        return np.ascontiguousarray(self.place(rgb, width, height))

    def place(self, rgb: np.ndarray, width: int, height: int) -> np.ndarray:
        """The scaled frame at the clip's size: a view of `rgb` when cropping, for a caller that copies it into
        its own frames anyway (a copy here would be a second one per frame), a new array when padding."""
        x, y, w, h = self.box
        if self.mode == "crop":
            return rgb[y : y + h, x : x + w]
        out = np.zeros((height, width, 3), np.uint8)
        out[y : y + h, x : x + w] = rgb
        return out


def target_times(start: float, clip: ClipSettings) -> list[float]:
    return [start + i / clip.fps for i in range(clip.frames)]


class _Converter:
    """Converts each picked frame once (a frame shown at two target times is converted once)."""

    def __init__(self, clip: ClipSettings, sar: Fraction = Fraction(1), path: str = "") -> None:
        self.clip = clip
        self.path = path
        self.sar = sar
        self.geometry: Geometry | None = None
        self.rotation = 0
        self.source_size = (0, 0)
        self._stored_size = (0, 0)
        self._last: tuple[av.VideoFrame, np.ndarray] | None = None
        # One swscale context for the whole clip: `frame.reformat` builds a new one per frame, which costs more than
        # the scaling itself at training resolutions.
        self._reformatter = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self._last is not None and self._last[0] is frame:
            return self._last[1]
        if (frame.width, frame.height) != self._stored_size:
            # The first frame, or the stream changed its resolution mid-way (an encoder may, at a keyframe).
            _check_video_size(self.path, "decode", frame.width, frame.height, "a frame")
            self._stored_size = (frame.width, frame.height)
        if self.geometry is None:
            self.rotation = _rotation(frame)
            swap = self.rotation in (90, 270)
            # Geometry works on the picture as displayed: non-square pixels stretched, then rotated.
            shown_w = _displayed_width(frame.width, self.sar)
            self.source_size = (frame.height, shown_w) if swap else (shown_w, frame.height)
            self.geometry = Geometry.plan(*self.source_size, self.clip.width, self.clip.height, self.clip.resize)
        geo = self.geometry
        # swscale works on the stored (unrotated) frame, so ask it for the rotated-back size.
        out_w, out_h = (geo.scaled_h, geo.scaled_w) if self.rotation in (90, 270) else (geo.scaled_w, geo.scaled_h)
        interpolation = "BICUBIC" if geo.upscaled else "AREA"
        rgb = self._reformatter.reformat(frame, width=out_w, height=out_h, format="rgb24",
                                         interpolation=interpolation).to_ndarray()
        if self.rotation:
            rgb = np.rot90(rgb, k=self.rotation // 90)
        # A view of the reformatted frame (which it keeps alive): the builder copies it into the clip's frames.
        out = geo.place(rgb, self.clip.width, self.clip.height)
        self._last = (frame, out)
        return out


class _SeekMissed(Exception):
    """The seek landed after the clip start or between keyframes: decode from the start of the file instead."""


def _since_start(pts: int, time_base: Fraction, stream: av.video.stream.VideoStream, t0: float) -> float:
    """Seconds since the stream start, computed in exact ticks: 8.05 - 7.3 in floats is 0.7500000000000009, which
    would make a frame shown exactly at a target time miss it."""
    if stream.start_time is not None and time_base == stream.time_base:
        return float((pts - stream.start_time) * time_base)
    return float(pts * time_base) - t0


def _decoded_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream, t0: float,
                    integrity: _Integrity, path: str, preroll_until: float | None = None,
                    codec: av.CodecContext | None = None, skipper: _Skipper | None = None) -> Iterator[_Decoded]:
    """Decode packet by packet, so that one bad packet is recorded and decoded around instead of ending the clip.

    Packets shown before `preroll_until` are only decoded as far as later frames need them: the decoder skips
    non-reference frames (most B-frames) there, which no frame of the clip can depend on.
    """
    decoded, bad_in_row = 0, 0
    packets = container.demux(stream) if skipper is None else skipper.wrap(container.demux(stream))
    ctx = codec if codec is not None else stream.codec_context
    # Set on every pass: a pass that ended in preroll (a missed seek) must not leave frames skipped for the next.
    ctx.skip_frame = "NONREF" if preroll_until is not None else "DEFAULT"
    crc = _MatroskaCRC(path) if container.format.name.startswith("matroska") else None
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            integrity.finished()
            return
        except av.FFmpegError as e:
            # The demuxer cannot go on (truncated or garbled container): what was decoded so far still counts.
            integrity.damage(None, f"the container breaks off ({_why(e)})")
            log.debug("%s: demuxing stopped after %d frames: %s", path, decoded, e)
            return
        packet_t = _since_start(packet.pts, packet.time_base, stream, t0) if packet.pts is not None else None
        if preroll_until is not None and (packet_t is None or packet_t >= preroll_until):
            ctx.skip_frame = "DEFAULT"
            preroll_until = None
        if preroll_until is None and skipper is not None:
            # Set per packet: FFmpeg's frame threads copy skip_frame into the thread that takes this very packet.
            ctx.skip_frame = "NONREF" if skipper.unneeded(packet) else "DEFAULT"
        if packet.is_corrupt:
            integrity.damage(packet_t, "a packet is flagged corrupt by the demuxer")
        elif crc is not None and packet.pos is not None and not crc.intact(packet.pos):
            integrity.damage(packet_t, "the Matroska cluster holding a packet fails its CRC-32")
        if packet.size and ctx.skip_frame == "DEFAULT" and not packet.is_discard:
            integrity.sent(packet_t)
        try:
            frames = packet.decode() if codec is None else codec.decode(packet)
            bad_in_row = 0
        except av.FFmpegError as e:
            bad_in_row += 1
            integrity.damage(packet_t, f"a packet does not decode ({_why(e)})")
            if bad_in_row > _MAX_BAD_PACKETS:
                raise InputError(path, "decode", f"{bad_in_row} packets in a row do not decode after {decoded} "
                                 f"good frames ({_why(e)})") from e
            continue
        for frame in frames:
            if codec is not None and frame.pts is not None:
                frame.time_base = stream.time_base  # a standalone decoder does not know the stream's time base
            t = (_since_start(frame.pts, frame.time_base, stream, t0) if frame.pts is not None and frame.time_base
                 else decoded * integrity.period)
            decoded += 1
            yield integrity.check(t, frame)


# Decoders that apply skip_frame to the packet sent with it, also with frame threads, and mark non-reference frames
# in the bitstream (H.264 nal_ref_idc, HEVC's sub-layer non-reference NAL types). Others decode every frame.
_SKIP_CODECS = {"h264", "hevc"}
# How far `_Skipper` reads ahead of the decoder for a packet's successor; beyond it, the packet is decoded.
_LOOKAHEAD_PACKETS = 64


class _Skipper:
    """Decides, per packet, whether its frame can be left undecoded: the frame of a packet shown at `p` is on screen
    at no target time when another packet is shown after `p` and at or before the first target at or after `p`.

    Such a packet is sent with skip_frame NONREF, so the decoder drops it only when no other frame references it:
    every frame a target shows, and every frame those predict from, decode exactly as in a full decode. Packets are
    read ahead from the demuxer (cheap: no decoding) until the answer is certain: once a packet's decode time passes
    the target, no later packet can be shown before it. Without timestamps, past the last target, or beyond
    `_LOOKAHEAD_PACKETS`, the packet is decoded.
    """

    def __init__(self, targets: list[float], stream: av.video.stream.VideoStream, t0: float) -> None:
        self.targets, self.stream, self.t0 = targets, stream, t0
        self.ahead: list[tuple[av.Packet, float | None, float | None]] = []  # (packet, pts time, dts time)
        self.source: Iterator[av.Packet] | None = None
        self.ended = False
        self.skipped = 0

    def _time(self, ts: int | None, packet: av.Packet) -> float | None:
        return None if ts is None else _since_start(ts, packet.time_base, self.stream, self.t0)

    def _read(self) -> bool:
        assert self.source is not None
        if self.ended:
            return False
        try:
            packet = next(self.source)
        except StopIteration:
            self.ended = True
            return False
        self.ahead.append((packet, self._time(packet.pts, packet), self._time(packet.dts, packet)))
        return True

    def wrap(self, packets: Iterator[av.Packet]) -> Iterator[av.Packet]:
        """The demuxer's packets, in order, with look-ahead for `unneeded`. Demuxer errors surface in order too."""
        self.source = packets
        while self.ahead or self._read():
            yield self.ahead.pop(0)[0]

    def unneeded(self, packet: av.Packet) -> bool:
        """Whether `packet` (the one `wrap` just gave) shows at no target time; counts it when so."""
        if not packet.size or packet.pts is None or packet.is_corrupt or packet.is_discard:
            return False
        p = self._time(packet.pts, packet)
        i = bisect.bisect_left(self.targets, p - 1e-6)
        if i == len(self.targets):
            return False  # after the last target: it may be the frame that ends the clip
        target = self.targets[i] + 1e-6  # the builder's microsecond of slack
        seen = 0
        while True:
            for _, pts, dts in self.ahead[seen:]:
                if pts is not None and p < pts <= target:
                    self.skipped += 1
                    return True
                if dts is None:
                    return False
                if dts > target:
                    return False  # every later packet is shown after the target: this one shows there
            seen = len(self.ahead)
            if seen >= _LOOKAHEAD_PACKETS or not self._read():
                return False


def _check_second_opinion(path: str, index: int, builder: _ClipBuilder, *, skip: bool = True) -> None:
    """Decode the clip again with `_SECOND_OPINION`'s decoder and compare the frames taken; CorruptVideo if any differs
    or does not decode."""
    wanted = sorted(set(builder.times))
    start = builder.start
    for seek in (start > 0, False):
        with _open(path, "decode") as container:
            stream = container.streams[index]
            t0 = _stream_start(stream)
            if seek:
                try:
                    container.seek(int((t0 + start) / stream.time_base), stream=stream, backward=True)
                except (av.FFmpegError, OSError):
                    continue
            ctx = _second_decoder(container, stream)
            found = _frames_at(container, stream, ctx, t0, wanted, builder,
                               skip=skip and ctx is stream.codec_context and stream.codec_context.name in _SKIP_CODECS)
        if found is not None:
            break
    else:
        found = 0
    if found < len(wanted):
        raise InputError(path, "decode", f"corrupt video inside the clip {start:.3f}-{builder.targets[-1]:.3f}s: "
                         f"{_SECOND_OPINION[stream.codec_context.name]} decode differs from the first decode "
                         f"(only {found} of {len(wanted)} frames agree): the stream is damaged; clip dropped") \
            from CorruptVideo()


def _frames_at(container: av.container.InputContainer, stream: av.video.stream.VideoStream, ctx: Any, t0: float,
               wanted: list[float], builder: _ClipBuilder, *, skip: bool = False) -> int | None:
    """How many of the frames shown at `wanted` decode to what `builder` holds; None when the decode started after
    the first of them (a seek that missed).

    With `skip` (slice threads: skip_frame applies to the packet sent), packets not shown at a wanted time are sent
    with skip_frame NONREF: the wanted frames and their references decode as in a full decode."""
    wanted_set = set(wanted)
    convert = _Converter(builder.clip, builder.convert.sar, builder.path)
    # A standalone decoder's frames lack the stream's display matrix: take the first decode's geometry as it is.
    convert.geometry, convert.rotation = builder.convert.geometry, builder.convert.rotation
    agree, first = 0, True
    try:
        for packet in container.demux(stream):
            if skip:
                shown = (round(_since_start(packet.pts, packet.time_base, stream, t0), 6)
                         if packet.pts is not None else None)
                ctx.skip_frame = "NONREF" if shown is not None and shown not in wanted_set else "DEFAULT"
            try:
                frames = ctx.decode(packet) if ctx is not stream.codec_context else packet.decode()
            except av.FFmpegError:
                continue  # the frame is missing from what follows: counted as a disagreement
            for frame in frames:
                if frame.pts is None:
                    continue
                t = round(_since_start(frame.pts, frame.time_base or stream.time_base, stream, t0), 6)
                if first and t > wanted[0] + 1e-6:
                    return None
                first = False
                if t in wanted:
                    i = builder.times.index(t)
                    agree += bool(np.array_equal(convert(frame), builder.frames[i]))
                if t >= wanted[-1] - 1e-6:
                    return agree
    except av.FFmpegError:
        pass
    return agree


def frames_in(out: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A view of the flat uint8 buffer `out` as frames of `shape`; ValueError when it cannot hold them."""
    need = int(np.prod(shape))
    if out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"a frame buffer is a flat, contiguous, writeable uint8 array, not {out.dtype} {out.shape}")
    if out.size < need:
        raise ValueError(f"a frame buffer of {out.size} bytes cannot hold {shape} frames ({need} bytes)")
    return out[:need].reshape(shape)


class _ClipBuilder:
    """Takes, for each target time, the frame on screen at that time (the last one with pts <= target)."""

    def __init__(self, path: str, start: float, clip: ClipSettings, period: float,
                 sar: Fraction = Fraction(1), out: np.ndarray | None = None) -> None:
        self.path = path
        self.start = start
        self.clip = clip
        self.period = period
        self.targets = target_times(start, clip)
        shape = (clip.frames, clip.height, clip.width, 3)
        self.frames = np.empty(shape, np.uint8) if out is None else frames_in(out, shape)
        self.times: list[float] = []
        self.convert = _Converter(clip, sar, path)

    @property
    def done(self) -> bool:
        return len(self.times) >= self.clip.frames

    def next_target(self) -> float:
        return self.targets[len(self.times)]

    def take(self, d: _Decoded) -> None:
        if d.damaged is not None:
            raise InputError(self.path, "decode", f"corrupt video at {d.t:.3f}s, inside the clip "
                             f"{self.start:.3f}-{self.targets[-1]:.3f}s: {d.damaged}; clip dropped") \
                from CorruptVideo()
        self.frames[len(self.times)] = self.convert(d.frame)
        self.times.append(round(d.t, 6))

    def fill_until(self, prev: _Decoded, until: float, hole_from: float | None = None) -> None:
        """Take `prev` for every target before `until` (the next frame's time, or where `prev` stops showing)."""
        # A microsecond of slack: a frame whose time equals a target (up to rounding) is the one shown there.
        while not self.done and self.next_target() < until - 1e-6:
            if hole_from is not None and self.next_target() >= hole_from:
                # Taking `prev` here would repeat it in place of frames that were lost.
                raise InputError(self.path, "decode", f"frames missing inside the clip: none between {prev.t:.3f}s "
                                 f"and {until:.3f}s (the stream's frame period is {hole_from - prev.t:.3f}s); "
                                 "clip dropped rather than repeating a frame") from CorruptVideo()
            self.take(prev)


def nvdec_context(stream: av.video.stream.VideoStream, path: str) -> av.CodecContext | None:
    """An NVDEC (`<codec>_cuvid`) decoder for this stream, or None (with a log line) to decode on the CPU."""
    name = f"{stream.codec_context.name}_cuvid"
    if name not in av.codecs_available:
        _log_once(f"no NVDEC decoder {name} in this ffmpeg build; decoding {stream.codec_context.name} on the CPU")
        return None
    try:
        ctx = av.CodecContext.create(name, "r")
        ctx.extradata = stream.codec_context.extradata
        ctx.open()
    except (av.FFmpegError, OSError) as e:
        _log_once(f"NVDEC {name} is unavailable here ({_why(e)}); decoding on the CPU")
        return None
    log.debug("%s: decoding with %s", path, name)
    return ctx


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info(message)


def decode_clip(path: str | os.PathLike, start: float, clip: ClipSettings, *, key: str = "",
                nvdec: bool = False, check: str = "auto", exhaustive: bool = False, threads: int = 0,
                out: np.ndarray | None = None) -> Clip:
    """Decode `clip.frames` frames starting `start` seconds after the stream start, at `clip.fps`.

    Seeks to the keyframe before `start` and decodes forward, so a clip late in a long file costs the same as an
    early one; containers without a usable index (MPEG-TS) fall back to decoding from the start. Only the frames
    taken are converted, and at most two source frames are alive at once.
    With `nvdec=True`, h264/hevc/vp9/av1... are decoded by the GPU's NVDEC where this ffmpeg has it and a GPU is
    there, else on the CPU (logged once). Raises InputError (stage "decode") for unreadable, corrupt, truncated or
    too-short videos.

    Non-reference frames that no target time shows are not decoded (`_Skipper`); `exhaustive=True` decodes every
    frame from the seek point, the reference the tests compare with. `check="off"` (--decode-check off) leaves out
    the second decode of `_SECOND_OPINION` codecs, for corpora the user trusts; "auto" runs it.
    `threads`: the decoder's threads, 0 for FFmpeg's own choice (a thread per core and one more, whatever share of
    the cores this process has). The frames are the same with any count; the CPU they cost is not
    (`loader.decoder_threads`).
    `out`: a flat uint8 buffer of at least the clip's bytes that the frames are written into (the returned
    `Clip.frames` is a view of it), as a decode worker writes into its frame ring's slot: a fresh 50 MB array per
    49x480x720 clip costs its page faults and then a copy into the slot. None: a new array. A still image (the
    `clip.images` path) is returned in an array of its own.
    """
    if check not in DECODE_CHECKS:
        raise ValueError(f"decode check {check!r} is not one of {', '.join(DECODE_CHECKS)}")
    path = str(path)
    size = _file_size(path, "decode")
    with _open(path, "decode") as container:
        if clip.images and _is_still_image(container):
            return decode_image(container, path, size, clip, key=key)
        stream = _video_stream(container, path, "decode")
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        stream.codec_context.options = dict(_DECODER_OPTIONS)
        period = _frame_period(stream)
        detect_holes = bool(set(container.format.name.split(",")) & _LOSSY_TIMING_FORMATS)
        codec = nvdec_context(stream, path) if nvdec else None
        # Skipping frames needs exact per-packet control: decoders that take skip_frame per packet (frame threads copy
        # it when the packet is submitted), not NVDEC's queue, and not stream containers, where skipped frames would
        # read as holes.
        skip = not exhaustive and codec is None and not detect_holes and stream.codec_context.name in _SKIP_CODECS
        run = _Run(container, stream, path, start, clip, period, detect_holes, codec, skip=skip, out=out)
        try:
            builder, last = run.decode(seek=start > 0)
            if run.skipped and run.integrity.damage_seen:
                raise _Redo()
        except InputError:
            if not run.skipped:
                raise
            builder, last = _redo(run, container, stream, start, codec)
        except _Redo:
            builder, last = _redo(run, container, stream, start, codec)
        except _SeekMissed:
            log.debug("%s: seek to %.3fs missed the clip, decoding from the start", path, start)
            try:
                container.seek(0)
            except (av.FFmpegError, OSError) as e:
                raise InputError(path, "decode", f"the clip at {start:.3f}s cannot be reached: a seek missed it and "
                                 f"the stream cannot seek back to its start ({_why(e)})") from e
            if codec is not None:
                codec.flush_buffers()
            run.skip = False  # the rare path (no usable index): decoded in full, as before
            builder, last = run.decode(seek=False)
        padded = _finish(builder, last, run.integrity, _announced_duration(container, stream))
        if check == "auto" and stream.codec_context.name in _SECOND_OPINION and builder.times:
            _check_second_opinion(path, stream.index, builder, skip=not exhaustive)
    meta = _meta(builder, path, size, period, padded) | {"frames_decoded": run.frames_decoded}
    return Clip(key=key, frames=builder.frames, meta=meta)


def _redo(run: _Run, container: av.container.InputContainer, stream: av.video.stream.VideoStream, start: float,
          codec: av.CodecContext | None) -> tuple[_ClipBuilder, _Decoded | None]:
    """Decode the clip again with every frame, after a pass that skipped frames saw damage or failed: a damaged or
    failing clip gets exactly the verdict (and the reason) of a full decode."""
    log.debug("%s: the clip at %.3fs saw damage while skipping frames; decoding every frame", run.path, start)
    run.skip = False
    if start > 0:
        with contextlib.suppress(_SeekMissed):
            return run.decode(seek=True)
    container.seek(0)
    if codec is not None:
        codec.flush_buffers()
    return run.decode(seek=False)


class _Redo(Exception):
    """A pass that skipped frames saw damage: decode the clip again without skipping."""


class _Run:
    """One pass of decoding forward, from a seek point or from the start of the file."""

    def __init__(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: str,
                 start: float, clip: ClipSettings, period: float, detect_holes: bool,
                 codec: av.CodecContext | None = None, *, skip: bool = False, out: np.ndarray | None = None) -> None:
        self.container, self.stream, self.path, self.codec = container, stream, path, codec
        self.out = out
        self.start, self.clip, self.period, self.detect_holes = start, clip, period, detect_holes
        self.integrity = _Integrity(period, detect_holes=detect_holes, after_seek=False)
        self.frames_decoded = 0  # over every pass: what the clip cost, to show that seeking works
        self.skip = skip  # skip non-reference frames no target shows (`_Skipper`)
        self.skipped = 0  # packets skipped that way, over every pass

    def decode(self, *, seek: bool) -> tuple[_ClipBuilder, _Decoded | None]:
        """Takes the clip's frames; raises _SeekMissed when the seek landed somewhere the clip cannot start."""
        t0 = _stream_start(self.stream)
        if seek:
            try:
                # backward=True lands on the keyframe at or before the clip start where the container has an index.
                self.container.seek(int((t0 + self.start) / self.stream.time_base), stream=self.stream,
                                    backward=True)
            except (av.FFmpegError, OSError) as e:
                # Raw elementary streams cannot seek: decode from where the freshly opened file stands, its start.
                log.debug("%s: cannot seek (%s); decoding from the start", self.path, _why(e))
                seek = False
            if seek and self.codec is not None:
                self.codec.flush_buffers()  # seek flushes the stream's own decoder only
        builder = _ClipBuilder(self.path, self.start, self.clip, self.period, _sample_aspect(self.stream), self.out)
        self.integrity = integrity = _Integrity(self.period, detect_holes=self.detect_holes, after_seek=seek)
        prev: _Decoded | None = None
        try:
            # Skipping frames would open holes in the timestamps, which stream containers read as lost packets.
            # A second of margin covers B-frame reordering around the clip start.
            # Only where the decoder applies skip_frame to the packet sent with it (`_SKIP_CODECS`): libdav1d, for
            # one, applies it frames late, and dropped a frame of the clip, which then read as damage.
            preroll = (seek and not self.detect_holes and self.codec is None
                       and self.stream.codec_context.name in _SKIP_CODECS)
            preroll_until = self.start - 1.0 if preroll else None
            skipper = _Skipper(builder.targets, self.stream, t0) if self.skip else None
            for d in _decoded_frames(self.container, self.stream, t0, integrity, self.path, preroll_until,
                                     self.codec, skipper):
                self.frames_decoded += 1
                if prev is None and d.t > builder.targets[0] + 1.5 * self.period:
                    if seek:
                        raise _SeekMissed()
                    raise InputError(self.path, "decode", f"the first decodable frame is at {d.t:.3f}s, after the "
                                     f"clip start {builder.targets[0]:.3f}s") from CorruptVideo()
                if prev is not None and d.t <= prev.t:
                    continue  # a repeated or out-of-order timestamp: keep the first frame shown at that time
                if prev is not None:
                    builder.fill_until(prev, d.t, d.hole_from)
                if builder.done:
                    break
                prev = d
            if prev is not None and not builder.done:
                # The stream ended: the last frame covers the targets before it stops being shown (its duration
                # is the file's own timing, never a hole).
                shown = float(prev.frame.duration * prev.frame.time_base) if prev.frame.duration else self.period
                builder.fill_until(prev, prev.t + shown)
        except InputError:
            if seek and integrity.reason == _SEEK_START:
                raise _SeekMissed() from None
            raise
        finally:
            if skipper is not None:
                self.skipped += skipper.skipped
        if seek and prev is None:
            raise _SeekMissed()
        return builder, prev


def _finish(builder: _ClipBuilder, last: _Decoded | None, integrity: _Integrity, announced: float | None) -> int:
    """Decide between a complete clip, padding, a skip (too short) and a failure (truncated or damaged).

    Returns the number of frames padded."""
    path, clip, start = builder.path, builder.clip, builder.start
    if last is None:
        raise InputError(path, "decode", f"no frame decoded at or after {start:.3f}s") from CorruptVideo()
    missing = clip.frames - len(builder.times)
    if not missing:
        return 0
    shown = float(last.frame.duration * last.frame.time_base) if last.frame.duration else builder.period
    ends_at = last.t + shown
    if integrity.reason is not None or (announced is not None and ends_at < announced - max(4 * builder.period, 0.5)):
        found = f"ends at {ends_at:.2f}s" + (f" ({integrity.reason})" if integrity.reason else "")
        expected = f"the container announces {announced:.2f}s" if announced else "the clip needs more"
        raise InputError(path, "decode", f"the video stream {found}, but {expected}: a truncated or damaged file; "
                         "clip dropped") from TruncatedVideo()
    if clip.short != "pad":
        need = (clip.frames - 1) / clip.fps
        raise InputError(
            path, "decode",
            f"too short: {ends_at - start:.2f}s of video from {start:.2f}s, a clip of {clip.frames} frames "
            f"at {clip.fps:g} fps needs more than {need:.2f}s (use --short pad, fewer --frames or --frame-buckets)",
            skipped=True,
        )
    if not builder.times:
        builder.take(last)
        missing -= 1
    builder.frames[len(builder.times):] = builder.frames[len(builder.times) - 1]
    log.info("%s: %d of %d frames padded by repeating the last frame (--short pad)", path, missing, clip.frames)
    return missing


def _announced_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base - max(_stream_start(stream), 0.0)
    return None


def _meta(builder: _ClipBuilder, path: str, size: int, period: float, padded: int) -> dict[str, Any]:
    clip, convert, start = builder.clip, builder.convert, builder.start
    geo = convert.geometry
    assert geo is not None  # at least one frame was converted
    src_w, src_h = convert.source_size
    if geo.upscaled:
        log.info("%s: %dx%d is smaller than %dx%d, upscaled", path, src_w, src_h, clip.width, clip.height)
    return {
        "source": path,
        "source_size_bytes": size,
        "source_width": src_w,
        "source_height": src_h,
        "source_fps": round(1.0 / period, 6),
        "clip_start": round(start, 6),
        "clip_end": round(start + (clip.frames - 1) / clip.fps, 6),
        "frame_times": builder.times,
        "fps": clip.fps,
        "frames": clip.frames,
        "height": clip.height,
        "width": clip.width,
        "rotation_applied": convert.rotation,
        "resize": clip.resize,
        "scaled_size": [geo.scaled_w, geo.scaled_h],
        "box": list(geo.box),
        "upscaled": geo.upscaled,
        "padded_frames": padded,
        # Output frames that show the same source frame as the one before: the source's own timing (a low frame
        # rate, a held VFR frame), recorded so that a repeat is never silent.
        "repeated_frames": sum(a == b for a, b in itertools.pairwise(builder.times)),
    }


# ------------------------------------------------------------------ still images (--images)


def _is_still_image(container: av.container.InputContainer) -> bool:
    """Opened by a demuxer of single pictures (image2, png_pipe, jpeg_pipe, webp_pipe, ...): what the file is, by its
    content, whatever its extension."""
    fmt = container.format.name
    return fmt == _STILL_IMAGE_FORMATS[0] or fmt.endswith(_STILL_IMAGE_FORMATS[1])


def _image_frame(container: av.container.InputContainer, path: str, stage: str
                 ) -> tuple[av.video.stream.VideoStream, av.VideoFrame]:
    stream = next((s for s in container.streams.video if s.codec_context is not None), None)
    if stream is None:
        raise InputError(path, stage, "an image container without a picture") from NotAVideo()
    # Formats whose header image_size does not read (TIFF...): the size the demuxer found, before decoding.
    _check_pixels(path, stage, stream.codec_context.name.upper(), stream.codec_context.width,
                  stream.codec_context.height)
    try:
        frame = next(container.decode(stream), None)
    except av.FFmpegError as e:
        raise InputError(path, stage, f"the image does not decode ({_why(e)}): truncated or damaged?") from e
    if frame is None:
        raise InputError(path, stage, "the image holds no decodable picture") from CorruptVideo()
    return stream, frame


def _image_orientation(path: str, frame: av.VideoFrame) -> tuple[int, bool, int | None]:
    """(quarter turns counter-clockwise, mirrored, the EXIF tag or None): the file's EXIF orientation where it has
    one (PyAV cannot tell a mirror from a rotation, see latentcache.encode.image), else the rotation PyAV reports."""
    tag = image.exif_orientation(path)
    if tag is not None:
        turns, mirror = image.ORIENTATIONS[tag]
        return turns, mirror, tag
    return _rotation(frame) // 90, False, None


def _image_source_size(stream: av.video.stream.VideoStream, frame: av.VideoFrame, turns: int) -> tuple[int, int]:
    """(width, height) as displayed: non-square pixels stretched, then turned."""
    shown_w = _displayed_width(frame.width, _sample_aspect(stream))
    return (frame.height, shown_w) if turns % 2 else (shown_w, frame.height)


def probe_image(container: av.container.InputContainer, path: str, size: int) -> VideoInfo:
    """A still image as a 1-frame input: its displayed size (EXIF orientation applied), no duration."""
    stream, frame = _image_frame(container, path, "probe")
    turns, _, _ = _image_orientation(path, frame)
    width, height = _image_source_size(stream, frame, turns)
    return VideoInfo(path=path, duration=0.0, fps=0.0, width=width, height=height, rotation=turns * 90,
                     codec=stream.codec_context.name, size_bytes=size, frames=1, source_kind="image")


def decode_image(container: av.container.InputContainer, path: str, size: int, clip: ClipSettings, *,
                 key: str = "") -> Clip:
    """A still image -> a 1-frame Clip [1, H, W, 3], resized and cropped (or fitted) like a video's frames.

    Always one frame, whatever `clip.frames` says: an image is planned into its own `1xHxW` bucket. The meta has the
    video clip's fields (a clip at 0 s with one frame) plus `source_kind: "image"` and the EXIF orientation."""
    stream, frame = _image_frame(container, path, "decode")
    turns, mirror, tag = _image_orientation(path, frame)
    src_w, src_h = _image_source_size(stream, frame, turns)
    geo = Geometry.plan(src_w, src_h, clip.width, clip.height, clip.resize)
    # swscale works on the stored picture, so ask it for the size that turns into the scaled displayed one.
    out_w, out_h = (geo.scaled_h, geo.scaled_w) if turns % 2 else (geo.scaled_w, geo.scaled_h)
    rgb = frame.reformat(width=out_w, height=out_h, format="rgb24",
                         interpolation="BICUBIC" if geo.upscaled else "AREA").to_ndarray()
    frames = geo.apply(image.orient(rgb, turns, mirror), clip.width, clip.height)[None]
    if geo.upscaled:
        log.info("%s: %dx%d is smaller than %dx%d, upscaled", path, src_w, src_h, clip.width, clip.height)
    meta = {
        "source": path,
        "source_kind": "image",
        "source_size_bytes": size,
        "source_width": src_w,
        "source_height": src_h,
        "source_fps": None,
        "clip_start": 0.0,
        "clip_end": 0.0,
        "frame_times": [0.0],
        "fps": clip.fps,
        "frames": 1,
        "height": clip.height,
        "width": clip.width,
        "rotation_applied": turns * 90,
        "mirrored": mirror,
        "exif_orientation": tag,
        "resize": clip.resize,
        "scaled_size": [geo.scaled_w, geo.scaled_h],
        "box": list(geo.box),
        "upscaled": geo.upscaled,
        "padded_frames": 0,
        "repeated_frames": 0,
        "frames_decoded": 1,
    }
    return Clip(key=key, frames=np.ascontiguousarray(frames), meta=meta)
