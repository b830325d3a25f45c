"""Still images as 1-frame inputs (`--images`): which files are images, and how their EXIF orientation is shown.

Decoding itself goes through PyAV like a video (probing.probe_image / still_image.decode_image); this module only holds
what needs no decoder, so that plan and decode can both use it without importing each other.

EXIF orientation: FFmpeg exports it as a display matrix, but PyAV only reports that matrix's rotation angle (and
its side-data list fails on FFmpeg 8's EXIF entry), which cannot tell a mirrored picture (orientations 2, 4, 5, 7:
front cameras) from a rotated one: orientation 2 reads as 180 degrees. So the orientation tag is read here, from the
file's own EXIF block (JPEG APP1, PNG eXIf, WebP EXIF), and applied exactly; without a tag, PyAV's rotation is used.
That block is read through `sources.open_source`, like every other read of an input's bytes, so an image in object
storage or inside a tar is oriented exactly as the same file on disk.

Decoded size: a picture's width and height are read from its header (`image_size`) before anything decodes it, and
one over MAX_IMAGE_PIXELS is refused: a 16000x16000 PNG of 746 KB would otherwise take ~1 GB to decode.
"""

from __future__ import annotations

import logging
import os
import struct

import numpy as np

from latentcache.storage import sources

log = logging.getLogger(__name__)

# What directory discovery lets through with --images (without it they are thumbnails, never probed). Any other
# file is probed as a video, and a still image found that way is taken too: the decision is by content.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

# EXIF orientation -> (quarter turns counter-clockwise as np.rot90 counts them, then a left-right mirror): the
# transform that shows the stored pixels upright (checked against Pillow's ImageOps.exif_transpose in the tests).
ORIENTATIONS: dict[int, tuple[int, bool]] = {
    1: (0, False), 2: (0, True), 3: (2, False), 4: (2, True),
    5: (3, True), 6: (3, False), 7: (1, True), 8: (1, False),
}
_EXIF_TAG_ORIENTATION = 0x0112
# Bounds for walking a file's segments or chunks: metadata lives near the start (or, in WebP, in a few chunks).
_MAX_SEGMENTS = 256
_MAX_EXIF_BYTES = 1 << 20
# The most pixels (width x height) a still image may have: 100 megapixels (10000x10000, ~300 MB as RGB; phones
# and cameras take up to ~50). Checked from the header before decoding; FFmpeg's own limit is ~268 megapixels.
MAX_IMAGE_PIXELS = 100_000_000


def orient(rgb: np.ndarray, quarter_turns: int, mirror: bool) -> np.ndarray:
    """The stored picture [H, W, 3] as displayed: rotated counter-clockwise, then mirrored left-right."""
    if quarter_turns:
        rgb = np.rot90(rgb, k=quarter_turns)
    if mirror:
        rgb = rgb[:, ::-1]
    return rgb


def exif_orientation(path: str | os.PathLike) -> int | None:
    """The EXIF orientation tag (1-8) of a JPEG, PNG or WebP source (a file, an object-store url or a tar member,
    read through `sources.open_source`); None when it has none or it cannot be read."""
    try:
        with sources.open_source(os.fspath(path)) as f:
            head = f.read(12)
            if head[:2] == b"\xff\xd8":
                block = _jpeg_exif(f)
            elif head[:8] == b"\x89PNG\r\n\x1a\n":
                block = _png_exif(f)
            elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                block = _webp_exif(f)
            else:
                return None
    except (OSError, struct.error) as e:
        log.debug("%s: EXIF not read (%s)", path, e)
        return None
    return _tiff_orientation(block) if block else None


def image_size(f) -> tuple[str, int, int] | None:
    """(kind, width, height) from a PNG, JPEG, WebP, GIF or BMP header, as stored (before any EXIF turn); None for
    anything else or a header that does not say. Reads a few bytes from the start of `f` (JPEG: the segments before
    its frame header); `f` is left at an undefined position."""
    head = f.read(30)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return "PNG", width, height
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = head[12:16]
        if kind == b"VP8X":  # 24-bit canvas size minus one
            return "WebP", 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
        if kind == b"VP8L" and head[20] == 0x2F:  # 14-bit sizes minus one
            bits = int.from_bytes(head[21:25], "little")
            return "WebP", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # 14-bit sizes after the key frame's start code
            width, height = struct.unpack("<HH", head[26:30])
            return "WebP", width & 0x3FFF, height & 0x3FFF
        return None
    if head[:6] in (b"GIF87a", b"GIF89a"):  # the logical screen every frame is drawn on
        width, height = struct.unpack("<HH", head[6:10])
        return "GIF", width, height
    if head[:2] == b"BM" and len(head) >= 26:  # BITMAPINFOHEADER and later; a negative height is top-down
        width, height = struct.unpack("<ii", head[18:26])
        return "BMP", abs(width), abs(height)
    if head[:2] == b"\xff\xd8":
        f.seek(2)
        for _ in range(_MAX_SEGMENTS):
            marker = f.read(2)
            if len(marker) < 2 or marker[0] != 0xFF or marker[1] in (0xDA, 0xD9):
                return None
            (length,) = struct.unpack(">H", f.read(2))
            # SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC): the frame header, height before width.
            if 0xC0 <= marker[1] <= 0xCF and marker[1] not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">xHH", f.read(5))
                return "JPEG", width, height
            f.seek(length - 2, os.SEEK_CUR)
    return None


def _jpeg_exif(f) -> bytes | None:
    f.seek(2)
    for _ in range(_MAX_SEGMENTS):
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] in (0xDA, 0xD9):  # start of scan, end of image
            return None
        (length,) = struct.unpack(">H", f.read(2))
        if marker[1] == 0xE1:  # APP1: EXIF (or XMP, which starts otherwise)
            data = f.read(min(length - 2, _MAX_EXIF_BYTES))
            if data.startswith(b"Exif\x00\x00"):
                return data[6:]
        else:
            f.seek(length - 2, os.SEEK_CUR)
    return None


def _png_exif(f) -> bytes | None:
    f.seek(8)
    for _ in range(_MAX_SEGMENTS):
        header = f.read(8)
        if len(header) < 8:
            return None
        length, kind = struct.unpack(">I4s", header)
        if kind == b"eXIf":
            return f.read(min(length, _MAX_EXIF_BYTES))
        if kind == b"IEND":
            return None
        f.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return None


def _webp_exif(f) -> bytes | None:
    f.seek(12)
    for _ in range(_MAX_SEGMENTS):
        header = f.read(8)
        if len(header) < 8:
            return None
        kind, length = struct.unpack("<4sI", header)
        if kind == b"EXIF":
            data = f.read(min(length, _MAX_EXIF_BYTES))
            return data[6:] if data.startswith(b"Exif\x00\x00") else data
        f.seek(length + (length & 1), os.SEEK_CUR)  # chunks are padded to an even size
    return None


def _tiff_orientation(data: bytes) -> int | None:
    """The orientation entry of IFD0 in a TIFF-structured EXIF block."""
    if len(data) < 8 or data[:2] not in (b"II", b"MM"):
        return None
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    if ifd + 2 > len(data):
        return None
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    for i in range(count):
        at = ifd + 2 + 12 * i
        if at + 12 > len(data):
            return None
        tag, kind = struct.unpack(order + "HH", data[at : at + 4])
        if tag == _EXIF_TAG_ORIENTATION and kind == 3:  # a SHORT, stored in the entry itself
            (value,) = struct.unpack(order + "H", data[at + 8 : at + 10])
            return value if value in ORIENTATIONS else None
    return None
