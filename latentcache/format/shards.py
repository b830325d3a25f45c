"""Stage 3: encoded clips -> webdataset tar shards, a sidecar per shard, and the manifest written last.

Completion is a file: a shard is written under a temporary name, renamed into place, and only then is its sidecar
(`<shard>.tar.json`: samples, bytes, sha256) written. A shard without a sidecar is unfinished and is redone. Tars
are byte-reproducible (fixed member order, mtime 0, no owner), so whoever writes shard i writes the same bytes.

Nothing is pickled: latents are safetensors, metadata is JSON, captions are UTF-8 text. `decode_sample` is the
only way latentcache reads a sample, and it decodes exactly those members.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import socket
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from latentcache.errors import ShardFormatError
from latentcache.format import strictjson

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATENTS = "latents.safetensors"
TEXT_EMBEDS = "text.safetensors"
KNOWN_MEMBERS = {LATENTS, "json", "txt", TEXT_EMBEDS}
TMP_SUFFIX = ".tmp"


@dataclass(slots=True)
class EncodedClip:
    """What the encode stage hands the writer: the raw posterior of one clip and its metadata."""

    key: str
    mean: torch.Tensor  # [C, T, H, W]
    logvar: torch.Tensor
    meta: dict[str, Any]
    caption: str | None = None
    text: dict[str, torch.Tensor] | None = None
    # --image-latents: the first frame's raw posterior as the family's I2V pipeline encodes it (`VideoVAE.
    # encode_image_condition`): [C, 1, H, W] for CogVideoX, [C, T, H, W] for Wan (no log-variance: it uses the mode).
    image_mean: torch.Tensor | None = None
    image_logvar: torch.Tensor | None = None


# Tensors a sample's latents member may hold, beyond `mean` (and `logvar`): the image-to-video conditioning.
IMAGE_TENSORS = ("image_mean", "image_logvar")


def sample_members(clip: EncodedClip) -> list[tuple[str, bytes]]:
    tensors = {"mean": clip.mean.contiguous()}
    if clip.logvar is not None:
        tensors["logvar"] = clip.logvar.contiguous()
    for name in IMAGE_TENSORS:
        if getattr(clip, name) is not None:
            tensors[name] = getattr(clip, name).contiguous()
    members = [
        (f"{clip.key}.json", json.dumps(clip.meta, sort_keys=True, ensure_ascii=False, allow_nan=False).encode()),
        (f"{clip.key}.{LATENTS}", save_safetensors(tensors)),
    ]
    if clip.caption is not None:
        members.append((f"{clip.key}.txt", clip.caption.encode("utf-8")))
    if clip.text is not None:
        members.append((f"{clip.key}.{TEXT_EMBEDS}", save_safetensors(clip.text)))
    return members


# Observers of shard writing, called with (event, path): ("member", shard) after each tar member, ("sidecar",
# sidecar) just before a sidecar is written and ("sidecar-written", sidecar) just after. Empty by default; a tool
# that watches or paces writing appends to it (the kill-mid-write tests slow writing down with it).
WRITE_HOOKS: list[Callable[[str, Path], None]] = []


def _notify(event: str, path: Path) -> None:
    for hook in WRITE_HOOKS:
        hook(event, path)
    pause_point(event)


# TEST-ONLY. LATENTCACHE_TEST_PAUSE_AT=<point>[#<n>]:<dir> makes a process, the n-th time (default 1) it reaches
# `point` (a WRITE_HOOKS event: member, sidecar, sidecar-written; or "planned": plan.json just written), create
# <dir>/<point>.<pid>.reached and then wait until <dir>/release exists. The kill tests never write "release": they
# wait for "reached" and kill -9 a writer frozen in exactly that state, however loaded the machine (polling for a
# state and then killing lets the moment pass first). Unset, the cost is one environment lookup per event.
PAUSE_ENV = "LATENTCACHE_TEST_PAUSE_AT"
_paused_at: dict[str, int] = {}


def pause_point(point: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    wanted, _, folder = spec.partition(":")
    name, _, nth = wanted.partition("#")
    if name != point:
        return
    _paused_at[point] = _paused_at.get(point, 0) + 1
    if _paused_at[point] != int(nth or 1):
        return
    (Path(folder) / f"{point}.{os.getpid()}.reached").touch()
    while not (Path(folder) / "release").exists():
        time.sleep(0.05)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def sidecar_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".json")


def _tmp_name(path: Path) -> Path:
    """A temporary name unique to this writer: two processes that ever write the same file (a requeued SLURM task
    overlapping its old self, two array tasks making the plan) never write into one inode; the rename decides."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}{TMP_SUFFIX}")


