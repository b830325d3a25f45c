"""Stage 1: video file -> uint8 RGB frames of one clip, chosen by presentation time.

Frames are picked by timestamps, not by index, so a 60 fps, a 24 fps and a variable-frame-rate source sampled at
`fps=8` give the same wall-clock spacing. Resizing happens in swscale (`VideoFrame.reformat`) on the frames that
are actually taken, so a 4K source is never held or upscaled at full resolution in numpy or torch.

Damaged files are the norm in scraped corpora. A clip is only returned when every frame in it is intact: a corrupt
packet, a decoder error or a hole in the timestamps taints the decoder's output until the next keyframe, and a clip
that would use a tainted frame, or repeat a frame across a hole, is dropped with the reason (`InputError`).
The damage checks themselves are `integrity`'s.

The pieces: `video_file` opens the file and finds its video stream, `decode_loop` demuxes and decodes it packet by
packet, `frames` picks and converts the frames of the clip, `still_image` decodes a picture (--images) and
`second_opinion` decodes HEVC and VP9 clips again to compare. Probing is `probing`'s.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from typing import Any

import av
import numpy as np

from latentcache.encode.decoding.decode_loop import SKIP_CODECS, Skipper, decoded_frames, nvdec_context
from latentcache.encode.decoding.frames import Clip, ClipBuilder
from latentcache.encode.decoding.integrity import SEEK_START, Decoded, Integrity
from latentcache.encode.decoding.second_opinion import SECOND_OPINION, check_second_opinion
from latentcache.encode.decoding.still_image import decode_image
from latentcache.encode.decoding.video_file import (
    CorruptVideo,
    TruncatedVideo,
    file_size,
    frame_period,
    is_still_image,
    open_video,
    sample_aspect,
    stream_start,
    video_stream,
    why,
)
from latentcache.encode.settings import DECODE_CHECKS, ClipSettings
from latentcache.errors import InputError

log = logging.getLogger(__name__)


# Stream containers, where a hole in the timestamps means lost packets. In indexed containers (mp4, mkv, webm, avi,
# gif) a hole is the file's own variable frame rate (a held frame) and the frame is repeated as the file says.
_LOSSY_TIMING_FORMATS = {"mpegts", "mpegtsraw", "mpeg", "mpegvideo", "h264", "hevc", "flv", "rtp", "rtsp"}


# Make the decoder report bitstream errors instead of concealing them: H.264 otherwise turns a damaged frame into a
# plausible-looking smear with no flag on the frame. (VP9, AV1 and HEVC conceal without telling either way.)
_DECODER_OPTIONS = {"err_detect": "aggressive+explode"}


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

    Non-reference frames that no target time shows are not decoded (`Skipper`); `exhaustive=True` decodes every
    frame from the seek point, the reference the tests compare with. `check="off"` (--decode-check off) leaves out
    the second decode of `SECOND_OPINION` codecs, for corpora the user trusts; "auto" runs it.
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
    size = file_size(path, "decode")
    with open_video(path, "decode") as container:
        if clip.images and is_still_image(container):
            return decode_image(container, path, size, clip, key=key)
        stream = video_stream(container, path, "decode")
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        stream.codec_context.options = dict(_DECODER_OPTIONS)
        period = frame_period(stream)
        detect_holes = bool(set(container.format.name.split(",")) & _LOSSY_TIMING_FORMATS)
        codec = nvdec_context(stream, path) if nvdec else None
        # Skipping frames needs exact per-packet control: decoders that take skip_frame per packet (frame threads copy
        # it when the packet is submitted), not NVDEC's queue, and not stream containers, where skipped frames would
        # read as holes.
        skip = not exhaustive and codec is None and not detect_holes and stream.codec_context.name in SKIP_CODECS
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
                                 f"the stream cannot seek back to its start ({why(e)})") from e
            if codec is not None:
                codec.flush_buffers()
            run.skip = False  # the rare path (no usable index): decoded in full, as before
            builder, last = run.decode(seek=False)
        padded = _finish(builder, last, run.integrity, _announced_duration(container, stream))
        if check == "auto" and stream.codec_context.name in SECOND_OPINION and builder.times:
            check_second_opinion(path, stream.index, builder, skip=not exhaustive)
    meta = _meta(builder, path, size, period, padded) | {"frames_decoded": run.frames_decoded}
    return Clip(key=key, frames=builder.frames, meta=meta)


def _redo(run: _Run, container: av.container.InputContainer, stream: av.video.stream.VideoStream, start: float,
          codec: av.CodecContext | None) -> tuple[ClipBuilder, Decoded | None]:
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


class _SeekMissed(Exception):
    """The seek landed after the clip start or between keyframes: decode from the start of the file instead."""


class _Run:
    """One pass of decoding forward, from a seek point or from the start of the file."""

    def __init__(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: str,
                 start: float, clip: ClipSettings, period: float, detect_holes: bool,
                 codec: av.CodecContext | None = None, *, skip: bool = False, out: np.ndarray | None = None) -> None:
        self.container, self.stream, self.path, self.codec = container, stream, path, codec
        self.out = out
        self.start, self.clip, self.period, self.detect_holes = start, clip, period, detect_holes
        self.integrity = Integrity(period, detect_holes=detect_holes, after_seek=False)
        self.frames_decoded = 0  # over every pass: what the clip cost, to show that seeking works
        self.skip = skip  # skip non-reference frames no target shows (`Skipper`)
        self.skipped = 0  # packets skipped that way, over every pass

    def decode(self, *, seek: bool) -> tuple[ClipBuilder, Decoded | None]:
        """Takes the clip's frames; raises _SeekMissed when the seek landed somewhere the clip cannot start."""
        t0 = stream_start(self.stream)
        if seek:
            try:
                # backward=True lands on the keyframe at or before the clip start where the container has an index.
                self.container.seek(int((t0 + self.start) / self.stream.time_base), stream=self.stream,
                                    backward=True)
            except (av.FFmpegError, OSError) as e:
                # Raw elementary streams cannot seek: decode from where the freshly opened file stands, its start.
                log.debug("%s: cannot seek (%s); decoding from the start", self.path, why(e))
                seek = False
            if seek and self.codec is not None:
                self.codec.flush_buffers()  # seek flushes the stream's own decoder only
        builder = ClipBuilder(self.path, self.start, self.clip, self.period, sample_aspect(self.stream), self.out)
        self.integrity = integrity = Integrity(self.period, detect_holes=self.detect_holes, after_seek=seek)
        prev: Decoded | None = None
        try:
            # Skipping frames would open holes in the timestamps, which stream containers read as lost packets.
            # A second of margin covers B-frame reordering around the clip start.
            # Only where the decoder applies skip_frame to the packet sent with it (`SKIP_CODECS`): libdav1d, for
            # one, applies it frames late, and dropped a frame of the clip, which then read as damage.
            preroll = (seek and not self.detect_holes and self.codec is None
                       and self.stream.codec_context.name in SKIP_CODECS)
            preroll_until = self.start - 1.0 if preroll else None
            skipper = Skipper(builder.targets, self.stream, t0) if self.skip else None
            for d in decoded_frames(self.container, self.stream, t0, integrity, self.path, preroll_until,
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
            if seek and integrity.reason == SEEK_START:
                raise _SeekMissed() from None
            raise
        finally:
            if skipper is not None:
                self.skipped += skipper.skipped
        if seek and prev is None:
            raise _SeekMissed()
        return builder, prev


def _finish(builder: ClipBuilder, last: Decoded | None, integrity: Integrity, announced: float | None) -> int:
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
        return container.duration / av.time_base - max(stream_start(stream), 0.0)
    return None


def _meta(builder: ClipBuilder, path: str, size: int, period: float, padded: int) -> dict[str, Any]:
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
