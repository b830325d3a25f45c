"""Where a file is: a local path or an object in a store, told apart here and nowhere else.

A location is a `pathlib.Path` (a local file or folder) or an `ObjectPath` (an object in a store, `s3://bucket/key`,
with the part of pathlib the package uses). `resolve` picks one from a string once; the functions below do what
differs between the two (open, read with a limit, size, list, join, write atomically), so no module outside
storage/ asks which kind it holds.

Who a string comes from decides what it may name (storage/trust.py holds that rule): a string read from a file is
opened with `open_url(text, trusted=False)`, a local regular file or an object and nothing else; a url the user typed
(`LatentShardDataset("pipe:...")`, `latentcache verify https://...`) is theirs, like a shell command, and
`open_url(text, trusted=True)` also hands it to webdataset's gopen.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from latentcache.errors import ConfigError
from latentcache.storage import store
from latentcache.storage.store import filesystem, join
from latentcache.storage.trust import (
    UnsupportedUrl,
    check_url,
    is_object_url,
    is_url,
    local_path,
    open_regular,
    opener,
    typed,
)


def in_object_store(location: Any) -> bool:
    """True for a location in object storage: an `ObjectPath`, or a url whose scheme fsspec serves here (s3://...).
    Plain paths and file:// are local."""
    return isinstance(location, ObjectPath) or is_object_url(str(location))


# ------------------------------------------------------------------------------------------------ opening


def open_url(url: str, *, trusted: bool = True) -> BinaryIO:
    """The one opener of a url or path, as a binary stream.

    A local regular file is opened directly (a FIFO or device is refused, never waited on); an object in a store
    (s3://...) is a seekable file object over range requests, whose `name` is the url (PyAV takes a container's
    format guess from it). `trusted` (the user typed it): file:// is a local file, and any other url goes to
    webdataset's gopen (http, pipe:...). Untrusted (read from a file): every other url is refused (UnsupportedUrl)
    and a string that is no url is a local path, whatever it looks like (`pipe:cmd` is a file of that name).
    Trusted by default for the public `latentcache.dataset.open_url(url)`; inside the package every call says."""
    how, name = opener(url, trusted=trusted)  # the trust rule: storage/trust.py
    if how == "local":
        return open_regular(name, url)
    if how == "object":
        f = store.open_object(url)
        f.name = url
        return f
    import webdataset as wds

    return wds.gopen(url, "rb")


# ------------------------------------------------------------------------------------------ locations


class ObjectPath:
    """The part of pathlib.Path the writer uses (`out / name`, is_file, read_text, stat, unlink...), over object
    storage, so `--out s3://bucket/latents` runs the same pipeline code as a local directory.

    It is deliberately not os.PathLike: a call to open() or os.replace() on it fails loudly instead of writing a
    local file named "s3:/...". Writes go through `write_bytes`, one PUT each (see `atomic_writer`).
    Directories do not exist in object storage: mkdir and rmdir do nothing, a "directory" exists while an object
    lies under it.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    # -------- names
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: ObjectPath) -> bool:
        return self.url < other.url

    def __truediv__(self, relpath: str | os.PathLike) -> ObjectPath:
        return ObjectPath(join(self.url, os.fspath(relpath).replace(os.sep, "/")))

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.url.rsplit("/", 1)[0])

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.url.split("/"))

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def relative_to(self, other: ObjectPath | str) -> PurePosixPath:
        base = str(other).rstrip("/") + "/"
        if not self.url.startswith(base):
            raise ValueError(f"{self.url} is not under {other}")
        return PurePosixPath(self.url[len(base):])

    def resolve(self) -> ObjectPath:
        return self

    # -------- the server
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

    def iterdir(self) -> list[ObjectPath]:
        fs, key = filesystem(self.url)
        fs.invalidate_cache(key)
        try:
            names = fs.ls(key, detail=False)
        except FileNotFoundError:
            return []
        return sorted(self / n.rstrip("/").rsplit("/", 1)[-1] for n in names)

    def rglob(self, pattern: str) -> list[ObjectPath]:
        fs, key = filesystem(self.url)
        fs.invalidate_cache(key)
        try:
            found = fs.find(key)
        except FileNotFoundError:
            return []
        return sorted(self / p[len(key) + 1:] for p in found if fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern))

    def glob(self, pattern: str) -> list[ObjectPath]:
        return [p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern)]

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to make: object storage has no directories."""

    def rmdir(self) -> None:
        """Nothing to remove: a "directory" goes away with its last object."""

    def open(self, mode: str = "rb") -> BinaryIO:
        if mode != "rb":
            raise ValueError(f"{self.url}: object storage is written whole with write_bytes, not opened as {mode!r}")
        return open_url(self.url, trusted=False)

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


# A file or folder, local or in an object store: what every module that reads or writes an output holds.
Location = Path | ObjectPath


def resolve(text: str | os.PathLike | ObjectPath) -> Location:
    """The location a string the user typed names: an ObjectPath for an object-store url, a Path otherwise (a file
    url as the path it names, `typed`). A url of another scheme (http://, a '::' chain) is refused (UnsupportedUrl):
    only `open_url` with `trusted` opens those. A location passes through as it is."""
    if isinstance(text, Path | ObjectPath):
        return text
    text = typed(os.fspath(text))  # file:///x is /x (`typed`): never a folder named `file:`
    if not is_url(text):
        return Path(text)
    check_url(str(text))
    return ObjectPath(str(text))


def output_location(text: str | os.PathLike) -> Location:
    """An output location (--out): refused as a usage error when it is a url of no object store (http://...),
    before anything is planned."""
    try:
        return resolve(text)
    except UnsupportedUrl as e:
        raise ConfigError(f"--out {e}") from None


def argument(text: str) -> Path | str:
    """A folder or file argument the user typed: a local Path (a file url as the path it names, `typed`), or a url
    kept as text (Path() would fold its '//'), for the reader that opens it."""
    text = typed(text)  # file:///x is /x
    return text if is_url(text) else Path(text)


def identity(spelling: str) -> str:
    """What a spelling of a location resolves to: the real path (links and `./` resolved) of a local one, the url
    without repeated or trailing slashes of a remote one (`s3://b/out/` and `s3://b//out` are one)."""
    spelling = typed(spelling)  # file:///x is /x
    if is_url(spelling):
        scheme, rest = spelling.split("://", 1)
        return f"{scheme.lower()}://" + "/".join(part for part in rest.split("/") if part not in ("", "."))
    return os.path.realpath(spelling)


def object_url(text: Any) -> str | None:
    """`text` as the url of an object or prefix in a store (`s3://bucket/latents`, trailing slashes dropped), None
    when it names no such thing (a local path, http, a list of paths)."""
    return text.rstrip("/") if isinstance(text, str) and in_object_store(text) else None


def url_name(text: str) -> str | None:
    """What follows the scheme of a url (`s3://b/v/a.mp4` -> `b/v/a.mp4`), None for a local path."""
    return text.split("://", 1)[1] if "://" in text else None


def expand_pattern(url: str) -> list[str]:
    """The urls one url names once a local glob (`shards/*.tar`) is expanded: its matches, sorted (none when it
    matches nothing); file:// is a local path. Matches are local files: one whose name reads as a url (`pipe:x.tar`,
    a stranger's file name) is kept local by a ./ prefix, so it can never be handed to gopen as a command."""
    local = local_path(url)
    if local is None or not glob.has_magic(local):
        return [local if local is not None else url]
    return [m if _reads_as_path(m) else os.path.join(".", m) for m in sorted(glob.glob(local))]


def _reads_as_path(name: str) -> bool:
    """Whether a local file's name, handed on as a url, reads as that file: not a url, not `pipe:`, not `file:`."""
    return name[:5].lower() != "file:" and local_path(name) == name


# ----------------------------------------------------------------------------------- reading and writing


def read(location: str | Location, limit: int | None = None, *, size: int | None = None) -> bytes:
    """The file's bytes: all, or at most limit + 1 (so a caller can tell "more than limit"). A local one must be a
    regular file (see `open_regular`); an object costs the requests its real size needs (see `store.read_url`;
    `size`: what storage just said it holds)."""
    if is_url(location):  # an object (any other url is refused: UnsupportedUrl)
        return store.read_url(str(location), limit, size=size)
    with open_regular(location, str(location)) as f:
        return f.read() if limit is None else f.read(limit + 1)


def size(location: str | Location) -> int:
    """The file's size in bytes (one HEAD for an object). FileNotFoundError when there is none."""
    if is_url(location):  # an object (any other url is refused: UnsupportedUrl)
        return store.url_size(str(location))
    return os.path.getsize(location)


def local(text: str | os.PathLike | ObjectPath) -> Path | None:
    """The local path `text` (a location the user typed) names, None for a url (an object store's, read through it,
    or one of another scheme, refused when it is opened or listed). A file url names the path `typed` gives."""
    if isinstance(text, ObjectPath):
        return None
    text = typed(os.fspath(text))
    return None if is_url(text) else Path(text)


def local_size(url: str) -> int | None:
    """The size of a local file, asked of no server: None for a url (an object's size costs a request). OSError
    when the file cannot be stat'ed."""
    return None if is_url(url) else os.stat(url).st_size


def files_under(location: str | Location, suffix: str = "") -> list[str] | None:
    """Every file under the folder `location` whose name ends in `suffix`, as names relative to it, sorted; None
    when there is no such folder (an object prefix always exists: it lists no object then)."""
    if in_object_store(location):
        fs, key = filesystem(str(location).rstrip("/"))
        fs.invalidate_cache(key)  # never answer from a listing made before another writer's PUT
        return sorted(p[len(key) + 1:] for p in fs.find(key) if p.endswith(suffix))
    root = Path(location)
    if not root.is_dir():
        return None
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(f"*{suffix}"))