# What `_tmp_name` appends to a final name: `.<host>.<pid>.tmp` (a host name may hold dots, a pid is digits).
_TMP_TAIL = r"\.(?P<host>.+)\.(?P<pid>[0-9]+)\.tmp"
# The files latentcache writes through a temporary, by the folder of OUT they are written in: the final names of
# pipeline.PLAN_FILE, the manifest, failures.jsonl and plan.OUTPUT_MARKER; chunks.inputs_name / keys_name;
# chunks.chunk_plan_name; PlannedShard.relpath and its sidecar. Only temporaries of these names, in these folders,
# are ever swept: any other file, even `OUT/shards/<bucket>/notes.tmp`, is a user's.
_ROOT_FILES = re.compile(rf"(?:plan\.json|manifest\.json|failures\.jsonl|\.latentcache){_TMP_TAIL}")
_INPUTS_FILES = re.compile(rf"part-[0-9]{{4,}}\.(?:jsonl|keys\.npy){_TMP_TAIL}")
_CHUNK_FOLDER = re.compile(r"p[0-9]{4,}")
_CHUNK_FILES = re.compile(rf"c[0-9]{{6,}}\.json{_TMP_TAIL}")
_SHARD_FILES = re.compile(rf"(?:p[0-9]{{4,}}-c[0-9]{{6,}}-)?[0-9]{{6,}}\.tar(?:\.json)?{_TMP_TAIL}")


def _own_temporaries(root: Path) -> Iterator[tuple[Path, re.Match[str]]]:
    """Each temporary under OUT=`root` whose name latentcache builds, in a folder latentcache writes it in."""
    from latentcache.format.checks import parse_bucket

    def listed(folder: Path, names: re.Pattern[str]) -> Iterator[tuple[Path, re.Match[str]]]:
        if not folder.is_dir():
            return
        for entry in sorted(folder.iterdir()):
            match = names.fullmatch(entry.name)
            if match and entry.is_file() and not entry.is_symlink():  # latentcache makes no links: one is a user's
                yield entry, match

    def subfolders(folder: Path, ok: Callable[[str], bool]) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(d for d in folder.iterdir() if ok(d.name) and d.is_dir())

    yield from listed(root, _ROOT_FILES)
    yield from listed(root / "inputs", _INPUTS_FILES)
    for folder in subfolders(root / "chunks", _CHUNK_FOLDER.fullmatch):
        yield from listed(folder, _CHUNK_FILES)
    for folder in subfolders(root / "shards", lambda name: parse_bucket(name) is not None):
        yield from listed(folder, _SHARD_FILES)


def write_shard(path: Path, clips: list[EncodedClip], *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the whole shard atomically, then its sidecar. Returns the sidecar record.

    In object storage (`path` a store.UrlPath) the tar is built in memory and PUT once: no rename exists there and
    none is needed, a PUT is atomic. The sidecar is PUT after it, so "done" means the same thing as on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remote = _in_object_store(path)
    tmp = _tmp_name(path) if not remote else None
    digest = hashlib.sha256()
    with io.BytesIO() if remote else open(tmp, "wb") as raw:

        class _Hashing(io.RawIOBase):
            def writable(self) -> bool:
                return True

            def write(self, b: bytes) -> int:
                digest.update(b)
                return raw.write(b)

        with tarfile.open(fileobj=_Hashing(), mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for clip in clips:
                for name, data in sample_members(clip):
                    _add(tar, name, data)
                    _notify("member", path)
        if remote:
            path.write_bytes(raw.getbuffer())
        else:
            raw.flush()
            os.fsync(raw.fileno())
    if not remote:
        os.replace(tmp, path)
    # Only the rename makes the tar visible, and only the sidecar makes it count: a kill between the two leaves a
    # complete tar without a sidecar, which `read_done` treats as unfinished and the next run rewrites (same bytes).
    record = {
        "path": path.name,
        "samples": len(clips),
        "keys": [c.key for c in clips],
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
        **(extra or {}),
    }
    _notify("sidecar", sidecar_path(path))
    write_json_atomic(sidecar_path(path), record)
    _notify("sidecar-written", sidecar_path(path))
    return record


def _in_object_store(path: Any) -> bool:
    """An output path in object storage (store.UrlPath): written with single PUTs, never temp + rename."""
    from latentcache.storage.store import UrlPath

    return isinstance(path, UrlPath)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, no timestamps), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False))


