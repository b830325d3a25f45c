"""Object storage (`s3://bucket/prefix`, the schemes in OBJECT_SCHEMES): reading inputs and shards, writing an output.

Inputs are never downloaded whole: `open_object` hands PyAV (or a tar reader) a seekable file object whose reads are
HTTP range requests, so a probe reads the container's header and a clip reads the packets it decodes. Whether a
container needs more than that is up to its layout (see docs/storage.md).

An output in object storage has no rename. It does not need one: a single PUT is atomic (an object exists whole or
not at all), so every file is built in memory and PUT once, and "done" is still defined by the object written last
(a shard's sidecar after its shard, the manifest after every sidecar). `location.ObjectPath` is such an output's
location.

Credentials come from the standard chain (AWS_* environment variables, ~/.aws/config and credentials, instance
roles; AWS_ENDPOINT_URL for a non-AWS endpoint): no url, plan or manifest ever carries them.
"""

from __future__ import annotations

import logging
from typing import Any, BinaryIO

from latentcache.errors import MissingDependency
from latentcache.storage.trust import check_url

log = logging.getLogger(__name__)

# Whole-object reads (shards) larger than two parts are fetched as concurrent ranges of this size.
PART_SIZE = 8 << 20
# Range reads of this size: a probe costs one or two requests, a clip's packets a few, a shard one per 16 MiB.
BLOCK_SIZE = 16 << 20


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url`, with a clear error when its package is missing. Only what
    `trust.check_url` lets through is opened: urls reach here from list files and plans."""
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


def open_object(url: str) -> BinaryIO:
    """A seekable binary file object over the object at `url`, read with range requests (`location.open_url` is
    the opener the package calls)."""
    return _fs_open(url)


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