# What differs between the two kinds, asked by what a caller does with the answer:


def renames_into_place(location: Location) -> bool:
    """Whether a file written at `location` goes through a temporary name and a rename, so that a killed writer
    may leave a temporary behind (a local file), or is one atomic PUT (an object: `atomic_writer`)."""
    return not in_object_store(location)


def has_folders(location: Location) -> bool:
    """Whether folders exist at `location` on their own, and stay once emptied (locally), or only while an object
    lies under them (object storage: nothing to remove)."""
    return not in_object_store(location)


def linkable(location: Location) -> bool:
    """Whether a symbolic link can point at files under `location` (a local folder; not an object store)."""
    return not in_object_store(location)


def read_whole_first(location: Location) -> bool:
    """Whether a file there is best read into memory with one request and checked there (an object: every range
    read is a request), rather than streamed from where it is (a local file)."""
    return in_object_store(location)


@contextlib.contextmanager
def atomic_writer(path: Location, tmp_name: Callable[[Path], Path]) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: readers see the old file or the new one, never half.

    Locally: written under `tmp_name(path)`, fsynced, renamed into place when the block ends without an error (a
    failed write leaves its temporary, which its owner removes before writing again). In object storage: built
    in memory and PUT once, which gives the same guarantee (a PUT is atomic, and there is no rename)."""
    if in_object_store(path):
        buffer = io.BytesIO()
        yield buffer
        path.write_bytes(buffer.getbuffer())
        return
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TooLarge(Exception):
    """Storage says the file holds more bytes than the reader may take (`read_whole`)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def read_whole(url: str, limit: int, buffer: bytearray | None = None) -> memoryview | bytes:
    """At most limit + 1 bytes of the file at `url`, opened as `open_url(url, trusted=True)` does (a url the user
    typed, or one already checked as the root's own file: `own_file_problem`).

    Where storage tells the size before the read (a local file's fstat, an object's HEAD) a file larger than
    `limit` raises TooLarge before a byte is read, and no request asks for more than the object holds; a stream
    (gopen) tells its size only once it ends. A local file is read straight into `buffer` when one is given (grown
    as needed): a reader going through many files then reuses one warm buffer instead of faulting in fresh pages
    for every one (6x faster here)."""
    if in_object_store(url):
        size = store.url_size(url)
        if size > limit:
            raise TooLarge(size)
        return store.read_url(url, limit, size=size)
    with open_url(url, trusted=True) as stream:
        if local_path(url) is None:  # a remote stream: its size is known only once it ends
            return _read_chunks(stream, limit + 1)
        size = os.fstat(stream.fileno()).st_size
        if size > limit:
            raise TooLarge(size)
        # A byte past the size fstat gave says the file grew since: more than the limit, or not.
        return _read_into(stream, size + 1, buffer)


