"""A video file opened with PyAV, as probing and decoding both open it: safely (a local path as `file:PATH`, any
other source through `sources.open_source`), its size limits checked before anything decodes, its video stream found,
and what that stream says about time and geometry (start, frame period, pixel aspect, rotation).

The failure kinds here (`NotAVideo`, `CorruptVideo`, `TruncatedVideo`) are the causes attached to the InputErrors of
probing and decoding.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av

from latentcache.encode.decoding import image
from latentcache.errors import InputError
from latentcache.storage import sources

# Demuxers that read one still image: a PNG or JPEG renamed .mp4 opens as a one-frame "video" through these.
_STILL_IMAGE_FORMATS = ("image2", "_pipe")


# Causes attached to InputError (`raise InputError(...) from NotAVideo()`): their names are the `error` column of
# failures.jsonl, so the run summary can count failures by kind.
class NotAVideo(Exception):
    """The file opens, but holds no video: audio only, a still image."""


class CorruptVideo(Exception):
    """Corrupt packets, decoder errors or missing frames inside the clip."""


class TruncatedVideo(Exception):
    """The video stream ends before the duration the container announces."""


def why(e: BaseException) -> str:
    """'InvalidDataError: Invalid data found when processing input', without FFmpeg's errno and file name."""
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"


def file_size(path: str, stage: str) -> int:
    try:
        size = sources.source_size(path)
    except sources.MemberNotFound as e:
        raise InputError(path, stage, f"{e} (the tar was replaced since it was listed?)") from e
    except FileNotFoundError as e:
        raise InputError(path, stage, "file not found (moved or deleted during the run?)") from e
    except sources.UnsafeMember as e:
        raise InputError(path, stage, str(e)) from e
    except OSError as e:
        raise InputError(path, stage, f"cannot read the file ({why(e)})") from e
    if size == 0:
        raise InputError(path, stage, "empty file (0 bytes): an interrupted download or copy? "
                         "Fetch it again or remove it from the inputs") from TruncatedVideo()
    return size


@contextlib.contextmanager
def open_video(path: str, stage: str) -> Iterator[av.container.InputContainer]:
    """The container, opened by name where FFmpeg can read the file itself, else from `sources.open_source` (a tar
    member, an object); the file object is closed with the container (PyAV leaves a caller's file open).

    A local path goes to FFmpeg as `file:PATH`: FFmpeg reads a bare name's `xxx:` prefix as a protocol (`pipe:`,
    `concat:`, `subfile:`, `http:`...), and paths come from lists, plans and tars that may be a stranger's. A still
    image's header is read first (through the same opener) and an image over image.MAX_IMAGE_PIXELS is refused
    before anything decodes it."""
    with contextlib.ExitStack() as stack:
        try:
            name = sources.ffmpeg_name(path)
            if name is not None:
                with sources.open_source(path) as f:
                    _check_image_size(f, path, stage)
                source: Any = name
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
    check_pixels(path, stage, found[0], found[1], found[2])


def check_pixels(path: str, stage: str, kind: str, width: int, height: int) -> None:
    if width * height > image.MAX_IMAGE_PIXELS:
        raise InputError(path, stage, f"a {width}x{height} {kind} image: {width * height / 1e6:.0f} megapixels, "
                         f"over the {image.MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit for still images "
                         f"(decoding it would take {width * height * 3 / 1e9:.1f} GB or more); refused before "
                         "decoding. Downscale it first")


# A video frame over 8192x8192 (8K DCI is 8192x4320) is refused before it is decoded: FFmpeg accepts up to ~268
# megapixels, and a few-KB file can declare that, which frame threading then multiplies by its ~17 frames in flight.
MAX_VIDEO_PIXELS = 8192 * 8192


def check_video_size(path: str, stage: str, width: int, height: int, where: str) -> None:
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
        return InputError(path, stage, f"not a readable video container ({why(e)}); expected a "
                          "video file such as mp4/mkv/webm/mov: is it truncated, or not a video?")
    return e


def video_stream(container: av.container.InputContainer, path: str, stage: str) -> av.video.stream.VideoStream:
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
            check_video_size(path, stage, stream.codec_context.width, stream.codec_context.height, "the video stream")
            return stream
    if videos:
        codec = videos[0].codec_context.name if videos[0].codec_context is not None else "unknown"
        raise InputError(path, stage, f"the video stream's codec ({codec}) cannot be decoded by this PyAV/FFmpeg "
                         "build, or its frame size is missing") from NotAVideo()
    kinds = ", ".join(s.type + (" (cover art)" if s.disposition & av.stream.Disposition.attached_pic else "")
                      for s in container.streams) or "none"
    raise InputError(path, stage, f"no video stream (streams found: {kinds})") from NotAVideo()


def is_still_image(container: av.container.InputContainer) -> bool:
    """Opened by a demuxer of single pictures (image2, png_pipe, jpeg_pipe, webp_pipe, ...): what the file is, by its
    content, whatever its extension."""
    fmt = container.format.name
    return fmt == _STILL_IMAGE_FORMATS[0] or fmt.endswith(_STILL_IMAGE_FORMATS[1])


def stream_start(stream: av.video.stream.VideoStream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def since_start(pts: int, time_base: Fraction, stream: av.video.stream.VideoStream, t0: float) -> float:
    """Seconds since the stream start, computed in exact ticks: 8.05 - 7.3 in floats is 0.7500000000000009, which
    would make a frame shown exactly at a target time miss it."""
    if stream.start_time is not None and time_base == stream.time_base:
        return float((pts - stream.start_time) * time_base)
    return float(pts * time_base) - t0


def frame_period(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return 1.0 / float(rate) if rate else 1.0 / 25.0


def sample_aspect(stream: av.video.stream.VideoStream) -> Fraction:
    """Pixel aspect ratio (anamorphic DVD/broadcast/HDV sources store non-square pixels); 1 when unknown."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return Fraction(sar) if sar and sar > 0 else Fraction(1)


def displayed_width(width: int, sar: Fraction) -> int:
    return max(1, round(width * sar))


def display_rotation(frame: av.VideoFrame) -> int:
    """Display-matrix rotation snapped to 0/90/180/270, counter-clockwise (np.rot90's direction)."""
    return int(round(frame.rotation / 90.0)) * 90 % 360
