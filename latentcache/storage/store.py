"""Object storage (`s3://bucket/prefix`, the schemes in OBJECT_SCHEMES): reading inputs and shards, writing an output.

Inputs are never downloaded whole: `open_url` hands PyAV (or a tar reader) a seekable file object whose reads are
HTTP range requests, so a probe reads the container's header and a clip reads the packets it decodes. Whether a
container needs more than that is up to its layout (see docs/storage.md).

An output in object storage has no rename. It does not need one: a single PUT is atomic (an object exists whole or
not at all), so every file is built in memory and PUT once, and "done" is still defined by the object written last
(a shard's sidecar after its shard, the manifest after every sidecar).

Credentials come from the standard chain (AWS_* environment variables, ~/.aws/config and credentials, instance
roles; AWS_ENDPOINT_URL for a non-AWS endpoint): no url, plan or manifest ever carries them.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from latentcache.errors import ConfigError, MissingDependency

log = logging.getLogger(__name__)

# Schemes read through fsspec (every other url is refused by `filesystem`). http(s) and pipe: shard urls that a user
# types are opened by webdataset's gopen (shard_sources.open_url); strings read from files never reach it.
OBJECT_SCHEMES = frozenset({"s3", "gs", "gcs", "az", "abfs", "memory"})
# Whole-object reads (shards) larger than two parts are fetched as concurrent ranges of this size.
PART_SIZE = 8 << 20
# Range reads of this size: a probe costs one or two requests, a clip's packets a few, a shard one per 16 MiB.
BLOCK_SIZE = 16 << 20


def is_url(path: str | os.PathLike) -> bool:
    """True for object-storage urls (s3://, gs://, memory://...); plain paths and file:// are local."""
    text = path if isinstance(path, str) else str(path)  # str(), not fspath(): UrlPath is not os.PathLike
    return "://" in text and not text.startswith("file://")


def in_object_store(location: Any) -> bool:
    """True for a location in object storage: a `UrlPath` (an output there), or a url whose scheme fsspec serves
    here (s3://...). The one test of it; plain paths and file:// are local."""
    if isinstance(location, UrlPath):
        return True
    text = str(location)
    return "://" in text and text.split("://", 1)[0] in OBJECT_SCHEMES


class UnsupportedUrl(OSError):
    """A url latentcache does not open: not object storage, or one that asks fsspec to chain openers."""


def check_url(url: str) -> None:
    """Raises UnsupportedUrl unless `url` is an object-storage url fsspec may open (see `filesystem`)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in OBJECT_SCHEMES or "::" in url:
        raise UnsupportedUrl(f"{url}: not an object-storage url latentcache reads (schemes: "
                             f"{', '.join(sorted(OBJECT_SCHEMES))}; no '::' chains); refused, nothing was opened")


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url`, with a clear error when its package is missing.

    Only object-storage schemes (OBJECT_SCHEMES) are opened, and never a chained url (`simplecache::s3://...`,
    `zip://x::s3://...`): urls reach here from list files and plans, and fsspec would otherwise open anything it
    has a driver for (http, ftp, ssh, github, local files through `file::`) wherever such a string names it."""
    check_url(url)
    try:
        import fsspec
    except ImportError:
        raise MissingDependency(f"{url}: object storage needs fsspec and s3fs: pip install 'latentcache[s3]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise MissingDependency(f"{url}: {e}; for s3:// urls: pip install 'latentcache[s3]'") from None


# What a HEAD request just said (decode asks the size, then opens): opening with it saves the HEAD that s3fs makes
# before its first range read. Bounded; a stale entry only matters for an object replaced mid-run (its ranged reads
# then fail on the ETag, loudly).
_INFOS: dict[str, dict[str, Any]] = {}
_MAX_INFOS = 4096


def _fs_open(url: str, block_size: int = BLOCK_SIZE) -> BinaryIO:
    fs, path = filesystem(url)
    info = _INFOS.get(url)
    # "readahead": sequential reads (a demuxer, a tar) are served from one block per request; a seek outside it
    # (an mp4 moov atom at the end) costs one more range request, not a download.
    f = fs.open(path, "rb", block_size=block_size, cache_type="readahead",
                **({"size": int(info["size"])} if info is not None else {}))
    if info is not None and hasattr(type(f), "details"):
        f.details = info
    return f


def open_url(url: str) -> BinaryIO:
    """A seekable binary file object over the object at `url`, read with range requests. Its `name` is the url:
    PyAV takes a container's name (and its format guess) from it."""
    f = _fs_open(url)
    f.name = url
    return f


def url_size(url: str) -> int:
    """The object's size in bytes (one HEAD request). FileNotFoundError when there is none."""
    fs, path = filesystem(url)
    info = fs.info(path)
    if len(_INFOS) >= _MAX_INFOS:
        _INFOS.clear()
    _INFOS[url] = info
    return int(info["size"])


def read_url(url: str, limit: int | None = None, *, size: int | None = None) -> bytes:
    """The whole object (at most limit + 1 bytes, so a caller can tell "more than limit").

    With a limit, every request is bounded by what storage says the object holds (one HEAD, unless the caller
    passes the `size` it just asked for), never by the limit alone: a limit read from a stranger's file (a
    manifest claiming 2**40 bytes for a 0.5 MB shard) must cost the requests the real object needs, not 131,072
    ranged GETs or a list of 2**37 part offsets."""
    fs, path = filesystem(url)
    if limit is None:
        return fs.cat_file(path)
    want = min(url_size(url) if size is None else size, limit + 1)
    if want <= 0:
        return b""
    if want > 2 * PART_SIZE:
        # A shard of many MB: parts fetched concurrently (one connection to S3 gives ~100 MB/s, several give more).
        starts = list(range(0, want, PART_SIZE))
        ends = [min(s + PART_SIZE, want) for s in starts]
        try:
            parts = fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise")
            return b"".join(parts)
        except (OSError, ValueError):
            pass  # the object shrank since the HEAD (replaced mid-read): one GET tells how long it is now
    return fs.cat_file(path, start=0, end=want)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def list_files(url: str) -> list[str]:
    """Every object under the prefix `url`, as full urls, sorted."""
    fs, path = filesystem(url)
    protocol = url.split("://", 1)[0]
    fs.invalidate_cache(path)
    return sorted(f"{protocol}://{p}" for p in fs.find(path))


# ----------------------------------------------------------------------------------------------- output


class UrlPath:
    """The part of pathlib.Path the writer uses (`out / name`, is_file, read_text, stat, unlink...), over object
    storage, so `--out s3://bucket/latents` runs the same pipeline code as a local directory.

    It is deliberately not os.PathLike: a call to open() or os.replace() on it fails loudly instead of writing a
    local file named "s3:/...". Writes go through `write_bytes`, one PUT each (see `shards.write_text_atomic`).
    Directories do not exist in object storage: mkdir and rmdir do nothing, a "directory" exists while an object
    lies under it.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    # -------- names
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: UrlPath) -> bool:
        return self.url < other.url

    def __truediv__(self, relpath: str | os.PathLike) -> UrlPath:
        return UrlPath(join(self.url, os.fspath(relpath).replace(os.sep, "/")))

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1]

    @property
    def parent(self) -> UrlPath:
        return UrlPath(self.url.rsplit("/", 1)[0])

    def with_name(self, name: str) -> UrlPath:
        return self.parent / name

    def relative_to(self, other: UrlPath | str) -> PurePosixPath:
        base = str(other).rstrip("/") + "/"
        if not self.url.startswith(base):
            raise ValueError(f"{self.url} is not under {other}")
        return PurePosixPath(self.url[len(base):])

    def resolve(self) -> UrlPath:
        return self

    # -------- the server
    @property
    def _fs(self) -> Any:
        return filesystem(self.url)[0]

    @property
    def _key(self) -> str:
        return filesystem(self.url)[1]

    def _info(self) -> dict[str, Any] | None:
        fs, key = filesystem(self.url)
        fs.invalidate_cache(key)  # never answer from a listing made before another writer's PUT
        try:
            return fs.info(key)
        except FileNotFoundError:
            return None

    def is_file(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") == "file"

    def is_dir(self) -> bool:
        fs, key = filesystem(self.url)
        fs.invalidate_cache(key)
        try:
            return bool(fs.ls(key, detail=False)) and not self.is_file()
        except FileNotFoundError:
            return False

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def stat(self) -> os.stat_result:
        info = self._info()
        if info is None:
            raise FileNotFoundError(self.url)
        modified = info.get("LastModified")
        mtime = modified.timestamp() if hasattr(modified, "timestamp") else 0.0
        # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime)
        return os.stat_result((0o100644, 0, 0, 1, 0, 0, int(info["size"]), mtime, mtime, mtime))

    def iterdir(self) -> list[UrlPath]:
        fs, key = filesystem(self.url)
        fs.invalidate_cache(key)
        try:
            names = fs.ls(key, detail=False)
        except FileNotFoundError:
            return []
        return sorted(self / n.rstrip("/").rsplit("/", 1)[-1] for n in names)

    def rglob(self, pattern: str) -> list[UrlPath]:
        fs, key = filesystem(self.url)
        fs.invalidate_cache(key)
        try:
            found = fs.find(key)
        except FileNotFoundError:
            return []
        return sorted(self / p[len(key) + 1:] for p in found if fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern))

    def glob(self, pattern: str) -> list[UrlPath]:
        return [p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern)]

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to make: object storage has no directories."""

    def rmdir(self) -> None:
        """Nothing to remove: a "directory" goes away with its last object."""

    def open(self, mode: str = "rb") -> BinaryIO:
        if mode != "rb":
            raise ValueError(f"{self.url}: object storage is written whole with write_bytes, not opened as {mode!r}")
        return open_url(self.url)

    def read_bytes(self) -> bytes:
        fs, key = filesystem(self.url)
        return fs.cat_file(key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One PUT: the object appears whole or not at all (the S3 API has no partial writes, and no rename)."""
        fs, key = filesystem(self.url)
        fs.pipe_file(key, bytes(data))
        fs.invalidate_cache(key)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        fs, key = filesystem(self.url)
        try:
            fs.rm_file(key)
        except FileNotFoundError:
            if not missing_ok:
                raise
        fs.invalidate_cache(key)


def as_path(text: str | os.PathLike) -> Any:
    """An output location: UrlPath for an object-storage url, pathlib.Path otherwise. Another url (http://...) is
    refused here, as a usage error, before anything is planned."""
    if not is_url(text):
        return Path(text)
    try:
        check_url(str(text))
    except UnsupportedUrl as e:
        raise ConfigError(f"--out {e}") from None
    return UrlPath(str(text))
