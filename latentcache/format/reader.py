"""Reading a shard safely: a tar from a stranger, bounded and checked member by member, and its samples decoded into
tensors and JSON without ever unpickling or executing anything.

Every limit here (member sizes, header sizes, name lengths) turns a hostile tar into a `ShardFormatError` naming the
shard and member instead of an allocation or a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from safetensors.torch import load as load_safetensors

from latentcache.errors import ShardFormatError
from latentcache.format import strictjson
from latentcache.format.layout import IMAGE_TENSORS, KNOWN_MEMBERS, LATENTS, TEXT_EMBEDS
from latentcache.format.text import read_text
from latentcache.storage.trust import open_regular


def shown(value: Any, limit: int = 120) -> str:
    """repr(value) cut to `limit` characters: a crafted 50 MB name must not become a 50 MB error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_member_name(name: str) -> None:
    """Refuse absolute (`/x`, `C:x`) and parent-relative (`../x`) member names: whoever extracts them escapes."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or ".." in posix.split("/") or (len(posix) > 1 and posix[1] == ":"):
        raise ShardFormatError(f"member {shown(name)} has an absolute or parent-relative path; latentcache writes "
                               "plain KEY.EXT names")


def split_member(name: str) -> tuple[str, str]:
    """'dir/abc_0001.latents.safetensors' -> ('dir/abc_0001', 'latents.safetensors'), refusing unsafe names.

    The key keeps its directory, as webdataset's does, so `a/k.json` and `b/k.txt` are two samples, not one.
    """
    check_member_name(name)
    folder, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot:
        raise ShardFormatError(f"member {shown(name)} has no extension")
    return f"{folder}/{key}" if folder else key, ext


SAFETENSORS_MAX_HEADER = 100 << 20


def safetensors_header(data: bytes, where: str) -> dict[str, Any]:
    """Parse and check a safetensors header without touching tensor data: every tensor must lie inside `data`.

    A header that claims more bytes than the member holds is refused here, before any loader trusts it.
    """
    if len(data) < 8:
        raise ShardFormatError(f"{where}: {len(data)} bytes, too short for a safetensors file (8-byte header "
                               "length first)")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, SAFETENSORS_MAX_HEADER):
        raise ShardFormatError(f"{where}: safetensors header claims {size} bytes, the member holds "
                               f"{len(data) - 8} after the length field; truncated or crafted")
    try:
        header = strictjson.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{where}: safetensors header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ShardFormatError(f"{where}: safetensors header is a {type(header).__name__}, expected an object")
    room = len(data) - 8 - size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(v) for v in offsets)):
            raise ShardFormatError(f"{where}: tensor {shown(name)} has data_offsets {shown(offsets)}, expected "
                                   "[begin, end]")
        if not (isinstance(shape, list) and all(is_int(v) and v >= 0 for v in shape)):
            raise ShardFormatError(f"{where}: tensor {shown(name)} has shape {shown(shape)}, expected a list of "
                                   "sizes")
        begin, end = offsets
        if not 0 <= begin <= end <= room:
            raise ShardFormatError(f"{where}: tensor {shown(name)} claims bytes {begin}..{end}, the member holds "
                                   f"{room} bytes of tensor data; truncated or crafted")
    return header


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_sample(sample: dict[str, Any], where: str) -> dict[str, Any]:
    """A raw webdataset sample (bytes per extension) -> tensors and JSON. Unknown members are refused, unread."""
    key = sample.get("__key__", "?")
    if key.startswith("/") or ".." in key.split("/"):
        raise ShardFormatError(f"{where}: member name {shown(key)} is absolute or parent-relative; refusing the shard")
    unknown = [k for k in sample if not k.startswith("__") and k not in KNOWN_MEMBERS]
    if unknown:
        raise ShardFormatError(
            f"{where}: sample {shown(key)} has member(s) {shown(', '.join(sorted(unknown)))[1:-1]}; latentcache "
            f"shards hold only {', '.join(sorted(KNOWN_MEMBERS))}. Refusing to decode them (a .pyd/.pth/.pickle "
            "member could run code when unpickled). Re-encode the data with `latentcache encode`."
        )
    if LATENTS not in sample:
        raise ShardFormatError(f"{where}: sample {shown(key)} has no {LATENTS} member")
    out: dict[str, Any] = {"key": key, "url": where}
    headers = {member: safetensors_header(sample[member], f"{where}: member {key}.{member}")
               for member in (LATENTS, TEXT_EMBEDS) if member in sample}
    try:
        tensors = load_safetensors(sample[LATENTS])
        out["meta"] = strictjson.loads(sample["json"]) if "json" in sample else {}
        out["caption"] = sample["txt"].decode("utf-8") if "txt" in sample else None
        out["text"] = (read_text(sample[TEXT_EMBEDS], headers[TEXT_EMBEDS], f"{where}: member {key}.{TEXT_EMBEDS}")
                       if TEXT_EMBEDS in sample else None)
    except ShardFormatError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ShardFormatError(f"{where}: sample {shown(key)} does not decode: {type(e).__name__}: {e}") from e
    video = set(tensors) - set(IMAGE_TENSORS)
    image = set(tensors) & set(IMAGE_TENSORS)
    if (video != {"mean", "logvar"} and video != {"mean"}) or (image and "image_mean" not in image):
        raise ShardFormatError(f"{where}: sample {shown(key)} holds tensors {shown(sorted(tensors))}, expected "
                               "mean and logvar (and image_mean, image_logvar with --image-latents)")
    if "logvar" in tensors and tensors["logvar"].shape != tensors["mean"].shape:
        raise ShardFormatError(f"{where}: sample {shown(key)} has logvar {tuple(tensors['logvar'].shape)} but mean "
                               f"{tuple(tensors['mean'].shape)}")
    if not isinstance(out["meta"], dict):
        raise ShardFormatError(f"{where}: sample {shown(key)} has a {type(out['meta']).__name__} as its JSON, "
                               "expected an object")
    out["mean"], out["logvar"] = tensors["mean"], tensors.get("logvar")
    out["image_mean"], out["image_logvar"] = tensors.get("image_mean"), tensors.get("image_logvar")
    if image:
        from latentcache.format.checks import image_latent_problems

        problems = image_latent_problems(out["image_mean"], out["image_logvar"], out["mean"],
                                         f"{where}: sample {shown(key)}")
        if problems:
            raise ShardFormatError(f"{problems[0]}. Re-encode the shard")
    return out


@dataclass(slots=True)
class TarStats:
    """Filled in while a tar streams past: bytes read, their sha256 (once the tar is finished) and samples."""

    bytes: int = 0
    samples: int = 0
    sha256: str | None = None


class _HashingReader:
    """A read-only stream that hashes and counts what passes through, so a checksum costs no second read."""

    def __init__(self, raw: BinaryIO, *, hashing: bool = True) -> None:
        self.raw = raw
        # sha256 runs at ~2 GB/s on one core: as much as the rest of reading a shard, so it can be turned off.
        self.digest = hashlib.sha256() if hashing else None
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if self.digest is not None:
            self.digest.update(data)
        self.count += len(data)
        return data

    def drain(self, limit: int) -> bool:
        """Read (and hash) what follows the tar's end-of-archive blocks; False if more than `limit` bytes follow
        (a crafted url such as /dev/zero never ends)."""
        left = limit
        while left > 0:
            block = self.read(min(1 << 20, left))
            if not block:
                return True
            left -= len(block)
        return not self.read(1)


class _MemoryReader:
    """A seekable read-only stream over bytes in memory (io.BytesIO copies anything but `bytes`): tarfile's
    random-access mode then reads 512-byte headers and copies each member out once, nothing else."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size is None or size < 0 else min(self.pos + size, len(self.view))
        out = self.view[self.pos:end].tobytes()
        self.pos = max(self.pos, end)
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else len(self.view) + pos
        return self.pos

    def tell(self) -> int:
        return self.pos


