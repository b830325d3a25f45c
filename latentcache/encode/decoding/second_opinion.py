"""The second decode of codecs whose FFmpeg decoder conceals damage and reports nothing (`SECOND_OPINION`): the
clip's frames are decoded again by a differently built decoder and compared with the first decode; a clip where they
differ is dropped as CorruptVideo. `--decode-check off` leaves this out.
"""

from __future__ import annotations

from typing import Any

import av
import numpy as np

from latentcache.encode.decoding.decode_loop import SKIP_CODECS
from latentcache.encode.decoding.frames import ClipBuilder, Converter
from latentcache.encode.decoding.video_file import CorruptVideo, open_video, since_start, stream_start
from latentcache.errors import InputError

# Codecs whose FFmpeg decoder conceals damage and reports nothing, and the differently built decode that is compared
# with the first one. Both are exact on an intact stream; on a damaged one they part ways:
# - hevc: slice threads decode each CTU row from its WPP entry point (the offset the slice header gives), the frame-
#   threaded decoder carries on from wherever the previous row's arithmetic decoder stopped. Damage that desyncs a
#   row shows as a difference. (Streams without entry points, or damage in the last row, are not caught.)
# - vp9: libvpx notices when a tile's arithmetic decoder reads past the tile's end and drops the frame (FFmpeg's
#   own decoder reads on silently); both are bit-exact on every frame they do decode.
SECOND_OPINION = {"hevc": "slice-threads", "vp9": "libvpx-vp9"}


def _second_decoder(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Any:
    """The other decoder of `SECOND_OPINION`: a codec context with a `decode(packet)` method."""
    kind = SECOND_OPINION[stream.codec_context.name]
    if kind == "slice-threads":
        stream.thread_type = "SLICE"
        stream.codec_context.thread_count = 2  # WPP needs two threads or more; more cost their start-up
        return stream.codec_context
    ctx = av.CodecContext.create(kind, "r")
    ctx.extradata = stream.codec_context.extradata
    ctx.thread_count = 1
    ctx.open()
    return ctx


def check_second_opinion(path: str, index: int, builder: ClipBuilder, *, skip: bool = True) -> None:
    """Decode the clip again with `SECOND_OPINION`'s decoder and compare the frames taken; CorruptVideo if any differs
    or does not decode."""
    wanted = sorted(set(builder.times))
    start = builder.start
    for seek in (start > 0, False):
        with open_video(path, "decode") as container:
            stream = container.streams[index]
            t0 = stream_start(stream)
            if seek:
                try:
                    container.seek(int((t0 + start) / stream.time_base), stream=stream, backward=True)
                except (av.FFmpegError, OSError):
                    continue
            ctx = _second_decoder(container, stream)
            found = _frames_at(container, stream, ctx, t0, wanted, builder,
                               skip=skip and ctx is stream.codec_context and stream.codec_context.name in SKIP_CODECS)
        if found is not None:
            break
    else:
        found = 0
    if found < len(wanted):
        raise InputError(path, "decode", f"corrupt video inside the clip {start:.3f}-{builder.targets[-1]:.3f}s: "
                         f"{SECOND_OPINION[stream.codec_context.name]} decode differs from the first decode "
                         f"(only {found} of {len(wanted)} frames agree): the stream is damaged; clip dropped") \
            from CorruptVideo()


def _frames_at(container: av.container.InputContainer, stream: av.video.stream.VideoStream, ctx: Any, t0: float,
               wanted: list[float], builder: ClipBuilder, *, skip: bool = False) -> int | None:
    """How many of the frames shown at `wanted` decode to what `builder` holds; None when the decode started after
    the first of them (a seek that missed).

    With `skip` (slice threads: skip_frame applies to the packet sent), packets not shown at a wanted time are sent
    with skip_frame NONREF: the wanted frames and their references decode as in a full decode."""
    wanted_set = set(wanted)
    convert = Converter(builder.clip, builder.convert.sar, builder.path)
    # A standalone decoder's frames lack the stream's display matrix: take the first decode's geometry as it is.
    convert.geometry, convert.rotation = builder.convert.geometry, builder.convert.rotation
    agree, first = 0, True
    try:
        for packet in container.demux(stream):
            if skip:
                shown = (round(since_start(packet.pts, packet.time_base, stream, t0), 6)
                         if packet.pts is not None else None)
                ctx.skip_frame = "NONREF" if shown is not None and shown not in wanted_set else "DEFAULT"
            try:
                frames = ctx.decode(packet) if ctx is not stream.codec_context else packet.decode()
            except av.FFmpegError:
                continue  # the frame is missing from what follows: counted as a disagreement
            for frame in frames:
                if frame.pts is None:
                    continue
                t = round(since_start(frame.pts, frame.time_base or stream.time_base, stream, t0), 6)
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
