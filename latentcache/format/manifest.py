"""manifest.json: written last, after every sidecar; the one file readers start from. `Manifest` is its typed record:
finalize fills one and `write_manifest` writes it; `Manifest.read` reads one (bounded) and parses it once, after the
structural check of a manifest read from a stranger (`read_manifest`, which gives the checked JSON object itself)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from latentcache.errors import ShardFormatError
from latentcache.format import strictjson
from latentcache.format.layout import FORMAT_VERSION, SHA256_HEX
from latentcache.format.manifest_fields import field_problems, normalized
from latentcache.format.out_layout import MANIFEST_FILE
from latentcache.format.reader import is_int, shown
from latentcache.format.shards import write_json_atomic
from latentcache.storage import location


class ShardEntry(NamedTuple):
    """One shard as the manifest lists it. A NamedTuple: an output of 156k shards makes 156k of these when opened."""

    path: str  # relative to the output's root (format/out_layout.py's shard_name)
    bucket: str
    samples: int
    bytes: int
    sha256: str | None = None  # every manifest latentcache writes has it; a stranger's may leave it out

    def to_json(self) -> dict[str, Any]:
        entry = {"path": self.path, "bucket": self.bucket, "samples": self.samples, "bytes": self.bytes}
        return entry if self.sha256 is None else {**entry, "sha256": self.sha256}


# The manifest's fields in the order finalize has always written them (the file's keys are sorted all the same).
FIELDS = ("latent_spec", "vae", "dtype", "settings", "fingerprint", "counts", "buckets", "shards", "software")


@dataclass(frozen=True, slots=True)
class Manifest:
    """manifest.json as a record. Read (`Manifest.read`), the informational objects are always there (`{}`, `[]`
    where the file leaves them out or null: manifest_fields.normalized); keys this latentcache does not know are kept
    in `extra`, as they always were, and read by nothing. Written, a field left None is left out of the file (the
    benchmarks' synthetic outputs write only some)."""

    latent_spec: dict[str, Any]
    shards: tuple[ShardEntry, ...]
    vae: dict[str, Any] | None = None
    dtype: str | None = None
    settings: dict[str, Any] | None = None
    fingerprint: Any = None  # the settings' hash; not checked, as nothing reads it back
    counts: dict[str, Any] | None = None
    buckets: dict[str, int] | None = None
    software: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def clip(self) -> dict[str, Any]:
        """settings.clip: frames, fps, size and resize mode of the encoded clips ({} where not recorded)."""
        return (self.settings or {}).get("clip") or {}

    def to_json(self) -> dict[str, Any]:
        """The JSON object written: format_version, then every field that is set, then `extra`."""
        document: dict[str, Any] = {"format_version": FORMAT_VERSION}
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None:
                document[name] = [s.to_json() for s in value] if name == "shards" else value
        return {**document, **self.extra}

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Manifest:
        """The record of a manifest `read_manifest` checked and normalized."""
        known = {name: document[name] for name in FIELDS if name in document and name != "shards"}
        shards = tuple(ShardEntry(s["path"], s["bucket"], s["samples"], s["bytes"], s.get("sha256"))
                       for s in document["shards"])
        extra = {k: v for k, v in document.items() if k not in FIELDS and k != "format_version"}
        return cls(shards=shards, extra=extra, **known)

    @classmethod
    def read(cls, root: Path | str) -> Manifest:
        """The manifest of the dataset in `root` (a directory or an object-storage url), checked and parsed once;
        refused with the file and the reason unless latentcache wrote it (see `read_manifest`)."""
        return cls.from_document(read_manifest(root))

    def counts_problem(self, where: str | Path) -> str | None:
        """When `counts.samples` disagrees with the shards' sample counts: the message naming both. `verify` reports
        it and the dataset refuses it, alike."""
        recorded = (self.counts or {}).get("samples")
        listed = sum(s.samples for s in self.shards)
        if recorded is not None and recorded != listed:
            return f"{where}/{MANIFEST_FILE}: counts.samples is {recorded}, its shards list {listed}"
        return None


def write_manifest(out: Path, manifest: Manifest) -> Path:
    """No timestamp: the manifest is a function of the shards, so a resumed run's is byte-identical to a clean one's."""
    path = out / MANIFEST_FILE
    write_json_atomic(path, manifest.to_json())
    return path


def read_manifest(root: Path | str) -> dict[str, Any]:
    """The manifest of the dataset in `root` (a directory, or an object-storage url such as s3://bucket/latents) as
    the JSON object it holds, refused with the file and the reason unless it is one latentcache wrote: an object with
    format_version 1, a usable latent spec, and a list of well-formed shard entries. Readers take `Manifest.read`."""
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
    return normalized(manifest)


def _manifest_bytes(root: Path | str) -> tuple[str | Path, bytes]:
    """(where, up to MAX_MANIFEST_BYTES + 1 bytes of manifest.json) from a directory or an object-storage url."""
    missing = (f"{root}: no manifest.json (is this a latentcache output directory, and did `latentcache encode` "
               "finish? `latentcache finalize DIR` writes it from the shards)")
    path: str | Path = location.join(str(root), MANIFEST_FILE)
    try:
        path = location.resolve(str(root)) / MANIFEST_FILE
        return path, location.read(path, MAX_MANIFEST_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        raise ShardFormatError(missing) from None
    except OSError as e:
        raise ShardFormatError(f"{path}: cannot read ({e.strerror or e})") from e


# A manifest lists one small record per shard: 256 MiB holds over a million shards.
MAX_MANIFEST_BYTES = 256 << 20


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """What in a parsed manifest the readers could not use (wrong types, unknown bucket names...); [] if fine."""
    from latentcache.format.checks import parse_bucket, spec_problems

    if "latent_spec" not in manifest:
        return ["no latent_spec"]
    problems = spec_problems(manifest["latent_spec"]) + field_problems(manifest)
    if isinstance(manifest.get("buckets"), dict):
        problems += [f"buckets has {shown(b)}, expected FRAMESxHEIGHTxWIDTH such as 49x480x720"
                     for b in manifest["buckets"] if parse_bucket(b) is None][:1]
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return [*problems, f"shards is {shown(shards)}, expected a list of shard records"]
    seen: set[str] = set()
    for i, entry in enumerate(shards):
        problem = _shard_entry_problem(entry)
        if problem is None and entry["path"] in seen:
            problem = f"path {shown(entry['path'])} is listed twice"
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
        return f"is {shown(entry)}, expected an object with path, bucket, samples, bytes, sha256"
    if not (isinstance(entry.get("path"), str) and entry["path"]):
        return f"has path {shown(entry.get('path'))}, expected a relative path such as shards/17x64x96/000000.tar"
    if not (isinstance(entry.get("bucket"), str) and _bucket_name_ok(entry["bucket"])):
        return f"has bucket {shown(entry.get('bucket'))}, expected FRAMESxHEIGHTxWIDTH such as 49x480x720"
    for name in ("samples", "bytes"):
        if not (is_int(entry.get(name)) and entry[name] >= 0):
            return f"has {name} {shown(entry.get(name))}, expected a count"
    sha = entry.get("sha256")
    if sha is not None and not (isinstance(sha, str) and SHA256_HEX.match(sha)):
        return f"has sha256 {shown(sha)}, expected 64 lowercase hex digits"
    return None