def write_text_atomic(path: Path, text: str) -> None:
    """Write under this process's temporary name, fsync, rename: readers see the old file or the new, never half.
    In object storage, one PUT, which gives the same guarantee."""
    if _in_object_store(path):
        path.write_text(text)
        return
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_done(path: Path) -> dict[str, Any] | None:
    """The sidecar of a finished shard, or None when the shard must be (re)done."""
    side = sidecar_path(path)
    if not (path.is_file() and side.is_file()):
        return None
    try:
        record = strictjson.loads(side.read_bytes())
    except (json.JSONDecodeError, OSError):
        return None
    return record if isinstance(record, dict) and record.get("bytes") == path.stat().st_size else None


def remove_temporaries(shard: Path) -> list[Path]:
    """Leftovers of killed writers of this shard and its sidecar; returns what was removed.

    Only the shard's owner calls this, right before writing it, so in a normal run no live writer is hurt. (Two
    overlapping runs into one directory could remove each other's file; the loser's rename then fails loudly.)
    """
    if _in_object_store(shard):
        return []  # writes there are single PUTs: no temporary is ever left behind
    # The tar's temporaries and its sidecar's (`000017.tar.json.<host>.<pid>.tmp`), and no other name: a user's
    # `000017.tar.notes.tmp` is not one of ours.
    ours = re.compile(rf"{re.escape(shard.name)}(?:\.json)?{_TMP_TAIL}")
    removed = [p for p in sorted(shard.parent.glob(f"{shard.name}.*{TMP_SUFFIX}"))
               if ours.fullmatch(p.name) and not p.is_symlink()]
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    if removed:
        log.info("removed %d stale temporary file(s) of %s", len(removed), shard)
    return removed


def remove_stale_temporaries(root: Path, *, max_age_s: float = 3600.0) -> list[Path]:
    """latentcache's own temporaries in the output `root` whose writer is gone: a dead process on this host, or older
    than an hour (a writer on another host cannot be asked). Run once no live writer should remain, e.g. when
    finalizing. Only names `_tmp_name` builds for files latentcache writes, in the folders it writes them in, are
    candidates (see `_own_temporaries`): a user's `OUT/my_notes/draft.tmp` stays, however old."""
    if _in_object_store(root):
        return []
    host = socket.gethostname()
    removed = []
    for tmp, match in _own_temporaries(root):
        # The host is matched from the end: `000017.tar.json.<host>.<pid>.tmp` may split either way, not this.
        pid = match["pid"]
        local = tmp.name.endswith(f".{host}.{pid}{TMP_SUFFIX}")
        try:
            age = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        if (local and not process_alive(int(pid))) or age > max_age_s:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d stale temporary file(s) under %s, e.g. %s", len(removed), root, removed[0])
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    """No timestamp: the manifest is a function of the shards, so a resumed run's is byte-identical to a clean one's."""
    path = out / "manifest.json"
    write_json_atomic(path, {"format_version": FORMAT_VERSION, **manifest})
    return path


def read_manifest(root: Path | str) -> dict[str, Any]:
    """The manifest of the dataset in `root` (a directory, or an object-storage url such as s3://bucket/latents),
    refused with the file and the reason unless it is one latentcache wrote: an object with format_version 1, a
    usable latent spec, and a list of well-formed shard entries."""
    path, data = _manifest_bytes(root)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ShardFormatError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; not a manifest latentcache wrote")
    try:
        # Non-finite numbers kept: the checks below name a NaN scaling factor as such.
        manifest = strictjson.loads(data, keep_nonfinite=True)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{path}: not a JSON manifest ({e}); rebuild it with `latentcache finalize "
                               "DIR`") from e
    if not isinstance(manifest, dict):
        raise ShardFormatError(f"{path}: holds a JSON {type(manifest).__name__}, expected an object with "
                               "format_version, latent_spec and shards")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {manifest.get('format_version')!r}, this latentcache "
                               f"reads version {FORMAT_VERSION}")
    problems = manifest_problems(manifest)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ShardFormatError(f"{path}: {'; '.join(problems[:3])}{more}. Not a manifest latentcache wrote: "
                               "rebuild it with `latentcache finalize DIR`")
    return manifest


