"""What every `latentcache export TRAINER OUT --to DIR` shares: the checked read of OUT, and the target directory.

Reading: every sample passes the checks `LatentShardDataset` and `verify` apply (the manifest's latent spec, each
sample's dtype, shape, channels, finiteness and posterior range), so an export never converts what the dataset would
refuse. Writing: each file is written under a temporary name of this export's own and renamed into place, with
deterministic bytes (a re-export of the same output writes the same bytes, so rsync and hash-keyed caches see no
change), and recorded by name and sha256 in the directory's marker. The marker is what makes an export resumable and
safe next to the trainer's own files: a later export may overwrite or remove only a file whose name the marker lists
and whose bytes still hash to what was recorded; anything else in the directory is the user's or the trainer's, and is
left as it is.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from latentcache.errors import ConfigError, LatentMismatchError, ShardFormatError
from latentcache.format import strictjson
from latentcache.format.checks import latent_problems, meta_problems
from latentcache.format.manifest import Manifest
from latentcache.format.reader import decode_sample
from latentcache.format.spec import LatentSpec
from latentcache.train.shard_sources import read_shard, resolve_source

MARKER = ".latentcache-export.json"
# Appended before each file is put in place, so a killed export still knows what it wrote (and its temporaries).
JOURNAL = ".latentcache-export.journal"
# One path component: Linux and macOS allow 255 bytes (NAME_MAX); longer names fail with ENAMETOOLONG.
NAME_MAX = 255
# Called once per sample exported with (1, the output's sample count): the CLI owns the progress bar.
Progress = Callable[[int, int], None]


@dataclass(slots=True)
class ExportSample:
    """One sample of a latentcache output, decoded and checked as the dataset checks it."""

    key: str
    where: str  # "SHARD: sample KEY", the start of every message about it
    bucket: str
    mean: torch.Tensor
    logvar: torch.Tensor | None
    meta: dict[str, Any]
    caption: str | None
    text: dict[str, torch.Tensor] | None
    image_mean: torch.Tensor | None


@dataclass(slots=True)
class Source:
    """A latentcache output opened for export: its manifest, latent spec and sample count (for a progress bar)."""

    root: str
    manifest: Manifest
    spec: LatentSpec
    total: int
    shards: list[Any]

    def samples(self) -> Iterator[ExportSample]:
        """Every sample, in manifest order, each refused (the export stops, naming it) where the dataset would."""
        seen: dict[str, str] = {}
        for shard in self.shards:
            for raw in _read(shard):
                sample = decode_sample(raw, shard.url)
                where = f"{shard.url}: sample {sample['key']}"
                mean = sample["mean"]
                if mean.ndim != 4 or mean.shape[0] != self.spec.channels:
                    raise refused(where, f"latents of shape {list(mean.shape)}, the manifest says "
                                         f"{self.spec.channels} channels, [C, T, H, W]; the dataset and `verify` "
                                         "refuse it, so it is not exported")
                problems = (latent_problems(mean, sample["logvar"], self.spec, shard.bucket, where)
                            or meta_problems(sample["meta"], shard.bucket, where))
                if problems:
                    raise LatentMismatchError(f"{problems[0]}; the dataset and `verify` refuse it, so it is not "
                                              "exported")
                if sample["key"] in seen:
                    raise refused(where, f"its key also appears in {seen[sample['key']]}")
                seen[sample["key"]] = shard.url
                yield ExportSample(sample["key"], where, shard.bucket, mean, sample["logvar"], sample["meta"],
                                   sample["caption"], sample["text"], sample["image_mean"])


def _read(shard: Any) -> Iterator[dict[str, Any]]:
    try:
        yield from read_shard(shard)
    except OSError as e:
        raise ConfigError(f"{shard.url}: cannot read ({e.strerror or e}); is the output complete?") from None


def refused(where: str, reason: str) -> LatentMismatchError:
    """A sample the export will not write: it stops, naming the sample and why (the CLI exits 2). A trainer cache
    silently missing samples would train on less than the user asked for."""
    return LatentMismatchError(f"{where}: {reason}")


def open_source(source: str | os.PathLike) -> Source:
    """The output, with its manifest checked as every reader checks it (Manifest.read runs spec_problems)."""
    try:
        manifest, root, shards = resolve_source(source)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read ({e.strerror or e})") from None
    if manifest.counts_problem(root):  # what verify reports and the dataset refuses
        raise ShardFormatError(f"{manifest.counts_problem(root)}; not exported")
    spec = LatentSpec.from_dict(manifest.latent_spec)
    return Source(str(root), manifest, spec, sum(s.samples for s in shards), shards)


def meta_number(sample: ExportSample, name: str, *, most: float, integer: bool = False) -> float | int | None:
    """A number from the sample's JSON, None when absent; refused when it is not a finite value in [0, most].

    A stranger's sidecar may say anything (`source_width` 10**300, `clip_start` 1e300): the export must not turn
    that into a 300-digit file name or an OverflowError."""
    value = sample.meta.get(name)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (not integer or isinstance(value, int))
    if not ok or not math.isfinite(value) or not 0 <= value <= most:
        kind = "a whole number" if integer else "a number"
        raise refused(sample.where, f"its JSON field {name} is {str(value)[:40]!r}, expected {kind} from 0 to "
                                    f"{most:g}; not a clip latentcache wrote")
    return value


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on the tensors and metadata: safetensors writes its metadata in a
    per-process (hash map) order, so the header is re-serialised here with sorted keys, padded as it pads it."""
    data = safetensors_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + size:]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def os_error(path: Path | str, e: OSError, doing: str) -> ConfigError:
    """A write error as the user reads it: the file, what failed and what to do (exit 2, not a traceback)."""
    hints = {errno.ENOSPC: "the disk is full: free space and rerun (the export resumes)",
             errno.EDQUOT: "the disk quota is exceeded: free space and rerun (the export resumes)",
             errno.EROFS: "the file system is read-only: export to a writable --to",
             errno.EACCES: "permission denied: export to a folder you can write",
             errno.EPERM: "permission denied: export to a folder you can write",
             errno.ENAMETOOLONG: "the name is longer than the file system allows",
             errno.ENOTDIR: "a part of the path is a file, not a folder: choose another --to",
             errno.EEXIST: "a file is in the way: choose another --to"}
    hint = hints.get(e.errno or 0, e.strerror or str(e))
    return ConfigError(f"{path}: cannot {doing} ({hint})")


