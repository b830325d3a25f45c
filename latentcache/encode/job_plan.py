"""The job's top-level plan, made without opening a video: OUT/plan.json and the inputs files of its parts.

```
OUT/plan.json                      settings, VAE, fingerprint and the parts: for each, its inputs file's count and
                                   sha256, its chunk size, and each chunk's byte range and sha256 in that file
OUT/inputs/part-0000.jsonl         one input a line ({"caption", "path", "relpath"}, plus "spans", "extra" and
                                   "origin" for list rows that have them), in key order
OUT/inputs/part-0000.keys.npy      the part's sorted 8-byte key digests: duplicate and append checks, never strings
```

The top-level plan is a pure function of the input list, the settings and the earlier parts: no video is opened.
Inputs are ordered by the digest their keys start with (`clip_key`), so the order of a list does not matter and
duplicates sit next to each other. Chunk `i` (counted over all parts) belongs to rank `i % world_size`; each chunk's
own plan is chunks.py's.

Every name joined into a path is built from integers, or checked when it is read back: a plan file is data, and a
crafted one must not write outside OUT.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentcache.encode.chunk_plan import InputVideo, input_id
from latentcache.encode.inputs import duplicate_error, warn_duplicate
from latentcache.errors import ConfigError
from latentcache.format import strictjson
from latentcache.format.out_layout import (
    PLAN_FILE,
    chunk_plan_name,
    inputs_name,
    keys_name,
    plan_path,
    temporary_of,
)
from latentcache.storage import location

PLAN_FORMAT = 2
DEFAULT_CHUNK_SIZE = 1000
# Kept for plans made before the world-size rule: they record their own chunk size, so nothing reads this now.
MIN_CHUNKS = 256
# With more than one process, this many chunks per process where chunks stay at least MIN_CHUNK_INPUTS long, so a
# rank that finishes early takes the next chunk and late ranks balance.
CHUNKS_PER_RANK = 4
# No default chunk is cut smaller than this for balance: batches and shards never cross a chunk, so a tiny chunk means
# part-filled batches and one-sample shards.
MIN_CHUNK_INPUTS = 64


def auto_chunk_size(inputs: int, world_size: int = 1) -> int:
    """The default chunk size, from the input count and the job's process count (all array tasks' processes).

    One process: one chunk of up to DEFAULT_CHUNK_SIZE inputs (24 videos: one chunk, so batches fill). More
    processes: CHUNKS_PER_RANK chunks per process, unless that makes chunks shorter than MIN_CHUNK_INPUTS; then
    chunks of MIN_CHUNK_INPUTS, or one chunk per process where even that leaves a process without work. Never more
    than DEFAULT_CHUNK_SIZE. Every process of one job computes the same number (the same inputs and world size).
    """
    world_size = max(1, world_size)
    per_rank = -(-inputs // world_size)
    if world_size == 1:
        size = per_rank
    else:
        balanced = -(-inputs // (world_size * CHUNKS_PER_RANK))
        size = balanced if balanced >= MIN_CHUNK_INPUTS else min(per_rank, MIN_CHUNK_INPUTS)
    return max(1, min(DEFAULT_CHUNK_SIZE, size))


SHA256 = re.compile(r"[0-9a-f]{64}")


def key_digest(relpath: str) -> int:
    """The 8 bytes `clip_key` shows as 16 hex digits, as an integer: ordering by it is ordering by key."""
    return int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big")


# --------------------------------------------------------------------------------------------------- the inputs


# One encoder for every line: json.dumps with arguments builds a new JSONEncoder per call, which costs more than the
# encoding itself when it runs millions of times. Same bytes as json.dumps(..., ensure_ascii=False, sort_keys=True).
# allow_nan=False: an inputs line is always JSON (readers map NaN and 1e999 to null before it gets here).
_LINE_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, allow_nan=False)


class InputTable:
    """Inputs held compactly: each one JSON line in one bytearray, plus its 8-byte digest; sorted by digest.

    About 130 bytes an input instead of the ~600 of a dict of InputVideo objects: 10M inputs fit in ~1.5 GB.
    Duplicate relative paths are found among equal digests (neighbours once sorted), never with a dict of strings.
    """

    def __init__(self, inputs: Iterable[InputVideo]) -> None:
        buf, ends, digests = bytearray(), array("q"), array("Q")
        # Whether a list's row took its caption from a sidecar file, which the list's identity does not cover.
        self.sidecar_captions = False
        for v in inputs:
            self.sidecar_captions = self.sidecar_captions or v.caption_from_sidecar
            buf += _LINE_ENCODER.encode(input_line(v)).encode() + b"\n"
            ends.append(len(buf))
            digests.append(key_digest(input_id(v)))
        self._buf = buf
        self._ends = np.frombuffer(ends, dtype=np.int64) if len(ends) else np.zeros(0, np.int64)
        raw = np.frombuffer(digests, dtype=np.uint64) if len(digests) else np.zeros(0, np.uint64)
        order = np.argsort(raw, kind="stable")
        ordered = raw[order]
        keep = np.ones(len(order), dtype=bool)
        for i in np.nonzero(ordered[1:] == ordered[:-1])[0] + 1:
            first, second = json.loads(self._raw_line(order[i - 1])), json.loads(self._raw_line(order[i]))
            if (first["relpath"] != second["relpath"] or first["path"] != second["path"]
                    or first.get("spans") != second.get("spans")):
                raise duplicate_error(second["relpath"], first["path"], second["path"])
            warn_duplicate(second["path"], first["caption"], second["caption"])
            keep[i] = False  # the same file given twice: one input, the first
        self._order = order[keep]
        self.digests = ordered[keep]

    def __len__(self) -> int:
        return len(self._order)

    def _raw_line(self, i: int) -> bytes:
        start = int(self._ends[i - 1]) if i else 0
        return bytes(self._buf[start : int(self._ends[i])])

    def line(self, position: int) -> bytes:
        """The input at `position` in digest order, as its inputs-file line."""
        return self._raw_line(int(self._order[position]))


def input_line(v: InputVideo) -> dict[str, Any]:
    """An input as its inputs-file line. `spans`, `extra` and `origin` appear only when set, so a plain input's line
    is what it was before they existed (and older inputs files read back unchanged)."""
    line: dict[str, Any] = {"caption": list(v.caption) if isinstance(v.caption, tuple) else v.caption,
                            "path": v.path, "relpath": v.relpath}
    if v.spans is not None:
        line["spans"] = [[start, end] for start, end in v.spans]
    if v.extra:
        line["extra"] = v.extra
    if v.origin:
        line["origin"] = v.origin
    return line


def input_from_line(row: dict[str, Any]) -> InputVideo:
    caption = row["caption"]
    spans = row.get("spans")
    return InputVideo(row["path"], row["relpath"], tuple(caption) if isinstance(caption, list) else caption,
                      None if spans is None else tuple((float(s), None if e is None else float(e)) for s, e in spans),
                      row.get("extra"), row.get("origin"))


# ----------------------------------------------------------------------------------------- the top-level plan


@dataclass(slots=True, frozen=True)
class ChunkRef:
    """Where one chunk's inputs are: a byte range of its part's inputs file, with the sha256 of those bytes."""

    index: int  # over all parts: chunk `index` belongs to rank index % world_size
    part: int
    chunk: int
    offset: int
    size: int
    sha256: str
    count: int

    @property
    def plan_name(self) -> str:
        return chunk_plan_name(self.part, self.chunk)


@dataclass(slots=True)
class Part:
    """One planning round's new inputs: the first run's, then one more per append."""

    index: int
    count: int
    sha256: str
    chunk_size: int
    chunks: list[tuple[int, int, str]]  # (byte offset, byte size, sha256) of each chunk's lines

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": inputs_name(self.index), "keys": keys_name(self.index), "count": self.count,
                "sha256": self.sha256, "chunk_size": self.chunk_size, "chunks": [list(c) for c in self.chunks]}


@dataclass(slots=True)
class JobPlan:
    fingerprint: str
    settings: dict[str, Any]
    vae: dict[str, Any]
    parts: list[Part]

    @property
    def inputs(self) -> int:
        return sum(p.count for p in self.parts)

    def chunk_refs(self) -> list[ChunkRef]:
        refs: list[ChunkRef] = []
        for part in self.parts:
            for c, (offset, size, sha) in enumerate(part.chunks):
                count = min(part.chunk_size, part.count - c * part.chunk_size)
                refs.append(ChunkRef(len(refs), part.index, c, offset, size, sha, count))
        return refs

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "fingerprint": self.fingerprint, "settings": self.settings,
                           "vae": self.vae, "parts": [p.to_dict() for p in self.parts]}, indent=1, sort_keys=True,
                          allow_nan=False)

    @staticmethod
    def from_json(text: str, where: str = PLAN_FILE) -> JobPlan:
        """Parse and check plan.json: every number a path or a seek is made from must be what make wrote."""
        try:
            d = strictjson.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not JSON ({e.msg})") from None
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise ConfigError(f"{where} is not a latentcache plan of format {PLAN_FORMAT} (found format "
                              f"{d.get('format') if isinstance(d, dict) else None!r}); it was written by another "
                              "version: use a new --out directory")
        if not (isinstance(d.get("fingerprint"), str) and isinstance(d.get("settings"), dict)
                and isinstance(d.get("vae"), dict) and isinstance(d.get("parts"), list)):
            raise ConfigError(f"{where}: fingerprint, settings, vae or parts is missing or of the wrong type")
        return JobPlan(d["fingerprint"], d["settings"], d["vae"],
                       [_read_part(p, i, where) for i, p in enumerate(d["parts"])])


def is_count(value: Any, low: int = 0) -> bool:
    """A whole number (never a bool) of at least `low`: what a count or index read from a plan file must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _read_part(d: Any, index: int, where: str) -> Part:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: part {index} {what}; the plan was damaged or not written by latentcache")

    if not isinstance(d, dict):
        raise bad("is not an object")
    if d.get("inputs") != inputs_name(index) or d.get("keys") != keys_name(index):
        raise bad(f"names {d.get('inputs')!r}, expected {inputs_name(index)!r}")
    count, size, sha = d.get("count"), d.get("chunk_size"), d.get("sha256")
    if not (is_count(count) and is_count(size, 1) and isinstance(sha, str) and SHA256.fullmatch(sha)):
        raise bad("has no valid count, chunk_size or sha256")
    chunks = d.get("chunks")
    if not isinstance(chunks, list) or len(chunks) != math.ceil(count / size):
        raise bad(f"lists {len(chunks) if isinstance(chunks, list) else 'no'} chunks for {count} inputs in chunks of "
                  f"{size}")
    offset = 0
    out: list[tuple[int, int, str]] = []
    for c in chunks:
        if not (isinstance(c, list) and len(c) == 3 and c[0] == offset and is_count(c[1], 1)
                and isinstance(c[2], str) and SHA256.fullmatch(c[2])):
            raise bad(f"chunk {len(out)} is not [offset {offset}, size, sha256]: {c!r}")
        out.append((c[0], c[1], c[2]))
        offset += c[1]
    return Part(index, count, sha, size, out)