# What one member may hold, checked from its header before a byte of it is read: a stranger's tar claiming a
# 100 GB caption must not fill memory. Latents of a 4K 121-frame LTX clip are well under 1 GiB.
MAX_MEMBER_BYTES = {"json": 16 << 20, "txt": 16 << 20, LATENTS: 4 << 30, TEXT_EMBEDS: 1 << 30}


# Padding after the end-of-archive blocks (tar's blocking factor) is a few KiB; anything past this is refused.
MAX_TRAILING_BYTES = 1 << 20


# GNU long-name and pax extended headers are read whole by tarfile before any member check can run: bound them. A
# latentcache member name is a key plus an extension, well under 4 KiB.
MAX_LONG_NAME_BYTES = 4 << 10


MAX_PAX_HEADER_BYTES = 64 << 10


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo, refusing an oversized long-name or pax header before its bytes are read."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) and self.size > MAX_LONG_NAME_BYTES:
            raise ShardFormatError(f"a GNU long-name header claims {self.size} bytes, more than a member name may "
                                   f"hold ({MAX_LONG_NAME_BYTES}); not a shard latentcache wrote")
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and \
                self.size > MAX_PAX_HEADER_BYTES:
            raise ShardFormatError(f"a pax extended header claims {self.size} bytes, more than "
                                   f"{MAX_PAX_HEADER_BYTES}; not a shard latentcache wrote")
        return super()._proc_member(tarfile_)


