"""How a decode sees damage it would otherwise pass on: decoder errors and swallowed packets taint frames until the next
clean keyframe (`Integrity`), Matroska cluster CRC-32s are checked (`MatroskaCRC`), and HEVC and VP9 clips are
decoded a second time with a differently built decoder and compared (`second_opinion`).

`decode_loop` drives `Integrity` and `MatroskaCRC` from its one demux/decode loop; `Decoded` is each frame's
verdict, which `frames` takes or refuses."""

from __future__ import annotations

import bisect
import contextlib
import logging
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from latentcache.encode.decoding.video_file import why
from latentcache.storage import sources

log = logging.getLogger(__name__)


SEEK_START = "decoding started between keyframes"


class Integrity:
    """Whether the decoder's output can be trusted right now.

    Damage (a packet the demuxer flags corrupt, a packet the decoder rejects, a hole in the timestamps of a stream
    container) taints every frame after it until the next keyframe: decoders conceal errors by predicting from
    broken references, so the frames look plausible but are garbage, and nothing flags them.
    """

    def __init__(self, period: float, *, detect_holes: bool, after_seek: bool) -> None:
        self.period = period
        self.detect_holes = detect_holes
        # After a seek, frames are only trusted from the first keyframe on.
        self.reason: str | None = SEEK_START if after_seek else None
        self.tainted_from = float("-inf")  # frames shown from here on are not trusted...
        self.clean_after = float("-inf")  # ...until a keyframe shown after the latest damage
        self.last_t: float | None = None
        # Recent frame intervals: the stream's real period, even where the header's frame rate is wrong (interlaced
        # material often announces the field rate).
        self.intervals: deque[float] = deque(maxlen=9)
        # Times of the packets sent to the decoder whose frames have not come out yet, sorted.
        self.pending: list[float] = []
        self.damage_seen = False  # any damage at all in this pass, even where a keyframe has cleared it since

    @property
    def typical(self) -> float:
        return float(np.median(self.intervals)) if len(self.intervals) >= 3 else self.period

    def damage(self, t: float | None, reason: str) -> None:
        """Damage found at `t` (a packet's time, None when unknown): every frame the decoder returns from now on is
        suspect until a keyframe shown after the damage."""
        self.damage_seen = True
        if t is None:
            t = self.last_t if self.last_t is not None else 0.0
        # Frame threading reports a packet's error a few packets late, and a B-frame shown before a damaged P-frame
        # predicts from it: so the taint starts right after the last frame returned, not at the reporting packet.
        start = min(t, self.last_t + 1e-6) if self.last_t is not None else float("-inf")
        if self.reason is None:
            self.reason, self.tainted_from = reason, start
        else:
            self.tainted_from = min(self.tainted_from, start)
        self.clean_after = max(self.clean_after, t)

    def sent(self, t: float | None) -> None:
        """A packet shown at `t` went to the decoder (not skipped): a frame shown at `t` must come out."""
        if t is not None and (self.last_t is None or t > self.last_t + 1e-6):
            bisect.insort(self.pending, t)

    def _lost_before(self, t: float) -> float | None:
        """The time of a packet sent but never returned as a frame, shown before `t`; None when there is none."""
        lost = None
        while self.pending and self.pending[0] < t - 1e-6:
            p = self.pending.pop(0)
            if self.last_t is not None and p > self.last_t + 1e-6 and lost is None:
                lost = p
        while self.pending and self.pending[0] <= t + 1e-6:
            self.pending.pop(0)  # this frame's own packet
        return lost

    def finished(self) -> None:
        """The stream ended: packets after the last frame that never came out are frames the decoder dropped."""
        if self.last_t is not None and self.pending and self.pending[-1] > self.last_t + 1e-6:
            self.damage(self.last_t, f"the decoder returned no frame for the packet at {self.pending[-1]:.3f}s "
                        "(it dropped a damaged frame)")

    def check(self, t: float, frame: av.VideoFrame) -> Decoded:
        """Updates the state with a decoded frame and says whether it is intact and whether frames are missing
        right before it."""
        hole_from = None
        lost = self._lost_before(t)
        if lost is not None and self.last_t is not None and t - self.last_t > 1.5 * self.typical:
            # A packet the container holds between two frames, and no frame for it: the decoder dropped a damaged
            # frame (dav1d and libvpx do so without an error). A gap with no packet in it is the file's own timing.
            hole_from = self.last_t + self.typical
            self.damage(self.last_t, f"the decoder returned no frame for the packet at {lost:.3f}s "
                        "(it dropped a damaged frame)")
        if self.detect_holes and self.last_t is not None and t > self.last_t:
            interval, typical = t - self.last_t, self.typical
            if interval > 1.5 * typical:
                hole_from = self.last_t + typical
                self.damage(self.last_t, f"frames missing: no frame between {self.last_t:.3f}s and {t:.3f}s "
                            f"(the stream's frame period is {typical:.3f}s)")
            else:
                self.intervals.append(interval)
        if self.last_t is None or t > self.last_t:
            self.last_t = t
        if frame.key_frame and not frame.is_corrupt and t >= self.clean_after:
            self.reason = None
        damaged = None
        if frame.is_corrupt:
            damaged = "the decoder flagged the frame as corrupt"
        elif t >= self.tainted_from:
            # Frame threading and B-frame reordering deliver frames shown before the damage after it: intact.
            damaged = self.reason
        return Decoded(t, frame, damaged, hole_from)


