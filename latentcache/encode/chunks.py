"""Planning at scale: a top-level plan made without opening a video, and one plan per chunk of inputs.

```
OUT/plan.json                      settings, VAE, fingerprint and the parts: for each, its inputs file's count and
                                   sha256, its chunk size, and each chunk's byte range and sha256 in that file
OUT/inputs/part-0000.jsonl         one input a line ({"caption", "path", "relpath"}, plus "spans", "extra" and
                                   "origin" for list rows that have them), in key order
OUT/inputs/part-0000.keys.npy      the part's sorted 8-byte key digests: duplicate and append checks, never strings
OUT/chunks/p0000/c000123.json      chunk 123's clips, bucket-pure shards and rejected inputs, and what each of its
                                   inputs was when it was probed (size, mtime, sha256: see `input_stat`)
OUT/shards/<bucket>/p0000-c000123-000000.tar
```

The top-level plan is a pure function of the input list, the settings and the earlier parts: no video is opened.
Inputs are ordered by the digest their keys start with (`clip_key`), so the order of a list does not matter and
duplicates sit next to each other. A chunk plan is a pure function of its chunk's lines and the settings: whichever
process probes the chunk writes the same bytes. Chunk `i` (counted over all parts) belongs to rank `i % world_size`.

A rerun checks each of its own chunks' inputs against what its chunk plan recorded: one stat an input, a digest only
where the stat differs (`plan_share`). A changed input is refused, naming it; `--reencode-changed` plans and encodes
again just the chunks that hold one. What a rerun's input list adds to the plan is `rerun_inputs`'.

Every name joined into a path is built from integers, or checked (`Bucket.parse`, `KEY`) when it is read back: a
plan file is data, and a crafted one must not write outside OUT.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import re
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentcache.encode import probing, reencode
from latentcache.encode.input_stats import Change, Stat, _compare_all, changed_error, input_stats
from latentcache.encode.inputs import duplicate_error, warn_duplicate
from latentcache.encode.plan import InputVideo, Plan, PlannedClip, PlannedShard, clip_key, input_id, make_plan
from latentcache.encode.settings import EncodeSettings
from latentcache.errors import ConfigError, ShardFormatError
from latentcache.format import strictjson
from latentcache.format.buckets import Bucket
from latentcache.format.out_layout import (
    MANIFEST_FILE,
    PLAN_FILE,
    chunk_plan_name,
    inputs_name,
    keys_name,
    plan_path,
    temporary_of,
)
from latentcache.format.shards import write_text_atomic
from latentcache.storage import store

log = logging.getLogger(__name__)

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


KEY = re.compile(r"[0-9a-f]{16}_[0-9]{4,6}")  # clip_key: index 0..999999 (plan caps clips per video)
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


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _read_part(d: Any, index: int, where: str) -> Part:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: part {index} {what}; the plan was damaged or not written by latentcache")

    if not isinstance(d, dict):
        raise bad("is not an object")
    if d.get("inputs") != inputs_name(index) or d.get("keys") != keys_name(index):
        raise bad(f"names {d.get('inputs')!r}, expected {inputs_name(index)!r}")
    count, size, sha = d.get("count"), d.get("chunk_size"), d.get("sha256")
    if not (_is_int(count) and _is_int(size, 1) and isinstance(sha, str) and SHA256.fullmatch(sha)):
        raise bad("has no valid count, chunk_size or sha256")
    chunks = d.get("chunks")
    if not isinstance(chunks, list) or len(chunks) != math.ceil(count / size):
        raise bad(f"lists {len(chunks) if isinstance(chunks, list) else 'no'} chunks for {count} inputs in chunks of "
                  f"{size}")
    offset = 0
    out: list[tuple[int, int, str]] = []
    for c in chunks:
        if not (isinstance(c, list) and len(c) == 3 and c[0] == offset and _is_int(c[1], 1)
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


def chunks_for_rank(plan: JobPlan, rank: int, world_size: int) -> list[ChunkRef]:
    """Round-robin over all parts' chunks: chunk i belongs to rank i % world_size. No coordination needed."""
    return [ref for ref in plan.chunk_refs() if ref.index % world_size == rank]


def _write_stream_atomic(path: Path, pieces: Iterable[bytes]) -> None:
    """Like shards.write_text_atomic, for a file too big to build in memory first (in object storage it is built in
    memory all the same: one PUT is the only atomic write there)."""
    if store.in_object_store(path):
        path.write_bytes(b"".join(pieces))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_of(path)
    with open(tmp, "wb") as f:
        for piece in pieces:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