def _member_problem(member: tarfile.TarInfo, ext: str) -> str | None:
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.issparse():
        kind = "link" if member.issym() or member.islnk() else "sparse or special file"
        return f"is a {kind}; latentcache shards hold only regular files"
    if ext not in KNOWN_MEMBERS:
        return (f"has extension .{ext}; latentcache shards hold only {', '.join(sorted(KNOWN_MEMBERS))}. Refusing "
                "to read it (a .pyd/.pth/.pickle member could run code when unpickled)")
    if member.size > MAX_MEMBER_BYTES[ext]:
        return f"claims {member.size} bytes, more than a .{ext} member may hold ({MAX_MEMBER_BYTES[ext]})"
    return None


def iter_tar(source: str | os.PathLike | BinaryIO | bytes | memoryview, where: str | None = None,
             stats: TarStats | None = None, *, sha256: bool = True, members: bool = True
             ) -> Iterator[dict[str, Any]]:
    """Group the members of one tar stream into raw samples ({'__key__': key, ext: bytes}), refusing unsafe ones.

    Reads sequentially (a pipe or an HTTP stream works) and never extracts to disk. A member is refused from its
    header, before its bytes are read, when its name is absolute or climbs out (`..`), when it is not a regular
    file, or when its extension is not one latentcache writes. A tar cut short, even at a member boundary (no
    end-of-archive blocks), is an error. `stats` receives the byte count, sha256 (unless `sha256=False`) and sample
    count. `members=False` checks and counts without reading any member's bytes (each is given as None).

    `source` may also be a whole tar in memory (bytes or a memoryview): then only headers are read to walk it, and
    each member is copied out once (or not at all with `members=False`), with the same checks.
    """
    memory = isinstance(source, bytes | bytearray | memoryview)
    where = where or ("(tar in memory)" if memory else str(source))
    stats = stats if stats is not None else TarStats()
    own = not memory and not hasattr(source, "read")
    if memory:
        view = memoryview(source)
        raw: Any = _MemoryReader(view)
    else:
        raw = open_regular(source, where) if own else source
    reader = _HashingReader(raw, hashing=sha256 and not memory)
    current: dict[str, Any] | None = None
    name = "(first header)"
    try:
        # In memory: random access, headers only. A stream: 1 MiB reads instead of tarfile's 10 KiB records, 100x
        # fewer Python-level calls for multi-MB latents.
        how = {"fileobj": raw, "mode": "r:"} if memory else {"fileobj": reader, "mode": "r|", "bufsize": 1 << 20}
        with tarfile.open(**how, tarinfo=_BoundedTarInfo) as tar:
            for member in tar:
                name = member.name
                if member.isdir():
                    check_member_name(name)  # a directory entry is harmless unless its name is unsafe
                    continue
                key, ext = split_member(name)
                problem = _member_problem(member, ext)
                if problem:
                    raise ShardFormatError(f"{where}: member {shown(name)} {problem}")
                if current is not None and current["__key__"] != key:
                    stats.samples += 1
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                if ext in current:
                    raise ShardFormatError(f"{where}: member {shown(name)} appears twice in sample {shown(key)}")
                if memory and member.offset_data + member.size > len(view):
                    raise tarfile.ReadError("unexpected end of data")
                current[ext] = tar.extractfile(member).read() if members else None
            end = tar.offset
        if memory:
            reader.count = len(view)
            if reader.count - end > MAX_TRAILING_BYTES + 2 * tarfile.BLOCKSIZE:
                raise ShardFormatError(f"{where}: more than {MAX_TRAILING_BYTES} bytes follow the end of the tar; "
                                       "not a shard latentcache wrote")
        elif not reader.drain(MAX_TRAILING_BYTES):
            raise ShardFormatError(f"{where}: more than {MAX_TRAILING_BYTES} bytes follow the end of the tar; "
                                   "not a shard latentcache wrote")
    except tarfile.TarError as e:
        raise ShardFormatError(f"{where}: truncated or corrupt tar while reading member {shown(name)} ({e}); copy the "
                               "shard again or re-encode it") from e
    except ShardFormatError as e:
        message = str(e)
        raise ShardFormatError(message if message.startswith(where) else f"{where}: {message}") from e
    finally:
        if own:
            reader.raw.close()
    if reader.count - end < 2 * tarfile.BLOCKSIZE:
        raise ShardFormatError(f"{where}: the tar ends after member {shown(name)} without its end-of-archive blocks "
                               f"({reader.count} bytes): the shard was cut short; copy it again or re-encode it")
    stats.bytes = reader.count
    stats.sha256 = reader.digest.hexdigest() if reader.digest is not None else None
    if current is not None:
        stats.samples += 1
        yield current