def _read_into(stream: Any, most: int, buffer: bytearray | None) -> memoryview | bytes:
    if buffer is None:
        return stream.read(most)
    try:
        if len(buffer) < most:
            buffer += bytes(most - len(buffer))
    except BufferError:  # still exported by a reader of an earlier file: use a buffer of its own
        return stream.read(most)
    view, got = memoryview(buffer)[:most], 0
    while got < most:
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return view[:got]


def _read_chunks(stream: Any, most: int) -> bytes:
    chunks, total = [], 0
    while total < most:
        chunk = stream.read(min(64 << 20, most - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_ahead(items: list[Any], url_of: Callable[[Any], str], fetch: Callable[[Any], Any], ahead: int
               ) -> Iterator[tuple[Any, Any]]:
    """(item, fetch(item) or None), in order. Items in object storage are fetched `ahead` in threads, so a reader
    works on one while the next arrive (storage answers in tens of ms); local ones are read where they are used
    (None)."""
    if not any(in_object_store(url_of(item)) for item in items):
        yield from ((item, None) for item in items)
        return
    from concurrent.futures import ThreadPoolExecutor

    def get(item: Any) -> Any:
        return fetch(item) if in_object_store(url_of(item)) else None

    with ThreadPoolExecutor(ahead, thread_name_prefix="latentcache-prefetch") as pool:
        pending = [pool.submit(get, item) for item in items[:ahead]]
        try:
            for i, item in enumerate(items):
                data = pending.pop(0).result()
                if i + ahead < len(items):
                    pending.append(pool.submit(get, items[i + ahead]))
                yield item, data
        finally:
            for future in pending:  # a reader that stops early (a break, a closed generator) fetches no more
                future.cancel()