# ------------------------------------------------------------------------------------------------- chunk plans


def find_input(out: Path, key: str) -> InputVideo | None:
    """The input a clip key came from (its absolute path now), by a binary search of each part's sorted key digests and
    one chunk read: O(log inputs), not a scan of the dataset. None when no part holds it."""
    found = find_input_record(out, key)
    return None if found is None else found[0]


def find_input_record(out: Path, key: str) -> tuple[InputVideo, Stat] | None:
    """`find_input`, with what the input was when its chunk was probed (None when not recorded or not probed)."""
    if not KEY.fullmatch(key):
        return None
    digest = np.uint64(int(key[:16], 16))
    plan = read_job_plan(out)
    refs = plan.chunk_refs()
    for part in plan.parts:
        digests = np.load(out / keys_name(part.index), allow_pickle=False)
        i = int(np.searchsorted(digests, digest))
        if i < len(digests) and digests[i] == digest:
            chunk = i // part.chunk_size
            ref = next(r for r in refs if r.part == part.index and r.chunk == chunk)
            at = i - chunk * part.chunk_size
            stats = read_chunk_stats(out, plan, ref) if (out / ref.plan_name).is_file() else None
            return read_chunk_inputs(out, ref)[at], None if stats is None else stats[at]
    return None


def read_chunk_inputs(out: Path, ref: ChunkRef) -> list[InputVideo]:
    """The chunk's lines only: one seek into its part's inputs file, checked against plan.json's sha256."""
    path = out / inputs_name(ref.part)
    with path.open("rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.size)
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise ConfigError(f"{path}: bytes {ref.offset}..{ref.offset + ref.size} (chunk {ref.chunk}) do not match "
                          "plan.json's sha256; the inputs file was changed after planning: use a new --out directory")
    inputs = []
    for n, line in enumerate(data.splitlines(), 1):
        inputs.append(read_input_line(line, path, n, f" of chunk {ref.chunk}"))
    if len(inputs) != ref.count:
        raise ConfigError(f"{path}: chunk {ref.chunk} holds {len(inputs)} inputs, plan.json says {ref.count}")
    return inputs


def read_input_line(line: bytes, path: Path, n: int, where: str = "") -> InputVideo:
    """One inputs-file line, or a ConfigError naming the file and line: the file is data, perhaps crafted."""
    try:
        row = strictjson.loads(line)
        video = input_from_line(row)
        if not (isinstance(video.path, str) and isinstance(video.relpath, str)):
            raise TypeError("path and relpath must be strings")
        return video
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: line {n}{where} is not an input latentcache wrote ({e}); the output directory "
                          "was damaged: use a new --out directory") from None


def make_chunk_plan(out: Path, plan: JobPlan, ref: ChunkRef, settings: EncodeSettings, *,
                    probe_fn: Callable[[str], probing.VideoInfo] | None = None, workers: int = 8,
                    strict: bool = False, inputs: list[InputVideo] | None = None) -> Plan:
    """Probe the chunk's inputs and lay their clips out in bucket-pure shards named from the chunk's numbers.
    `inputs`: the chunk's inputs when the caller has read them already."""
    inputs = read_chunk_inputs(out, ref) if inputs is None else inputs
    probe_fn = probe_fn or functools.partial(probing.probe, images=settings.clip.images)
    chunk = make_plan(inputs, settings, plan.vae, probe_fn=probe_fn, workers=workers, strict=strict)
    if chunk.fingerprint != plan.fingerprint:
        raise ConfigError(f"{out}: the settings now give fingerprint {chunk.fingerprint}, plan.json was made with "
                          f"{plan.fingerprint}; run with the settings the directory was made with")
    for shard in chunk.shards:
        shard.part, shard.chunk = ref.part, ref.chunk
    return chunk


def chunk_plan_json(plan: JobPlan, ref: ChunkRef, chunk: Plan, stats: list[Stat] | None = None) -> str:
    """The chunk plan's bytes. `stats`: what each input was when probed (`input_stat`), in the chunk's input order;
    left out when None (chunk plans made before they were recorded read back the same)."""
    d: dict[str, Any] = {"fingerprint": plan.fingerprint, "part": ref.part, "chunk": ref.chunk,
                         "inputs_sha256": ref.sha256, "clips": [asdict(c) for c in chunk.clips],
                         "shards": [{"bucket": s.bucket, "index": s.shard_id, "keys": s.keys} for s in chunk.shards],
                         "rejected": chunk.rejected}
    if stats is not None:
        d["input_stats"] = stats
    return json.dumps(d, indent=0, sort_keys=True, ensure_ascii=False, allow_nan=False)