@dataclass(slots=True)
class Decoded:
    t: float  # seconds from the stream start
    frame: av.VideoFrame
    damaged: str | None  # why this frame is not intact, None when it is
    hole_from: float | None = None  # frames are missing from here up to this frame (stream containers only)


class MatroskaCRC:
    """Checks the CRC-32 that Matroska muxers (FFmpeg's mkv muxer by default) put at the head of each cluster.

    FFmpeg's demuxer does not check cluster CRCs, and VP9/AV1 decoders decode damaged data without a word, so this
    is the one check that sees damage inside their frames. Only the clusters holding the clip's packets are read.
    """

    _SEGMENT, _CLUSTER, _CRC32 = 0x18538067, 0x1F43B675, 0xBF

    def __init__(self, path: str) -> None:
        self.path = path
        self.clusters: list[tuple[int, int]] = []  # (start, end) of each cluster's data, in file order
        self.verdicts: dict[int, bool] = {}
        self.next_pos: int | None = None  # where the next level-1 element starts; None: no more to read
        self._remote: Any = None  # one file object for an object-storage url: no new HEAD request per packet
        try:
            with self._handle() as f:
                pos = 0
                for _ in range(2):  # the EBML header, then the Segment, whose children are read lazily
                    element, size, data = self._element(f, pos)
                    if element == self._SEGMENT:
                        self.next_pos = data
                        break
                    if size is None:
                        break
                    pos = data + size
        except OSError as e:
            log.debug("%s: no Matroska CRC check (%s)", path, why(e))

    def _handle(self) -> Any:
        if not sources.reopens_cheaply(self.path):
            if self._remote is None:
                self._remote = sources.open_source(self.path)
            return contextlib.nullcontext(self._remote)
        return sources.open_source(self.path)

    @staticmethod
    def _vint(f, pos: int, strip: bool) -> tuple[int | None, int]:
        f.seek(pos)
        first = f.read(1)
        if not first or first[0] == 0:
            raise OSError("not an EBML element")
        length = 9 - first[0].bit_length()
        raw = first + f.read(length - 1)
        value = int.from_bytes(raw, "big")
        if strip:
            value &= (1 << (7 * length)) - 1
            if value == (1 << (7 * length)) - 1:
                return None, pos + length  # unknown size (a live stream)
        return value, pos + length

    def _element(self, f, pos: int) -> tuple[int | None, int | None, int]:
        element, pos = self._vint(f, pos, strip=False)
        size, pos = self._vint(f, pos, strip=True)
        return element, size, pos

    def _read_until(self, f, pos: int) -> None:
        while self.next_pos is not None and (not self.clusters or self.clusters[-1][1] <= pos):
            element, size, data = self._element(f, self.next_pos)
            if size is None:
                self.next_pos = None  # unknown-size elements: nothing to check from here on
                return
            if element == self._CLUSTER:
                self.clusters.append((data, data + size))
            self.next_pos = data + size

    def intact(self, pos: int) -> bool:
        """False when the cluster holding byte `pos` carries a CRC-32 that does not match its data."""
        try:
            with self._handle() as f:
                self._read_until(f, pos)
                i = bisect.bisect_right(self.clusters, (pos, float("inf"))) - 1
                if i < 0 or not self.clusters[i][0] <= pos < self.clusters[i][1]:
                    return True
                if i not in self.verdicts:
                    self.verdicts[i] = self._check(f, *self.clusters[i])
                return self.verdicts[i]
        except (OSError, ValueError) as e:
            log.debug("%s: Matroska CRC check stopped (%s)", self.path, e)
            self.next_pos = None
            return True

    def _check(self, f, start: int, end: int) -> bool:
        element, size, data = self._element(f, start)
        if element != self._CRC32 or size != 4:
            return True  # this muxer wrote no CRC
        f.seek(data)
        stored = int.from_bytes(f.read(4), "little")
        return zlib.crc32(f.read(end - data - 4)) == stored