def read_job_plan(out: Path) -> JobPlan:
    path = plan_path(out)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 JSON (byte {e.start}); the plan was damaged or not written by "
                          "latentcache") from None
    return JobPlan.from_json(text, str(path))


def chunks_for_rank(job_plan: JobPlan, rank: int, world_size: int) -> list[ChunkRef]:
    """Round-robin over all parts' chunks: chunk i belongs to rank i % world_size. No coordination needed."""
    return [ref for ref in job_plan.chunk_refs() if ref.index % world_size == rank]


def _write_stream_atomic(path: Path, pieces: Iterable[bytes]) -> None:
    """Like shards.write_text_atomic, for a file too big to build in memory first (in object storage it is built in
    memory all the same: one PUT is the only atomic write there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with location.atomic_writer(path, temporary_of) as f:
        for piece in pieces:
            f.write(piece)


def make_part(out: Path, index: int, table: InputTable, positions: np.ndarray, chunk_size: int) -> Part:
    """Write the inputs at `positions` (digest order) as part `index`: its inputs file, keys file, chunk ranges."""
    whole = hashlib.sha256()
    chunks: list[tuple[int, int, str]] = []
    state = {"offset": 0}

    def lines() -> Iterator[bytes]:
        for start in range(0, len(positions), chunk_size):
            piece = b"".join(table.line(int(p)) for p in positions[start : start + chunk_size])
            whole.update(piece)
            chunks.append((state["offset"], len(piece), hashlib.sha256(piece).hexdigest()))
            state["offset"] += len(piece)
            yield piece

    _write_stream_atomic(out / inputs_name(index), lines())
    keys_path = out / keys_name(index)
    buffer = io.BytesIO()
    np.save(buffer, table.digests[positions], allow_pickle=False)
    _write_stream_atomic(keys_path, [buffer.getvalue()])
    return Part(index, len(positions), whole.hexdigest(), chunk_size, chunks)


def part_digests(out: Path, part: Part) -> np.ndarray:
    path = out / keys_name(part.index)
    try:
        with path.open("rb") as f:
            digests = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the part's key digests ({e}); the output directory is incomplete: "
                          "use a new --out directory") from None
    if digests.dtype != np.uint64 or digests.shape != (part.count,):
        raise ConfigError(f"{path}: {digests.dtype} {digests.shape}, expected uint64 ({part.count},)")
    return digests
