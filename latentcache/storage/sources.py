"""Where an input's bytes come from: a local file, or a member of a webdataset tar read in place.

A source is named by one string, so it travels through the plan, the inputs files and the decode workers as a path:

- `/data/videos/a.mp4`: a local file;
- `/data/shards/00003.tar::000031.mp4`: member `000031.mp4` of a tar (video2dataset's layout), decoded straight from
  the tar's bytes (no extraction): `open_source` returns a file object restricted to the member's byte range.

`open_source(path)` and `source_size(path)` dispatch on that form; another kind (an object store's `s3://...`) adds
one branch to each. `is_local` says when FFmpeg can open the path itself (its own file protocol is faster than
Python-level reads).
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
from dataclasses import dataclass
from typing import BinaryIO

from latentcache.storage import store

# Separates a tar's path from a member's name: "shards/00003.tar::000031.mp4".
TAR_SEP = "::"
TAR_MARK = ".tar" + TAR_SEP


class UnsafeMember(OSError):
    """A tar member that is not a plain file with a plain relative name: a link, a device, `/abs` or `../x`."""


class MemberNotFound(FileNotFoundError):
    """The tar holds no member of that name (the tar was replaced since it was listed?)."""


def tar_member_path(tar: str | os.PathLike, member: str) -> str:
    return f"{os.fspath(tar)}{TAR_SEP}{member}"


def split_tar_path(path: str) -> tuple[str, str] | None:
    """'/d/x.tar::a/b.mp4' -> ('/d/x.tar', 'a/b.mp4'); None for a path that names no tar member."""
    i = path.find(TAR_MARK)
    if i < 0:
        return None
    cut = i + len(".tar")
    return path[:cut], path[cut + len(TAR_SEP):]


def is_local(path: str) -> bool:
    """A plain file FFmpeg can open by name."""
    return split_tar_path(path) is None and "://" not in path


def member_problem(info: tarfile.TarInfo) -> str | None:
    """Why a tar member cannot be an input (see shards.check_member_name for the name rule), or None."""
    name = info.name.replace("\\", "/")
    if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute or parent-relative name"
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.issparse():
        kind = "a link" if info.issym() or info.islnk() else "a directory" if info.isdir() else \
            "a device, fifo or sparse file"
        return f"is {kind}, not a regular file"
    return None


@dataclass(slots=True, frozen=True)
class _Member:
    offset: int  # where the member's data starts in the tar
    size: int
    problem: str | None


@functools.lru_cache(maxsize=256)
def _index(tar: str, size: int, mtime_ns: int) -> dict[str, _Member]:
    """Member name -> where its bytes are. Cached per (tar, size, mtime): a tar replaced on disk is read again.

    Reads only the headers (tarfile seeks past the data). A member listed twice keeps its last entry, as tar's
    own extraction does."""
    found: dict[str, _Member] = {}
    with tarfile.open(tar, mode="r:") as t:
        try:
            for info in t:
                found[info.name] = _Member(info.offset_data, info.size, member_problem(info))
        except tarfile.ReadError:
            pass  # a tar cut short: the members before the break are still readable
    return found


def _member(path: str) -> tuple[str, _Member]:
    tar, name = split_tar_path(path)  # type: ignore[misc]
    st = os.stat(tar)
    try:
        entry = _index(os.path.abspath(tar), st.st_size, st.st_mtime_ns).get(name)
    except tarfile.TarError as e:
        raise OSError(f"{tar} is not a readable tar ({e})") from e
    if entry is None:
        raise MemberNotFound(f"{tar} holds no member {name!r}")
    if entry.problem:
        raise UnsafeMember(f"tar member {name!r} of {tar} {entry.problem}; refused")
    if entry.offset + entry.size > st.st_size:
        raise OSError(f"tar member {name!r} of {tar} claims bytes {entry.offset}..{entry.offset + entry.size}, the "
                      f"tar holds {st.st_size}: it was cut short")
    return tar, entry


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of bytes [offset, offset + size) of a file: a tar member without extracting it.

    Positions are relative to the member's start, so a demuxer (and the Matroska CRC check, which reads by the
    demuxer's packet positions) sees exactly the member's file."""

    def __init__(self, raw: BinaryIO, offset: int, size: int, name: str = "") -> None:
        super().__init__()
        self._raw, self._offset, self._size, self._pos = raw, offset, size, 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        if base + pos < 0:
            raise OSError(f"seek to {base + pos}, before the start of {self.name}")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        self._raw.seek(self._offset + self._pos)
        got = self._raw.readinto(memoryview(buffer)[:n])
        self._pos += got or 0
        return got or 0

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def open_source(path: str) -> BinaryIO:
    """A binary, seekable file object of the source's bytes. Raises OSError (FileNotFoundError, UnsafeMember, ...)
    whose message names the file."""
    if split_tar_path(path) is not None:
        tar, entry = _member(path)
        raw = open(tar, "rb")  # noqa: SIM115 (closed with the RangeFile)
        # Buffered: PyAV asks for its buffer size, the CRC check for a few bytes at a time.
        return io.BufferedReader(RangeFile(raw, entry.offset, entry.size, path), buffer_size=1 << 16)
    if store.is_url(path):
        return store.open_url(path)  # object storage: range requests through fsspec, no download
    return open(path, "rb")  # noqa: SIM115 (the caller closes it)


def source_size(path: str) -> int:
    """The source's size in bytes. Raises OSError as open_source does."""
    if split_tar_path(path) is not None:
        return _member(path)[1].size
    if store.is_url(path):
        return store.url_size(path)
    return os.path.getsize(path)