def load_or_make_chunk_plan(out: Path, plan: JobPlan, ref: ChunkRef, settings: EncodeSettings, *,
                            probe_fn: Callable[[str], probing.VideoInfo] | None = None, strict: bool = False) -> Plan:
    """The chunk's plan from OUT/chunks/, or made now and written atomically (the same bytes whoever makes it).
    Reads an existing one as it is: `plan_share` is the rerun that also checks the inputs against it."""
    path = out / ref.plan_name
    if path.is_file():
        return read_chunk_plan(out, plan, ref)
    return _make_and_write(out, plan, ref, settings, probe_fn=probe_fn, strict=strict)


def _make_and_write(out: Path, plan: JobPlan, ref: ChunkRef, settings: EncodeSettings, *,
                    probe_fn: Callable[[str], probing.VideoInfo] | None, strict: bool) -> Plan:
    inputs = read_chunk_inputs(out, ref)
    # Before probing: a file replaced after its stat was taken is seen as changed on the next run, never missed.
    stats = input_stats([v.path for v in inputs])
    chunk = make_chunk_plan(out, plan, ref, settings, probe_fn=probe_fn, strict=strict, inputs=inputs)
    path = out / ref.plan_name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, chunk_plan_json(plan, ref, chunk, stats))
    return chunk


def read_chunk_plan(out: Path, plan: JobPlan, ref: ChunkRef) -> Plan:
    """Parse and check a chunk plan: keys, buckets and numbers become shard paths and tar member names."""
    return _read_chunk_file(out, plan, ref)[0]


def read_chunk_stats(out: Path, plan: JobPlan, ref: ChunkRef) -> list[Stat] | None:
    """What the chunk's inputs were when probed, in its input order (None: a chunk plan made before they were)."""
    return _read_chunk_file(out, plan, ref)[1]


def _read_chunk_file(out: Path, plan: JobPlan, ref: ChunkRef) -> tuple[Plan, list[Stat] | None]:
    """The chunk plan and its inputs' recorded stats (None: a chunk plan made before they were recorded)."""
    path = out / ref.plan_name
    try:
        d = strictjson.loads(path.read_bytes())
        chunk = _chunk_from_dict(d, plan, ref)
        stats = d.get("input_stats")
        if stats is not None and not (isinstance(stats, list) and len(stats) == ref.count
                                      and all(s is None or isinstance(s, dict) for s in stats)):
            raise ValueError(f"input_stats is not one record (or null) for each of its {ref.count} inputs")
        return chunk, stats
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ShardFormatError(f"{path}: not a chunk plan of this directory ({e}); delete it and run the encode "
                               "again to plan the chunk again") from None


# ------------------------------------------------------------------------------------- inputs changed in place





















def plan_share(out: Path, plan: JobPlan, refs: list[ChunkRef], settings: EncodeSettings, *,
               probe_fn: Callable[[str], probing.VideoInfo] | None = None, strict: bool = False,
               reencode_changed: bool = False, workers: int = 8) -> list[Plan]:
    """The chunk plans of `refs` (one rank's share): read, or made now. An existing plan's inputs are checked
    against the stats it recorded: a changed input is refused (ConfigError naming each) before anything is written,
    or with `reencode_changed` its chunk's shards and plan are removed and the chunk is planned again from the
    inputs as they are now. Stats of inputs only touched are refreshed in place (same plan, new stats)."""
    found: list[tuple[ChunkRef, Plan | None, list[Stat] | None]] = []
    items: list[tuple[str, Stat]] = []
    for ref in refs:
        if not (out / ref.plan_name).is_file():
            found.append((ref, None, None))
            continue
        chunk, stats = _read_chunk_file(out, plan, ref)
        found.append((ref, chunk, stats))
        if stats is not None:
            items.extend(zip((v.path for v in read_chunk_inputs(out, ref)), stats, strict=True))
    results = iter(_compare_all(items, workers))
    changes: list[Change] = []
    redo: dict[int, list[tuple[Change | None, Stat]]] = {}
    refresh: list[tuple[ChunkRef, Plan, list[Stat]]] = []
    for ref, chunk, stats in found:
        if chunk is None or stats is None:
            continue
        now = [next(results) for _ in stats]
        mine = [c for c, _ in now if c is not None]
        if mine:
            changes.extend(mine)
            redo[ref.index] = now
        elif any(new is not old for (_, new), old in zip(now, stats, strict=True)):
            refresh.append((ref, chunk, [new for _, new in now]))
    if changes and not reencode_changed:
        raise changed_error(out, changes, len(redo))
    for ref, chunk, stats in refresh:
        write_text_atomic(out / ref.plan_name, chunk_plan_json(plan, ref, chunk, stats))
    if changes:
        log.warning("%d changed input(s) in %d chunk(s): planning and encoding those chunks again", len(changes),
                    len(redo))
        # Readers start at the manifest: it goes before any shard it names, and finalize writes it again.
        (out / MANIFEST_FILE).unlink(missing_ok=True)
    plans = []
    for ref, chunk, _ in found:
        if chunk is not None and ref.index in redo:
            chunk = _reencode(out, plan, ref, settings, chunk, redo[ref.index], probe_fn=probe_fn, strict=strict)
        plans.append(chunk if chunk is not None else
                     _make_and_write(out, plan, ref, settings, probe_fn=probe_fn, strict=strict))
    return plans


