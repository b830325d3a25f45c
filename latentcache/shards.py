"""Stage 3: encoded clips -> webdataset tar shards, a sidecar per shard, and the manifest written last.

Completion is a file: a shard is written under a temporary name, renamed into place, and only then is its sidecar
(`<shard>.tar.json`: samples, bytes, sha256) written. A shard without a sidecar is unfinished and is redone. Tars
are byte-reproducible (fixed member order, mtime 0, no owner), so whoever writes shard i writes the same bytes.

Nothing is pickled: latents are safetensors, metadata is JSON, captions are UTF-8 text. `decode_sample` is the
only way latentcache reads a sample, and it decodes exactly those members.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from latentcache.errors import ShardFormatError

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


def sample_members(clip: EncodedClip) -> list[tuple[str, bytes]]:
    members = [
        (f"{clip.key}.json", json.dumps(clip.meta, sort_keys=True, ensure_ascii=False).encode()),
        (f"{clip.key}.{LATENTS}", save_safetensors({"mean": clip.mean.contiguous(),
                                                   "logvar": clip.logvar.contiguous()})),
    ]
    if clip.caption is not None:
        members.append((f"{clip.key}.txt", clip.caption.encode("utf-8")))
    if clip.text is not None:
        members.append((f"{clip.key}.{TEXT_EMBEDS}", save_safetensors(clip.text)))
    return members


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def sidecar_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".json")


def write_shard(path: Path, clips: list[EncodedClip], *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the whole shard atomically, then its sidecar. Returns the sidecar record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    digest = hashlib.sha256()
    with open(tmp, "wb") as raw:

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
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    record = {
        "path": path.name,
        "samples": len(clips),
        "keys": [c.key for c in clips],
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
        **(extra or {}),
    }
    _write_json_atomic(sidecar_path(path), record)
    return record


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def read_done(path: Path) -> dict[str, Any] | None:
    """The sidecar of a finished shard, or None when the shard must be (re)done."""
    side = sidecar_path(path)
    if not (path.is_file() and side.is_file()):
        return None
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return None
    return record if record.get("bytes") == path.stat().st_size else None


def remove_temporaries(shard: Path) -> None:
    """Leftovers of a killed writer of this shard (only its owner calls this, so no live writer is hurt)."""
    shard.with_name(shard.name + TMP_SUFFIX).unlink(missing_ok=True)
    sidecar = sidecar_path(shard)
    sidecar.with_name(sidecar.name + TMP_SUFFIX).unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    manifest = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **manifest}
    path = out / "manifest.json"
    _write_json_atomic(path, manifest)
    return path


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.is_file():
        raise ShardFormatError(f"{root}: no manifest.json (is this a latentcache output directory, and did "
                               "`latentcache encode` finish? `latentcache finalize DIR` writes it from the shards)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {manifest.get('format_version')!r}, this latentcache "
                               f"reads version {FORMAT_VERSION}")
    return manifest


# ---------------------------------------------------------------------------------------------- reading


def split_member(name: str) -> tuple[str, str]:
    """'dir/abc_0001.latents.safetensors' -> ('abc_0001', 'latents.safetensors'), refusing unsafe names."""
    if name.startswith("/") or ".." in Path(name).parts:
        raise ShardFormatError(f"member {name!r} has an absolute or parent-relative path")
    base = name.rsplit("/", 1)[-1]
    key, dot, ext = base.partition(".")
    if not dot:
        raise ShardFormatError(f"member {name!r} has no extension")
    return key, ext


def decode_sample(sample: dict[str, Any], where: str) -> dict[str, Any]:
    """A raw webdataset sample (bytes per extension) -> tensors and JSON. Unknown members are refused, unread."""
    key = sample.get("__key__", "?")
    if key.startswith("/") or ".." in key.split("/"):
        raise ShardFormatError(f"{where}: member name {key!r} is absolute or parent-relative; refusing the shard")
    unknown = [k for k in sample if not k.startswith("__") and k not in KNOWN_MEMBERS]
    if unknown:
        raise ShardFormatError(
            f"{where}: sample {key!r} has member(s) {', '.join(sorted(unknown))}; latentcache shards hold only "
            f"{', '.join(sorted(KNOWN_MEMBERS))}. Refusing to decode them (a .pyd/.pth/.pickle member could run "
            "code when unpickled). Re-encode the data with `latentcache encode`."
        )
    if LATENTS not in sample:
        raise ShardFormatError(f"{where}: sample {key!r} has no {LATENTS} member")
    out: dict[str, Any] = {"key": key, "url": where}
    try:
        tensors = load_safetensors(sample[LATENTS])
        out["meta"] = json.loads(sample["json"]) if "json" in sample else {}
        out["caption"] = sample["txt"].decode("utf-8") if "txt" in sample else None
        out["text"] = load_safetensors(sample[TEXT_EMBEDS]) if TEXT_EMBEDS in sample else None
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ShardFormatError(f"{where}: sample {key!r} does not decode: {type(e).__name__}: {e}") from e
    if set(tensors) != {"mean", "logvar"} and set(tensors) != {"mean"}:
        raise ShardFormatError(f"{where}: sample {key!r} holds tensors {sorted(tensors)}, expected mean and logvar")
    out["mean"], out["logvar"] = tensors["mean"], tensors.get("logvar")
    return out


def iter_tar(path: str | Path) -> Iterator[dict[str, Any]]:
    """Group the members of one local tar into raw samples, with the same safety checks as the dataset."""
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member(member.name)
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                f = tar.extractfile(member)
                current[ext] = f.read() if f is not None else b""
    except tarfile.TarError as e:
        raise ShardFormatError(f"{path}: not a complete tar ({e})") from e
    except ShardFormatError as e:
        raise ShardFormatError(f"{path}: {e}") from e
    if current is not None:
        yield current
