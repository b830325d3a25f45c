"""Stage 1: video file -> uint8 RGB frames of one clip, chosen by presentation time.

Frames are picked by timestamps, not by index, so a 60 fps, a 24 fps and a variable-frame-rate source sampled at
`fps=8` give the same wall-clock spacing. Resizing happens in swscale (`VideoFrame.reformat`) on the frames that
are actually taken, so a 4K source is never held or upscaled at full resolution in numpy or torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from latentcache.errors import InputError
from latentcache.settings import ClipSettings

log = logging.getLogger(__name__)


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


@dataclass(slots=True)
class Clip:
    """One decoded clip: frames [T, H, W, 3] uint8 and the record of how they were taken."""

    key: str
    frames: np.ndarray
    meta: dict[str, Any]


def _open(path: str, stage: str) -> av.container.InputContainer:
    try:
        return av.open(path, metadata_errors="ignore")
    except FileNotFoundError as e:
        raise InputError(path, stage, "file not found (moved or deleted during the run?)") from e
    except PermissionError as e:
        raise InputError(path, stage, "permission denied") from e
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise InputError(path, stage, f"not a readable video container ({type(e).__name__}: {e})") from e


def _video_stream(container: av.container.InputContainer, path: str, stage: str) -> av.video.stream.VideoStream:
    # The first *video* stream: many files put audio first.
    for stream in container.streams.video:
        if stream.codec_context is not None and stream.codec_context.width > 0:
            return stream
    kinds = ", ".join(s.type for s in container.streams) or "none"
    raise InputError(path, stage, f"no video stream (streams found: {kinds})")


def _stream_start(stream: av.video.stream.VideoStream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _rotation(frame: av.VideoFrame) -> int:
    """Display-matrix rotation snapped to 0/90/180/270, counter-clockwise (np.rot90's direction)."""
    return int(round(frame.rotation / 90.0)) * 90 % 360


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read container metadata (one frame is decoded only to learn the rotation). Raises InputError."""
    path = str(path)
    with _open(path, "probe") as container:
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
            raise InputError(path, "probe", f"the first frame does not decode ({type(e).__name__}: {e})") from e
        if first is None:
            raise InputError(path, "probe", "the video stream holds no decodable frame")
        rotation = _rotation(first)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        if duration is None or duration <= 0:
            duration = _duration_by_demux(container, stream)
        if fps <= 0:
            fps = 25.0
        return VideoInfo(
            path=path,
            duration=duration,
            fps=fps,
            width=width,
            height=height,
            rotation=rotation,
            codec=stream.codec_context.name,
            size_bytes=os.path.getsize(path),
        )


def _duration_by_demux(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    """Last packet end time, for containers that do not store a duration (some gifs, raw streams)."""
    container.seek(0)
    start, end = None, 0.0
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        t = float(packet.pts * packet.time_base)
        start = t if start is None else min(start, t)
        end = max(end, t + float((packet.duration or 0) * packet.time_base))
    return end - (start or 0.0)


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
        # Round up for crop so the scaled frame always covers the target; down for fit so it always fits.
        rounder = np.ceil if mode == "crop" else np.floor
        sw = int(min(max(rounder(src_w * scale - 1e-6), 1), width if mode == "fit" else 1 << 30))
        sh = int(min(max(rounder(src_h * scale - 1e-6), 1), height if mode == "fit" else 1 << 30))
        if mode == "crop":
            sw, sh = max(sw, width), max(sh, height)
            box = ((sw - width) // 2, (sh - height) // 2, width, height)
        else:
            box = ((width - sw) // 2, (height - sh) // 2, sw, sh)
        return Geometry(sw, sh, box, mode, upscaled=scale > 1.0)

    def apply(self, rgb: np.ndarray, width: int, height: int) -> np.ndarray:
        x, y, w, h = self.box
        if self.mode == "crop":
            return np.ascontiguousarray(rgb[y : y + h, x : x + w])
        out = np.zeros((height, width, 3), np.uint8)
        out[y : y + h, x : x + w] = rgb
        return out


def target_times(start: float, clip: ClipSettings) -> list[float]:
    return [start + i / clip.fps for i in range(clip.frames)]


class _Converter:
    """Converts each picked frame once (a frame shown at two target times is converted once)."""

    def __init__(self, clip: ClipSettings) -> None:
        self.clip = clip
        self.geometry: Geometry | None = None
        self.rotation = 0
        self.source_size = (0, 0)
        self._last: tuple[av.VideoFrame, np.ndarray] | None = None

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self._last is not None and self._last[0] is frame:
            return self._last[1]
        if self.geometry is None:
            self.rotation = _rotation(frame)
            swap = self.rotation in (90, 270)
            self.source_size = (frame.height, frame.width) if swap else (frame.width, frame.height)
            self.geometry = Geometry.plan(*self.source_size, self.clip.width, self.clip.height, self.clip.resize)
        geo = self.geometry
        # swscale works on the stored (unrotated) frame, so ask it for the rotated-back size.
        out_w, out_h = (geo.scaled_h, geo.scaled_w) if self.rotation in (90, 270) else (geo.scaled_w, geo.scaled_h)
        interpolation = "BICUBIC" if geo.upscaled else "AREA"
        rgb = frame.reformat(width=out_w, height=out_h, format="rgb24", interpolation=interpolation).to_ndarray()
        if self.rotation:
            rgb = np.rot90(rgb, k=self.rotation // 90)
        out = geo.apply(rgb, self.clip.width, self.clip.height)
        self._last = (frame, out)
        return out


def decode_clip(path: str | os.PathLike, start: float, clip: ClipSettings, *, key: str = "") -> Clip:
    """Decode `clip.frames` frames starting `start` seconds after the stream start, at `clip.fps`.

    Seeks to the keyframe before `start` and decodes forward, so a clip late in a long file costs the same as an
    early one. Only the frames taken are converted, and at most two source frames are alive at once.
    Raises InputError (stage "decode") for unreadable or too-short videos.
    """
    path = str(path)
    targets = target_times(start, clip)
    frames = np.empty((clip.frames, clip.height, clip.width, 3), np.uint8)
    times: list[float] = []
    convert = _Converter(clip)
    with _open(path, "decode") as container:
        stream = _video_stream(container, path, "decode")
        stream.thread_type = "AUTO"
        t0 = _stream_start(stream)
        rate = stream.average_rate or stream.guessed_rate
        frame_period = 1.0 / float(rate) if rate else 1.0 / 25.0

        def take(t: float, frame: av.VideoFrame) -> None:
            frames[len(times)] = convert(frame)
            times.append(round(t, 6))

        def run(seek: bool) -> tuple[float, av.VideoFrame] | None:
            """Decode forward, taking frames; returns the last frame seen, None if the seek missed the clip."""
            if seek:
                # backward=True lands on the keyframe at or before the clip start (where the container has an
                # index); we decode forward from there.
                container.seek(int((t0 + start) / stream.time_base), stream=stream, backward=True)
            prev: tuple[float, av.VideoFrame] | None = None
            decoded = 0
            try:
                for frame in container.decode(stream):
                    t = (float(frame.time) - t0) if frame.time is not None else decoded * frame_period
                    decoded += 1
                    if prev is None and t > targets[0] + 1.5 * frame_period:
                        if seek:
                            return None
                        raise InputError(path, "decode", f"first decodable frame is at {t:.3f}s, after the clip "
                                         f"start {targets[0]:.3f}s")
                    if prev is not None and t <= prev[0]:
                        continue  # a repeated or out-of-order timestamp: keep the first frame shown at that time
                    while prev is not None and len(times) < clip.frames and targets[len(times)] < t:
                        take(*prev)
                    if len(times) >= clip.frames:
                        break
                    prev = (t, frame)
            except av.FFmpegError as e:
                raise InputError(path, "decode", f"decoding failed after {decoded} frames "
                                 f"({type(e).__name__}: {e})") from e
            return None if (seek and prev is None) else prev

        prev = run(seek=start > 0)
        if prev is None and start > 0:
            # Containers without a keyframe index (MPEG-TS, some AVIs) can land on a frame that does not decode;
            # decoding from the start is slow but right.
            log.debug("%s: seek to %.3fs missed the clip, decoding from the start", path, start)
            container.seek(0)
            prev = run(seek=False)
        if prev is None:
            raise InputError(path, "decode", f"no frame decoded at or after {start:.3f}s")
        if len(times) < clip.frames:
            last_t, last = prev
            shown_until = last_t + (float(last.duration * last.time_base) if last.duration else frame_period)
            while len(times) < clip.frames and targets[len(times)] < shown_until:
                take(*prev)
        padded = clip.frames - len(times)
        if padded:
            need = (clip.frames - 1) / clip.fps
            if clip.short != "pad":
                raise InputError(
                    path, "decode",
                    f"too short: {prev[0] - start:.2f}s of video from {start:.2f}s, a clip of {clip.frames} frames "
                    f"at {clip.fps:g} fps needs {need:.2f}s (use --short pad or fewer --frames)",
                    skipped=True,
                )
            frames[len(times):] = frames[len(times) - 1] if times else convert(prev[1])
    geo = convert.geometry
    src_w, src_h = convert.source_size
    meta = {
        "source": path,
        "source_size_bytes": Path(path).stat().st_size,
        "source_width": src_w,
        "source_height": src_h,
        "source_fps": round(1.0 / frame_period, 6),
        "clip_start": round(start, 6),
        "clip_end": round(start + (clip.frames - 1) / clip.fps, 6),
        "frame_times": times,
        "fps": clip.fps,
        "frames": clip.frames,
        "rotation_applied": convert.rotation,
        "resize": clip.resize,
        "scaled_size": [geo.scaled_w, geo.scaled_h],
        "box": list(geo.box),
        "upscaled": geo.upscaled,
        "padded_frames": padded,
    }
    if geo.upscaled:
        log.info("%s: %dx%d is smaller than %dx%d, upscaled", path, src_w, src_h, clip.width, clip.height)
    return Clip(key=key, frames=frames, meta=meta)
