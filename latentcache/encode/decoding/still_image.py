"""Still images as 1-frame inputs (--images), decoded through PyAV like a video: one picture, its EXIF orientation
applied exactly (`image`), resized and cropped (or fitted) by the same `Geometry` as a video's frames.
"""

from __future__ import annotations

import logging

import av
import numpy as np

from latentcache.encode.decoding import image
from latentcache.encode.decoding.frames import Clip, Geometry
from latentcache.encode.decoding.video_file import (
    CorruptVideo,
    NotAVideo,
    check_pixels,
    display_rotation,
    displayed_width,
    sample_aspect,
    why,
)
from latentcache.encode.settings import ClipSettings
from latentcache.errors import InputError

log = logging.getLogger(__name__)


def image_frame(container: av.container.InputContainer, path: str, stage: str
                 ) -> tuple[av.video.stream.VideoStream, av.VideoFrame]:
    stream = next((s for s in container.streams.video if s.codec_context is not None), None)
    if stream is None:
        raise InputError(path, stage, "an image container without a picture") from NotAVideo()
    # Formats whose header image_size does not read (TIFF...): the size the demuxer found, before decoding.
    check_pixels(path, stage, stream.codec_context.name.upper(), stream.codec_context.width,
                  stream.codec_context.height)
    try:
        frame = next(container.decode(stream), None)
    except av.FFmpegError as e:
        raise InputError(path, stage, f"the image does not decode ({why(e)}): truncated or damaged?") from e
    if frame is None:
        raise InputError(path, stage, "the image holds no decodable picture") from CorruptVideo()
    return stream, frame


def image_orientation(path: str, frame: av.VideoFrame) -> tuple[int, bool, int | None]:
    """(quarter turns counter-clockwise, mirrored, the EXIF tag or None): the file's EXIF orientation where it has
    one (PyAV cannot tell a mirror from a rotation, see latentcache.encode.decoding.image), else the rotation PyAV
    reports."""
    tag = image.exif_orientation(path)
    if tag is not None:
        turns, mirror = image.ORIENTATIONS[tag]
        return turns, mirror, tag
    return display_rotation(frame) // 90, False, None


def image_source_size(stream: av.video.stream.VideoStream, frame: av.VideoFrame, turns: int) -> tuple[int, int]:
    """(width, height) as displayed: non-square pixels stretched, then turned."""
    shown_w = displayed_width(frame.width, sample_aspect(stream))
    return (frame.height, shown_w) if turns % 2 else (shown_w, frame.height)


def decode_image(container: av.container.InputContainer, path: str, size: int, clip: ClipSettings, *,
                 key: str = "") -> Clip:
    """A still image -> a 1-frame Clip [1, H, W, 3], resized and cropped (or fitted) like a video's frames.

    Always one frame, whatever `clip.frames` says: an image is planned into its own `1xHxW` bucket. The meta has the
    video clip's fields (a clip at 0 s with one frame) plus `source_kind: "image"` and the EXIF orientation."""
    stream, frame = image_frame(container, path, "decode")
    turns, mirror, tag = image_orientation(path, frame)
    src_w, src_h = image_source_size(stream, frame, turns)
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
