"""What a path may name, by who wrote it: the one home of the rule for strangers' paths.

A string read from a file (a list's row, a plan, a manifest, a tar: possibly a stranger's) names a local file or an
object in a store, and nothing else:

- a url only of an object store (OBJECT_SCHEMES), never a chain of openers (`simplecache::s3://...`): `check_url`;
- never a command or a web address for webdataset's gopen (`pipe:`, `http:`): only a url the user typed goes there,
  `opener(url, trusted=True)`;
- a local file only when it is a regular file (a FIFO would block the reader, a device never ends): `open_regular`;
- a tar member only when it is a plain file with a plain relative name (no link, device, `/abs` or `../x`):
  `member_problem`;
- a file an output's own index names (a manifest's shard) only as a plain relative name under that output's root,
  reached without a symbolic link: `plain_relative`, `own_file_problem`;
- an input a plan names (a plan may be a stranger's too) only as an absolute local path, a member of a tar at one, or
  an s3:// object: `openable_from_file`.

A string read from a file that spells `file:///x` is a local path of that spelling, never the file /x. A string the
user typed (a command-line path, a dataset url) may be a file url: `typed` says which local path it names, one rule
for every argument.

Every opener in storage/ applies these; no other module decides them.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
from typing import Any, BinaryIO, Literal

from latentcache.errors import ConfigError, ShardFormatError

# Schemes read through fsspec (every other url is refused by `check_url`). http(s) and pipe: shard urls that a user
# types are opened by webdataset's gopen (`opener`); strings read from files never reach it.
OBJECT_SCHEMES = frozenset({"s3", "gs", "gcs", "az", "abfs", "memory"})

# Separates a tar's path from a member's name: "shards/00003.tar::000031.mp4".
TAR_SEP = "::"
TAR_MARK = ".tar" + TAR_SEP


class UnsupportedUrl(OSError):
    """A url latentcache does not open: not object storage, or one that asks fsspec to chain openers."""


def is_url(path: Any) -> bool:
    """True for urls (s3://, gs://, memory://, http://...); plain paths and file:// are local."""
    text = path if isinstance(path, str) else str(path)  # str(), not fspath(): an ObjectPath is not os.PathLike
    return "://" in text and not text.startswith("file://")


def is_object_url(text: str) -> bool:
    """True for a url whose scheme fsspec serves here (s3://...)."""
    return "://" in text and text.split("://", 1)[0] in OBJECT_SCHEMES


def check_url(url: str) -> None:
    """Raises UnsupportedUrl unless `url` is an object-storage url fsspec may open.

    Only object-storage schemes (OBJECT_SCHEMES) are opened, and never a chained url (`simplecache::s3://...`,
    `zip://x::s3://...`): urls reach fsspec from list files and plans, and it would otherwise open anything it has a
    driver for (http, ftp, ssh, github, local files through `file::`) wherever such a string names it."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in OBJECT_SCHEMES or "::" in url:
        raise UnsupportedUrl(f"{url}: not an object-storage url latentcache reads (schemes: "
                             f"{', '.join(sorted(OBJECT_SCHEMES))}; no '::' chains); refused, nothing was opened")


# The hosts a file url may name: none (`file:///x`) or this machine's own name for itself (`file://localhost/x`).
_LOCAL_HOSTS = ("", "localhost")


def typed(text: str) -> str:
    """A location the user typed (a command-line path, a dataset url), with a file url turned into the local path it
    names: `file:///abs/x` and `file://localhost/abs/x` are `/abs/x` (as webdataset reads them). Any other spelling
    that starts with `file:` is refused (ConfigError naming it and why), never taken as a folder named `file:` in the
    current one; every other string is returned as it is."""
    if text[:5].lower() != "file:" or (text[5:6] == ":" and "://" in text):
        return text  # not a file url (`file::s3://...` is an fsspec chain: `check_url` refuses every one)
    if text[5:7] != "//":
        why = "a file url is file:///ABSOLUTE/PATH (three slashes)"
    else:
        host, slash, path = text[7:].partition("/")
        if host.lower() not in _LOCAL_HOSTS:
            why = f"it names a file on the host {host!r}; latentcache reads local files as file:///ABSOLUTE/PATH"
        elif not slash:
            why = "it names no path; a file url is file:///ABSOLUTE/PATH"
        elif any(c in path for c in "%?#"):
            why = ("percent-escapes, queries and fragments of a file url are not decoded here; give the plain path "
                   "instead")
        else:
            return "/" + path
    raise ConfigError(f"{text!r}: {why} (a local file whose name starts with 'file:' is given as ./NAME); refused, "
                      "nothing was opened or written")


def local_path(url: str) -> str | None:
    """The filesystem path a url the user typed names (a plain path, or a file url as `typed` reads it), None for
    the others (an object store's, http, pipe:...). Its spelling is webdataset's: `pipe:cmd` is a command."""
    if url[:5].lower() == "file:":
        return typed(url)
    if "://" in url or url.startswith("pipe:"):
        return None
    return url


def opener(url: str, *, trusted: bool) -> tuple[Literal["local", "object", "gopen"], str]:
    """(which opener, what it opens) for `url`. `trusted` (the user typed it): file:// is a local file and any url
    of no object store goes to webdataset's gopen (http, pipe:...). Untrusted (read from a file): a url is an object
    or refused (UnsupportedUrl), and a string that is no url is a local path, whatever it looks like (`pipe:cmd` is
    a file of that name)."""
    local = local_path(url) if trusted else (None if is_url(url) else url)
    if local is not None:
        return "local", local
    if is_object_url(url) or not trusted:
        check_url(url)
        return "object", url
    return "gopen", url


def open_regular(path: str | os.PathLike, where: str) -> BinaryIO:
    """Open a regular file for reading, refusing anything else (a FIFO would block forever, /dev/zero never ends).

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the type is then checked on
    the opened descriptor, so a file swapped between a check and the open cannot slip through.
    """
    # A missing or unreadable file stays an OSError (naming the path): the caller says what is incomplete.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise ShardFormatError(f"{where}: is {kind}; latentcache reads only regular files")
    return os.fdopen(fd, "rb")


def split_tar_path(path: str) -> tuple[str, str] | None:
    """'/d/x.tar::a/b.mp4' -> ('/d/x.tar', 'a/b.mp4'); None for a path that names no tar member."""
    i = path.find(TAR_MARK)
    if i < 0:
        return None
    cut = i + len(".tar")
    return path[:cut], path[cut + len(TAR_SEP):]


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


def openable_from_file(path: Any) -> bool:
    """Whether a source path read from a file (a plan a stranger may have written) may be opened at all: an
    absolute local path (or a member of a tar at one) or an s3:// object, no control characters; never another
    scheme (`pipe:`, `http:`, `concat:`)."""
    if not isinstance(path, str) or not path or any(ord(c) < 32 for c in path):
        return False
    if path.startswith("s3://"):
        return True
    split = split_tar_path(path)
    local = str(split[0]) if split else path
    return "://" not in path and ":" not in local and os.path.isabs(local)


# A path as latentcache writes it in an output's index (shards/17x64x96/000000.tar): "/"-separated names, none empty,
# "." or "..", none holding a colon (a url scheme such as pipe: or s3:, a drive letter), a backslash or a control
# character.
_PLAIN_RELATIVE = re.compile(r"(?:[^/\\:\x00-\x1f\x7f]+/)*[^/\\:\x00-\x1f\x7f]+")


def plain_relative(path: Any) -> bool:
    """Whether `path` (from a stranger's manifest) is a plain relative name that stays under the folder it is
    joined to: `/dev/zero`, `../../etc`, `pipe:cmd` or `https://...` are not."""
    # fullmatch: one C call per path; the split runs only for the rare path with a part starting with a dot.
    return (isinstance(path, str) and _PLAIN_RELATIVE.fullmatch(path) is not None
            and not ((path[0] == "." or "/." in path) and any(part in (".", "..") for part in path.split("/"))))


def own_file_problem(url: str, root: str | None, path: str) -> str | None:
    """Why `url` cannot be opened as the file `path` under `root` by latentcache's own reader (a file named by a
    stranger's file, a manifest), or None: it must be in the root's own object store, or a regular local file under
    the root reached without a symbolic link below it (a link to another output's shard would give that shard's
    samples twice when outputs are combined)."""
    if is_object_url(url):
        return None if root is not None and is_object_url(root) else "is not under the dataset's root"
    local = local_path(url)
    if local is None:  # cannot happen for a plain relative path under a root; refused all the same, never to gopen
        return "is not a local file or an object in the dataset's store"
    # Resolved at each read (a few lstat calls next to reading megabytes): a relative root follows the current folder.
    if os.path.realpath(local) != os.path.join(os.path.realpath(root or "."), path):
        return (f"is reached through a symbolic link (it resolves to {os.path.realpath(local)}); shards of an output "
                "must be regular files inside it: copy the file instead of linking it")
    return None
