"""Where an input's bytes come from: a local file, or a member of a webdataset tar read in place.

A source is named by one string, so it travels through the plan, the inputs files and the decode workers as a path:

- `/data/videos/a.mp4`: a local file;
- `/data/shards/00003.tar::000031.mp4`: member `000031.mp4` of a tar (video2dataset's layout), decoded straight from
  the tar's bytes (no extraction): `open_source` returns a file object restricted to the member's byte range.

- `s3://bucket/videos/a.mp4`: an object in a store, read with range requests (`location.open_url`).

`open_source(path)` and `source_size(path)` dispatch on that form; `ffmpeg_name` says when FFmpeg can open the path
itself (its own file protocol is faster than Python-level reads).
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from latentcache.storage.location import is_url, open_url, size
from latentcache.storage.store import filesystem
from latentcache.storage.trust import TAR_SEP, member_problem, split_tar_path


class UnsafeMember(OSError):
    """A tar member that is not a plain file with a plain relative name: a link, a device, `/abs` or `../x`."""


class MemberNotFound(FileNotFoundError):
    """The tar holds no member of that name (the tar was replaced since it was listed?)."""


def tar_member_path(tar: str | os.PathLike, member: str) -> str:
    return f"{os.fspath(tar)}{TAR_SEP}{member}"


def ffmpeg_name(path: str) -> str | None:
    """The name FFmpeg opens a plain local file by (`file:PATH`: FFmpeg reads a bare name's `xxx:` prefix as a
    protocol, `pipe:`, `concat:`, `http:`..., and paths come from lists, plans and tars that may be a stranger's;
    its own file protocol is faster than Python-level reads); None for a source read through `open_source` (a tar
    member, an object)."""
    return "file:" + path if split_tar_path(path) is None and "://" not in path else None


def reopens_cheaply(path: str) -> bool:
    """Whether opening the source again costs only a system call (a local file, a tar member), not a request (an
    object: a HEAD each time), so a reader that seeks back and forth may reopen it instead of keeping it open."""
    return not is_url(path)


def object_stat(path: str) -> dict[str, Any] | None:
    """What an object is now (size and ETag, or modification time where the store has no ETag), from one HEAD;
    None for a source that is no object (a local file, a tar member). FileNotFoundError when it is gone."""
    if split_tar_path(path) is not None or not is_url(path):
        return None
    fs, key = filesystem(path)
    fs.invalidate_cache(key)  # another writer's PUT since this process listed the prefix
    info = fs.info(key)
    etag = info.get("ETag") or info.get("etag")
    if etag is not None:
        return {"size": int(info["size"]), "etag": str(etag)}
    modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    return {"size": int(info["size"]), "modified": None if modified is None else str(modified)}


def local_source(path: str) -> Path | None:
    """The local file of a source that is one (a folder's file, a list's row), for what lies beside it (its
    caption sidecar); None for a tar member or an object."""
    return Path(path) if split_tar_path(path) is None and "://" not in path else None


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
    if is_url(path):
        # object storage: range requests through fsspec, no download; a url read from a file opens nothing else
        return open_url(path, trusted=False)
    return open(path, "rb")  # noqa: SIM115 (the caller closes it)


def source_size(path: str) -> int:
    """The source's size in bytes. Raises OSError as open_source does."""
    if split_tar_path(path) is not None:
        return _member(path)[1].size
    return size(path)
