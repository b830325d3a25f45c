"""Probing: what a video's container says (duration, frame rate, displayed size, rotation, codec, frame count),
read without decoding more than its first frame; with --images, a still image as a 1-frame input.

Whether a file is a video is decided here, by opening it (`video_file`), never by its extension.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import av

from latentcache.encode.decoding.still_image import image_frame, image_orientation, image_source_size
from latentcache.encode.decoding.video_file import (
    CorruptVideo,
    check_video_size,
    display_rotation,
    displayed_width,
    file_size,
    is_still_image,
    open_video,
    sample_aspect,
    stream_start,
    video_stream,
    why,
)
from latentcache.errors import InputError

log = logging.getLogger(__name__)


# No coded frame with its container framing is smaller than this (an H.264 skip frame is a few bytes, plus its
# length prefix and index entry): a file that claims more frames than its size allows has broken timestamps.
_MIN_FRAME_BYTES = 8


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


def probe(path: str | os.PathLike, *, images: bool = False) -> VideoInfo:
    """Read container metadata (one frame is decoded only to learn the rotation). Raises InputError.

    Whether a file is a video is decided here, by opening it, never by its extension. A still image is refused as
    not a video, unless `images` (--images) takes it as a 1-frame input.
    """
    path = str(path)
    size = file_size(path, "probe")
    with open_video(path, "probe") as container:
        if images and is_still_image(container):
            return probe_image(container, path, size)
        stream = video_stream(container, path, "probe")
        duration = None
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base - max(stream_start(stream), 0.0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise InputError(path, "probe", f"the first frame does not decode ({why(e)})") from e
        if first is None:
            raise InputError(path, "probe", "the video stream holds no decodable frame") from CorruptVideo()
        check_video_size(path, "probe", first.width, first.height, "the first frame")
        rotation = display_rotation(first)
        width, height = displayed_width(first.width, sample_aspect(stream)), first.height
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
    with open_video(path, "probe") as fresh:
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


def probe_image(container: av.container.InputContainer, path: str, size: int) -> VideoInfo:
    """A still image as a 1-frame input: its displayed size (EXIF orientation applied), no duration."""
    stream, frame = image_frame(container, path, "probe")
    turns, _, _ = image_orientation(path, frame)
    width, height = image_source_size(stream, frame, turns)
    return VideoInfo(path=path, duration=0.0, fps=0.0, width=width, height=height, rotation=turns * 90,
                     codec=stream.codec_context.name, size_bytes=size, frames=1, source_kind="image")