@dataclass(slots=True)
class ExportResult:
    """What an export did (or, with dry_run, would do), by file name relative to the target directory."""

    target: Path
    written: list[str] = field(default_factory=list)  # new or changed files
    unchanged: list[str] = field(default_factory=list)  # already there with the same bytes: not rewritten
    removed: list[str] = field(default_factory=list)  # this export's earlier files it does not write again
    kept: list[str] = field(default_factory=list)  # files of the user's or the trainer's own, left as they are
    notes: list[str] = field(default_factory=list)  # what the user runs next
    dry_run: bool = False

    @property
    def files(self) -> list[str]:
        return sorted(self.written + self.unchanged)


class ExportTarget:
    """The directory an export writes into, and the record of what it wrote there (see the module's docstring)."""

    def __init__(self, root: str | os.PathLike, trainer: str, source: str, *, dry_run: bool = False) -> None:
        self.root = Path(root)
        self.trainer, self.source, self.dry_run = trainer, source, dry_run
        self.result = ExportResult(self.root, dry_run=dry_run)
        self._this_run: dict[str, str] = {}
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--to {self.root}: is a file, not a folder; choose another --to")
        self.legacy = False  # a marker of an earlier version: names without hashes
        self._hashes: dict[str, str | None] = {}  # name -> sha256 of the file there now, each file read once
        self.recorded, self._temporaries = self._load_record()
        self._opened = False

    def _open(self) -> None:
        """Create the folder and start the journal at the first write: a refused export leaves no trace."""
        if self._opened or self.dry_run:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(self.root, e, "create the folder") from None
        self._clean_temporaries()
        self._journal(None, None)  # a new journal: the marker and this run's lines are the record
        self._opened = True

    # ---------------------------------------------------------------------------------------- the record

    def _load_record(self) -> tuple[dict[str, str], list[str]]:
        """{name: sha256} of the files earlier exports wrote here, and the temporaries they created."""
        files: dict[str, str] = {}
        temporaries: list[str] = []
        marker = self.root / MARKER
        if marker.is_file():
            try:
                record = strictjson.loads(marker.read_bytes())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{marker}: not a latentcache export marker ({e}); remove it only if you made "
                                  "it, or export into another folder") from None
            listed = record.get("files") if isinstance(record, dict) else None
            # A marker of an earlier version lists names without hashes: those files cannot be proven ours.
            self.legacy = isinstance(listed, list)
            if isinstance(listed, dict):
                files.update({k: v for k, v in listed.items() if isinstance(k, str) and isinstance(v, str)})
        journal = self.root / JOURNAL
        if journal.is_file():
            for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    if isinstance(entry.get("sha256"), str):
                        files[entry["name"]] = entry["sha256"]
                    if isinstance(entry.get("tmp"), str):
                        temporaries.append(entry["tmp"])
        return {k: v for k, v in files.items() if _safe_relative(k)}, [t for t in temporaries if _safe_relative(t)]

    def _journal(self, name: str | None, digest: str | None, tmp: str | None = None) -> None:
        path = self.root / JOURNAL
        try:
            if name is None:
                lines = [json.dumps({"name": n, "sha256": h}) for n, h in sorted(self.recorded.items())]
                path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
                return
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"name": name, "sha256": digest, "tmp": tmp}) + "\n")
                f.flush()
        except OSError as e:
            raise os_error(path, e, "record what the export writes") from None

    def _clean_temporaries(self) -> None:
        """Temporaries an earlier, killed export created (with O_EXCL, under names its journal recorded)."""
        for tmp in self._temporaries:
            (self.root / tmp).unlink(missing_ok=True)

    def owns(self, name: str) -> bool:
        """Whether the file at `name` is one an export wrote here and nobody changed since (its bytes hash as
        recorded)."""
        digest = self.recorded.get(name)
        path = self.root / name
        return digest is not None and not path.is_symlink() and self._present(name) == digest

    def _present(self, name: str) -> str | None:
        if name not in self._hashes:
            self._hashes[name] = _file_sha256(self.root / name)
        return self._hashes[name]

    # ---------------------------------------------------------------------------------------- writing

    def check_name(self, name: str, where: str) -> None:
        """Refuse a name the file system cannot hold before anything is written."""
        for part in name.split("/"):
            if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX - 24:  # room for the temporary's affixes
                raise LatentMismatchError(f"{where}: its file name {part[:60]}... is {len(part.encode())} bytes; the "
                                          f"file system allows {NAME_MAX} (ENAMETOOLONG): rename the source video "
                                          "to a shorter name and encode it again")

    def write(self, name: str, data: bytes, where: str, *, foreign_ok: bool = False) -> None:
        """Put `data` at `name` (relative, '/'-separated) atomically, unless it is there already.

        A file at `name` that this export did not write is never overwritten: with `foreign_ok` it is kept (the
        trainer's own cache of the same thing, say) and listed in `result.kept`; otherwise the export stops."""
        if not _safe_relative(name):
            raise LatentMismatchError(f"{where}: export file name {name!r} is not a plain relative name")
        self.check_name(name, where)
        if name in self._this_run:
            raise LatentMismatchError(f"{where}: its export file {name} is written by another sample of this export "
                                      "as well; the two would overwrite each other")
        path = self.root / name
        digest = sha256(data)
        present = self._present(name) if path.exists() or path.is_symlink() else None
        if present is not None or path.is_symlink():
            mine = self.recorded.get(name) == present
            if present == digest and (mine or not path.is_symlink()):
                self._open()
                self._this_run[name] = digest  # the same bytes: nothing to write (resume, or a rerun)
                self.result.unchanged.append(name)
                if not self.dry_run and not mine:
                    self._journal(name, digest)
                return
            if not mine or path.is_symlink():
                if foreign_ok:
                    self.result.kept.append(name)
                    return
                raise ConfigError(f"{path}: exists and was not written by latentcache's export (or was changed "
                                  "since); it is left as it is. Move it away, or export into another --to")
        self._this_run[name] = digest
        self.result.written.append(name)
        if not self.dry_run:
            self._put(path, name, data, digest)

    def _put(self, path: Path, name: str, data: bytes, digest: str) -> None:
        tmp_name = f"{name.rpartition('/')[0] + '/' if '/' in name else ''}.{path.name}.{os.getpid()}.lcx-tmp"
        tmp = self.root / tmp_name
        self._open()
        self._journal(name, digest, tmp_name)  # recorded before it exists: a kill at any point leaves it known
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise os_error(path, e, "write") from None
        self.recorded[name] = digest
        self._hashes[name] = digest

    def finish(self, extra: dict[str, Any] | None = None) -> ExportResult:
        """Remove the files earlier exports wrote here that this one did not write again (and only those whose
        bytes are still what was written), then write the marker: the record of exactly this export's files."""
        for name in sorted(set(self.recorded) - set(self._this_run)):
            if self.owns(name):
                self.result.removed.append(name)
                if not self.dry_run:
                    try:
                        (self.root / name).unlink()
                    except OSError as e:
                        raise os_error(self.root / name, e, "remove") from None
        if self.dry_run:
            return self.result
        self._open()
        record = {"trainer": self.trainer, "source": self.source, **(extra or {}),
                  "files": dict(sorted(self._this_run.items()))}
        marker = self.root / MARKER
        tmp = self.root / f".{MARKER}.{os.getpid()}.lcx-tmp"
        try:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, marker)
            (self.root / JOURNAL).unlink(missing_ok=True)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise os_error(marker, e, "write") from None
        return self.result


def _safe_relative(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and "\\" not in name and all(p not in ("", ".", "..")
                                                                                  for p in parts)