def _manifest_bytes(root: Path | str) -> tuple[str | Path, bytes]:
    """(where, up to MAX_MANIFEST_BYTES + 1 bytes of manifest.json) from a directory or an object-storage url."""
    from latentcache.storage import store

    missing = (f"{root}: no manifest.json (is this a latentcache output directory, and did `latentcache encode` "
               "finish? `latentcache finalize DIR` writes it from the shards)")
    if store.is_url(root):
        url = store.join(str(root), "manifest.json")
        try:
            return url, store.read_url(url, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise ShardFormatError(missing) from None
        except OSError as e:
            raise ShardFormatError(f"{url}: cannot read ({e})") from e
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise ShardFormatError(missing)
    try:
        with open_regular(path, str(path)) as f:
            return path, f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ShardFormatError(f"{path}: cannot read ({e.strerror or e})") from e


# A manifest lists one small record per shard: 256 MiB holds over a million shards.
MAX_MANIFEST_BYTES = 256 << 20
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """What in a parsed manifest the readers could not use (wrong types, unknown bucket names...); [] if fine."""
    from latentcache.format.checks import parse_bucket, spec_problems

    if "latent_spec" not in manifest:
        return ["no latent_spec"]
    problems = spec_problems(manifest["latent_spec"])
    for name in ("vae", "counts", "settings", "buckets"):
        if manifest.get(name) is not None and not isinstance(manifest[name], dict):
            problems.append(f"{name} is a {type(manifest[name]).__name__}, expected an object")
    problems += [f"buckets has {_shown(b)}, expected FRAMESxHEIGHTxWIDTH such as 49x480x720"
                 for b in (manifest.get("buckets") or {}) if parse_bucket(b) is None][:1]
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return [*problems, f"shards is {_shown(shards)}, expected a list of shard records"]
    seen: set[str] = set()
    for i, entry in enumerate(shards):
        problem = _shard_entry_problem(entry)
        if problem is None and entry["path"] in seen:
            problem = f"path {_shown(entry['path'])} is listed twice"
        if problem is not None:
            problems.append(f"shards[{i}] {problem}")
            break  # one bad entry says enough; a million-line report does not help
        seen.add(entry["path"])
    return problems


@functools.lru_cache(maxsize=4096)
def _bucket_name_ok(bucket: str) -> bool:
    """Cached: a manifest of 156k shards names a few dozen buckets, and the regex need not run per shard."""
    from latentcache.format.checks import parse_bucket

    return parse_bucket(bucket) is not None


def _shard_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"is {_shown(entry)}, expected an object with path, bucket, samples, bytes, sha256"
    if not (isinstance(entry.get("path"), str) and entry["path"]):
        return f"has path {_shown(entry.get('path'))}, expected a relative path such as shards/17x64x96/000000.tar"
    if not (isinstance(entry.get("bucket"), str) and _bucket_name_ok(entry["bucket"])):
        return f"has bucket {_shown(entry.get('bucket'))}, expected FRAMESxHEIGHTxWIDTH such as 49x480x720"
    for name in ("samples", "bytes"):
        if not (_is_int(entry.get(name)) and entry[name] >= 0):
            return f"has {name} {_shown(entry.get(name))}, expected a count"
    sha = entry.get("sha256")
    if sha is not None and not (isinstance(sha, str) and SHA256_HEX.match(sha)):
        return f"has sha256 {_shown(sha)}, expected 64 lowercase hex digits"
    return None


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


def _shown(value: Any, limit: int = 120) -> str:
    """repr(value) cut to `limit` characters: a crafted 50 MB name must not become a 50 MB error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------- reading


def check_member_name(name: str) -> None:
    """Refuse absolute (`/x`, `C:x`) and parent-relative (`../x`) member names: whoever extracts them escapes."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or ".." in posix.split("/") or (len(posix) > 1 and posix[1] == ":"):
        raise ShardFormatError(f"member {_shown(name)} has an absolute or parent-relative path; latentcache writes "
                               "plain KEY.EXT names")


def split_member(name: str) -> tuple[str, str]:
    """'dir/abc_0001.latents.safetensors' -> ('dir/abc_0001', 'latents.safetensors'), refusing unsafe names.

    The key keeps its directory, as webdataset's does, so `a/k.json` and `b/k.txt` are two samples, not one.
    """
    check_member_name(name)
    folder, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot:
        raise ShardFormatError(f"member {_shown(name)} has no extension")
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
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(v) for v in offsets)):
            raise ShardFormatError(f"{where}: tensor {_shown(name)} has data_offsets {_shown(offsets)}, expected "
                                   "[begin, end]")
        if not (isinstance(shape, list) and all(_is_int(v) and v >= 0 for v in shape)):
            raise ShardFormatError(f"{where}: tensor {_shown(name)} has shape {_shown(shape)}, expected a list of "
                                   "sizes")
        begin, end = offsets
        if not 0 <= begin <= end <= room:
            raise ShardFormatError(f"{where}: tensor {_shown(name)} claims bytes {begin}..{end}, the member holds "
                                   f"{room} bytes of tensor data; truncated or crafted")
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_sample(sample: dict[str, Any], where: str) -> dict[str, Any]:
    """A raw webdataset sample (bytes per extension) -> tensors and JSON. Unknown members are refused, unread."""
    key = sample.get("__key__", "?")
    if key.startswith("/") or ".." in key.split("/"):
        raise ShardFormatError(f"{where}: member name {_shown(key)} is absolute or parent-relative; refusing the shard")
    unknown = [k for k in sample if not k.startswith("__") and k not in KNOWN_MEMBERS]
    if unknown:
        raise ShardFormatError(
            f"{where}: sample {_shown(key)} has member(s) {_shown(', '.join(sorted(unknown)))[1:-1]}; latentcache "
            f"shards hold only {', '.join(sorted(KNOWN_MEMBERS))}. Refusing to decode them (a .pyd/.pth/.pickle "
            "member could run code when unpickled). Re-encode the data with `latentcache encode`."
        )
    if LATENTS not in sample:
        raise ShardFormatError(f"{where}: sample {_shown(key)} has no {LATENTS} member")
    out: dict[str, Any] = {"key": key, "url": where}
    for member in (LATENTS, TEXT_EMBEDS):
        if member in sample:
            safetensors_header(sample[member], f"{where}: member {key}.{member}")
    try:
        tensors = load_safetensors(sample[LATENTS])
        out["meta"] = strictjson.loads(sample["json"]) if "json" in sample else {}
        out["caption"] = sample["txt"].decode("utf-8") if "txt" in sample else None
        out["text"] = load_safetensors(sample[TEXT_EMBEDS]) if TEXT_EMBEDS in sample else None
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ShardFormatError(f"{where}: sample {_shown(key)} does not decode: {type(e).__name__}: {e}") from e
    video = set(tensors) - set(IMAGE_TENSORS)
    image = set(tensors) & set(IMAGE_TENSORS)
    if (video != {"mean", "logvar"} and video != {"mean"}) or (image and "image_mean" not in image):
        raise ShardFormatError(f"{where}: sample {_shown(key)} holds tensors {_shown(sorted(tensors))}, expected "
                               "mean and logvar (and image_mean, image_logvar with --image-latents)")
    if "logvar" in tensors and tensors["logvar"].shape != tensors["mean"].shape:
        raise ShardFormatError(f"{where}: sample {_shown(key)} has logvar {tuple(tensors['logvar'].shape)} but mean "
                               f"{tuple(tensors['mean'].shape)}")
    if not isinstance(out["meta"], dict):
        raise ShardFormatError(f"{where}: sample {_shown(key)} has a {type(out['meta']).__name__} as its JSON, "
                               "expected an object")
    out["mean"], out["logvar"] = tensors["mean"], tensors.get("logvar")
    out["image_mean"], out["image_logvar"] = tensors.get("image_mean"), tensors.get("image_logvar")
    if image:
        from latentcache.format.checks import image_latent_problems

        problems = image_latent_problems(out["image_mean"], out["image_logvar"], out["mean"],
                                         f"{where}: sample {_shown(key)}")
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
                    raise ShardFormatError(f"{where}: member {_shown(name)} {problem}")
                if current is not None and current["__key__"] != key:
                    stats.samples += 1
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                if ext in current:
                    raise ShardFormatError(f"{where}: member {_shown(name)} appears twice in sample {_shown(key)}")
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
        raise ShardFormatError(f"{where}: truncated or corrupt tar while reading member {_shown(name)} ({e}); copy the "
                               "shard again or re-encode it") from e
    except ShardFormatError as e:
        message = str(e)
        raise ShardFormatError(message if message.startswith(where) else f"{where}: {message}") from e
    finally:
        if own:
            reader.raw.close()
    if reader.count - end < 2 * tarfile.BLOCKSIZE:
        raise ShardFormatError(f"{where}: the tar ends after member {_shown(name)} without its end-of-archive blocks "
                               f"({reader.count} bytes): the shard was cut short; copy it again or re-encode it")
    stats.bytes = reader.count
    stats.sha256 = reader.digest.hexdigest() if reader.digest is not None else None
    if current is not None:
        stats.samples += 1
        yield current