def _reencode(out: Path, plan: JobPlan, ref: ChunkRef, settings: EncodeSettings, chunk: Plan,
              now: list[tuple[Change | None, Stat]], *, probe_fn: Callable[[str], probing.VideoInfo] | None,
              strict: bool) -> Plan:
    """Only the changed inputs of the chunk planned and encoded again; the others' samples kept (`reencode`)."""
    inputs = read_chunk_inputs(out, ref)
    changed = {c.path for c, _ in now if c is not None}
    stats = reencode.changed_stats(inputs, [s for _, s in now], changed)
    new = reencode.replan(chunk, (ref.part, ref.chunk), inputs, changed, settings, probe_fn=probe_fn, strict=strict)

    def write(p: Plan, stats: list[Stat]) -> None:
        write_text_atomic(out / ref.plan_name, chunk_plan_json(plan, ref, p, stats))

    return reencode.reencode_chunk(out, (ref.part, ref.chunk), chunk, new, stats, changed, write)


def _chunk_from_dict(d: dict[str, Any], plan: JobPlan, ref: ChunkRef) -> Plan:
    if d["fingerprint"] != plan.fingerprint or d["inputs_sha256"] != ref.sha256:
        raise ValueError("made under another plan.json (fingerprint or inputs differ)")
    if d["part"] != ref.part or d["chunk"] != ref.chunk:
        raise ValueError(f"it says part {d['part']!r} chunk {d['chunk']!r}")
    clips = []
    for c in d["clips"]:
        clip = PlannedClip(**c)
        if not (isinstance(clip.relpath, str) and _is_int(clip.index) and clip.key == clip_key(clip.relpath, clip.index)
                and Bucket.parse_or_none(clip.bucket) is not None and isinstance(clip.source, str)
                and isinstance(clip.start, (int, float)) and (clip.caption is None or isinstance(clip.caption, str))):
            raise ValueError(f"clip {str(c)[:200]} is malformed (key, bucket, index, source or start)")
        clips.append(clip)
    buckets = {c.key: c.bucket for c in clips}
    if len(buckets) != len(clips):
        raise ValueError("a clip key appears twice")
    shards, placed = [], 0
    for i, s in enumerate(d["shards"]):
        keys = s["keys"]
        if s["index"] != i or Bucket.parse_or_none(s["bucket"]) is None or not isinstance(keys, list):
            raise ValueError(f"shard {i} is malformed (index, bucket or keys)")
        if not all(isinstance(k, str) and KEY.fullmatch(k) and buckets.get(k) == s["bucket"] for k in keys):
            raise ValueError(f"shard {i} holds keys that are not clips of its bucket {s['bucket']}")
        placed += len(keys)
        shards.append(PlannedShard(i, s["bucket"], keys, ref.part, ref.chunk))
    if placed != len(clips) or len({k for s in shards for k in s.keys}) != len(clips):
        raise ValueError("its shards do not hold each clip exactly once")
    rejected = d["rejected"]
    if not (isinstance(rejected, list) and all(isinstance(r, dict) for r in rejected)):
        raise ValueError("rejected is not a list of records")
    return Plan(plan.fingerprint, plan.settings, plan.vae, clips, shards, rejected)
