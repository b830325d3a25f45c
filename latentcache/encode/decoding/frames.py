"""A clip's frames, picked by presentation time: the target times, the frame on screen at each (`ClipBuilder`), and
each picked frame converted once (`Converter`: resized in swscale, rotated, then cropped or padded as `Geometry`
plans) into the clip's uint8 array. `Clip` is what decoding returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from latentcache.encode.decoding.integrity import Decoded
from latentcache.encode.decoding.video_file import CorruptVideo, check_video_size, display_rotation, displayed_width
from latentcache.encode.settings import ClipSettings
from latentcache.errors import InputError


@dataclass(slots=True)
class Clip:
    """One decoded clip: frames [T, H, W, 3] uint8 and the record of how they were taken."""

    key: str
    frames: np.ndarray
    meta: dict[str, Any]


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


class Converter:
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
            check_video_size(self.path, "decode", frame.width, frame.height, "a frame")
            self._stored_size = (frame.width, frame.height)
        if self.geometry is None:
            self.rotation = display_rotation(frame)
            swap = self.rotation in (90, 270)
            # Geometry works on the picture as displayed: non-square pixels stretched, then rotated.
            shown_w = displayed_width(frame.width, self.sar)
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


def frames_in(out: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A view of the flat uint8 buffer `out` as frames of `shape`; ValueError when it cannot hold them."""
    need = int(np.prod(shape))
    if out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"a frame buffer is a flat, contiguous, writeable uint8 array, not {out.dtype} {out.shape}")
    if out.size < need:
        raise ValueError(f"a frame buffer of {out.size} bytes cannot hold {shape} frames ({need} bytes)")
    return out[:need].reshape(shape)


class ClipBuilder:
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
        self.convert = Converter(clip, sar, path)

    @property
    def done(self) -> bool:
        return len(self.times) >= self.clip.frames

    def next_target(self) -> float:
        return self.targets[len(self.times)]

    def take(self, d: Decoded) -> None:
        if d.damaged is not None:
            raise InputError(self.path, "decode", f"corrupt video at {d.t:.3f}s, inside the clip "
                             f"{self.start:.3f}-{self.targets[-1]:.3f}s: {d.damaged}; clip dropped") \
                from CorruptVideo()
        self.frames[len(self.times)] = self.convert(d.frame)
        self.times.append(round(d.t, 6))

    def fill_until(self, prev: Decoded, until: float, hole_from: float | None = None) -> None:
        """Take `prev` for every target before `until` (the next frame's time, or where `prev` stops showing)."""
        # A microsecond of slack: a frame whose time equals a target (up to rounding) is the one shown there.
        while not self.done and self.next_target() < until - 1e-6:
            if hole_from is not None and self.next_target() >= hole_from:
                # Taking `prev` here would repeat it in place of frames that were lost.
                raise InputError(self.path, "decode", f"frames missing inside the clip: none between {prev.t:.3f}s "
                                 f"and {until:.3f}s (the stream's frame period is {hole_from - prev.t:.3f}s); "
                                 "clip dropped rather than repeating a frame") from CorruptVideo()
            self.take(prev)
