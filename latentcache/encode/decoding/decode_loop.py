"""The one demux/decode loop of a clip: packet by packet, so that one bad packet is recorded (`integrity`) and decoded
around instead of ending the clip; non-reference frames that no target time shows are left undecoded (`Skipper`);
an NVDEC decoder where one is asked for and this FFmpeg has it.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator

import av

from latentcache.encode.decoding.integrity import Decoded, Integrity, MatroskaCRC
from latentcache.encode.decoding.video_file import since_start, why
from latentcache.errors import InputError

log = logging.getLogger(__name__)


# Consecutive packets that fail to decode before the file is given up on (one bad packet is decoded around).
_MAX_BAD_PACKETS = 32


def decoded_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream, t0: float,
                    integrity: Integrity, path: str, preroll_until: float | None = None,
                    codec: av.CodecContext | None = None, skipper: Skipper | None = None) -> Iterator[Decoded]:
    """Decode packet by packet, so that one bad packet is recorded and decoded around instead of ending the clip.

    Packets shown before `preroll_until` are only decoded as far as later frames need them: the decoder skips
    non-reference frames (most B-frames) there, which no frame of the clip can depend on.
    """
    decoded, bad_in_row = 0, 0
    packets = container.demux(stream) if skipper is None else skipper.wrap(container.demux(stream))
    ctx = codec if codec is not None else stream.codec_context
    # Set on every pass: a pass that ended in preroll (a missed seek) must not leave frames skipped for the next.
    ctx.skip_frame = "NONREF" if preroll_until is not None else "DEFAULT"
    crc = MatroskaCRC(path) if container.format.name.startswith("matroska") else None
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            integrity.finished()
            return
        except av.FFmpegError as e:
            # The demuxer cannot go on (truncated or garbled container): what was decoded so far still counts.
            integrity.damage(None, f"the container breaks off ({why(e)})")
            log.debug("%s: demuxing stopped after %d frames: %s", path, decoded, e)
            return
        packet_t = since_start(packet.pts, packet.time_base, stream, t0) if packet.pts is not None else None
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
            integrity.damage(packet_t, f"a packet does not decode ({why(e)})")
            if bad_in_row > _MAX_BAD_PACKETS:
                raise InputError(path, "decode", f"{bad_in_row} packets in a row do not decode after {decoded} "
                                 f"good frames ({why(e)})") from e
            continue
        for frame in frames:
            if codec is not None and frame.pts is not None:
                frame.time_base = stream.time_base  # a standalone decoder does not know the stream's time base
            t = (since_start(frame.pts, frame.time_base, stream, t0) if frame.pts is not None and frame.time_base
                 else decoded * integrity.period)
            decoded += 1
            yield integrity.check(t, frame)


# Decoders that apply skip_frame to the packet sent with it, also with frame threads, and mark non-reference frames
# in the bitstream (H.264 nal_ref_idc, HEVC's sub-layer non-reference NAL types). Others decode every frame.
SKIP_CODECS = {"h264", "hevc"}


# How far `Skipper` reads ahead of the decoder for a packet's successor; beyond it, the packet is decoded.
_LOOKAHEAD_PACKETS = 64


class Skipper:
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
        return None if ts is None else since_start(ts, packet.time_base, self.stream, self.t0)

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
        _log_once(f"NVDEC {name} is unavailable here ({why(e)}); decoding on the CPU")
        return None
    log.debug("%s: decoding with %s", path, name)
    return ctx


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info(message)
