"""The chunk plans: one per chunk of the job's inputs, made by whichever process probes that chunk.

```
OUT/chunks/p0000/c000123.json      chunk 123's clips, bucket-pure shards and rejected inputs, and what each of its
                                   inputs was when it was probed (size, mtime, sha256: see `input_stat`)
OUT/shards/<bucket>/p0000-c000123-000000.tar
```

A chunk plan is a pure function of its chunk's lines (job_plan.py's inputs files) and the settings: whichever
process probes the chunk writes the same bytes.

A rerun checks each of its own chunks' inputs against what its chunk plan recorded: one stat an input, a digest only
where the stat differs (`plan_share`). A changed input is refused, naming it; `--reencode-changed` plans and encodes
again just the chunks that hold one. What a rerun's input list adds to the plan is `rerun_inputs`'.

Every name joined into a path is built from integers, or checked (`Bucket.parse`, `KEY`) when it is read back: a
plan file is data, and a crafted one must not write outside OUT.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from latentcache.encode import reencode
from latentcache.encode.chunk_plan import ChunkPlan, InputVideo, PlannedClip, PlannedShard, clip_key, make_plan
from latentcache.encode.decoding import probing
from latentcache.encode.input_stats import Change, Stat, changed_error, compare_all, input_stats
from latentcache.encode.job_plan import ChunkRef, JobPlan, input_from_line, is_count, read_job_plan
from latentcache.encode.settings import EncodeSettings
from latentcache.errors import ConfigError, ShardFormatError
from latentcache.format import strictjson
from latentcache.format.buckets import Bucket
from latentcache.format.out_layout import (
    MANIFEST_FILE,
    inputs_name,
    keys_name,
)
from latentcache.format.shards import write_text_atomic

log = logging.getLogger(__name__)

KEY = re.compile(r"[0-9a-f]{16}_[0-9]{4,6}")  # clip_key: index 0..999999 (plan caps clips per video)


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


def make_chunk_plan(out: Path, job_plan: JobPlan, ref: ChunkRef, settings: EncodeSettings, *,
                    probe_fn: Callable[[str], probing.VideoInfo] | None = None, workers: int = 8,
                    strict: bool = False, inputs: list[InputVideo] | None = None) -> ChunkPlan:
    """Probe the chunk's inputs and lay their clips out in bucket-pure shards named from the chunk's numbers.
    `inputs`: the chunk's inputs when the caller has read them already."""
    inputs = read_chunk_inputs(out, ref) if inputs is None else inputs
    probe_fn = probe_fn or functools.partial(probing.probe, images=settings.clip.images)
    chunk = make_plan(inputs, settings, job_plan.vae, probe_fn=probe_fn, workers=workers, strict=strict)
    if chunk.fingerprint != job_plan.fingerprint:
        raise ConfigError(f"{out}: the settings now give fingerprint {chunk.fingerprint}, plan.json was made with "
                          f"{job_plan.fingerprint}; run with the settings the directory was made with")
    for shard in chunk.shards:
        shard.part, shard.chunk = ref.part, ref.chunk
    return chunk


def chunk_plan_json(job_plan: JobPlan, ref: ChunkRef, chunk: ChunkPlan, stats: list[Stat] | None = None) -> str:
    """The chunk plan's bytes. `stats`: what each input was when probed (`input_stat`), in the chunk's input order;
    left out when None (chunk plans made before they were recorded read back the same)."""
    d: dict[str, Any] = {"fingerprint": job_plan.fingerprint, "part": ref.part, "chunk": ref.chunk,
                         "inputs_sha256": ref.sha256, "clips": [asdict(c) for c in chunk.clips],
                         "shards": [{"bucket": s.bucket, "index": s.shard_id, "keys": s.keys} for s in chunk.shards],
                         "rejected": chunk.rejected}
    if stats is not None:
        d["input_stats"] = stats
    return json.dumps(d, indent=0, sort_keys=True, ensure_ascii=False, allow_nan=False)


def load_or_make_chunk_plan(out: Path, job_plan: JobPlan, ref: ChunkRef, settings: EncodeSettings, *,
                            probe_fn: Callable[[str], probing.VideoInfo] | None = None,
                            strict: bool = False) -> ChunkPlan:
    """The chunk's plan from OUT/chunks/, or made now and written atomically (the same bytes whoever makes it).
    Reads an existing one as it is: `plan_share` is the rerun that also checks the inputs against it."""
    path = out / ref.plan_name
    if path.is_file():
        return read_chunk_plan(out, job_plan, ref)
    return _make_and_write(out, job_plan, ref, settings, probe_fn=probe_fn, strict=strict)


def _make_and_write(out: Path, job_plan: JobPlan, ref: ChunkRef, settings: EncodeSettings, *,
                    probe_fn: Callable[[str], probing.VideoInfo] | None, strict: bool) -> ChunkPlan:
    inputs = read_chunk_inputs(out, ref)
    # Before probing: a file replaced after its stat was taken is seen as changed on the next run, never missed.
    stats = input_stats([v.path for v in inputs])
    chunk = make_chunk_plan(out, job_plan, ref, settings, probe_fn=probe_fn, strict=strict, inputs=inputs)
    path = out / ref.plan_name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, chunk_plan_json(job_plan, ref, chunk, stats))
    return chunk


def read_chunk_plan(out: Path, job_plan: JobPlan, ref: ChunkRef) -> ChunkPlan:
    """Parse and check a chunk plan: keys, buckets and numbers become shard paths and tar member names."""
    return _read_chunk_file(out, job_plan, ref)[0]


def read_chunk_stats(out: Path, job_plan: JobPlan, ref: ChunkRef) -> list[Stat] | None:
    """What the chunk's inputs were when probed, in its input order (None: a chunk plan made before they were)."""
    return _read_chunk_file(out, job_plan, ref)[1]


def _read_chunk_file(out: Path, job_plan: JobPlan, ref: ChunkRef) -> tuple[ChunkPlan, list[Stat] | None]:
    """The chunk plan and its inputs' recorded stats (None: a chunk plan made before they were recorded)."""
    path = out / ref.plan_name
    try:
        d = strictjson.loads(path.read_bytes())
        chunk = _chunk_from_dict(d, job_plan, ref)
        stats = d.get("input_stats")
        if stats is not None and not (isinstance(stats, list) and len(stats) == ref.count
                                      and all(s is None or isinstance(s, dict) for s in stats)):
            raise ValueError(f"input_stats is not one record (or null) for each of its {ref.count} inputs")
        return chunk, stats
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ShardFormatError(f"{path}: not a chunk plan of this directory ({e}); delete it and run the encode "
                               "again to plan the chunk again") from None




def plan_share(out: Path, job_plan: JobPlan, refs: list[ChunkRef], settings: EncodeSettings, *,
               probe_fn: Callable[[str], probing.VideoInfo] | None = None, strict: bool = False,
               reencode_changed: bool = False, workers: int = 8) -> list[ChunkPlan]:
    """The chunk plans of `refs` (one rank's share): read, or made now. An existing plan's inputs are checked
    against the stats it recorded: a changed input is refused (ConfigError naming each) before anything is written,
    or with `reencode_changed` its chunk's shards and plan are removed and the chunk is planned again from the
    inputs as they are now. Stats of inputs only touched are refreshed in place (same plan, new stats)."""
    found: list[tuple[ChunkRef, ChunkPlan | None, list[Stat] | None]] = []
    items: list[tuple[str, Stat]] = []
    for ref in refs:
        if not (out / ref.plan_name).is_file():
            found.append((ref, None, None))
            continue
        chunk, stats = _read_chunk_file(out, job_plan, ref)
        found.append((ref, chunk, stats))
        if stats is not None:
            items.extend(zip((v.path for v in read_chunk_inputs(out, ref)), stats, strict=True))
    results = iter(compare_all(items, workers))
    changes: list[Change] = []
    redo: dict[int, list[tuple[Change | None, Stat]]] = {}
    refresh: list[tuple[ChunkRef, ChunkPlan, list[Stat]]] = []
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
        write_text_atomic(out / ref.plan_name, chunk_plan_json(job_plan, ref, chunk, stats))
    if changes:
        log.warning("%d changed input(s) in %d chunk(s): planning and encoding those chunks again", len(changes),
                    len(redo))
        # Readers start at the manifest: it goes before any shard it names, and finalize writes it again.
        (out / MANIFEST_FILE).unlink(missing_ok=True)
    plans = []
    for ref, chunk, _ in found:
        if chunk is not None and ref.index in redo:
            chunk = _reencode(out, job_plan, ref, settings, chunk, redo[ref.index], probe_fn=probe_fn, strict=strict)
        plans.append(chunk if chunk is not None else
                     _make_and_write(out, job_plan, ref, settings, probe_fn=probe_fn, strict=strict))
    return plans


def _reencode(out: Path, job_plan: JobPlan, ref: ChunkRef, settings: EncodeSettings, chunk: ChunkPlan,
              now: list[tuple[Change | None, Stat]], *, probe_fn: Callable[[str], probing.VideoInfo] | None,
              strict: bool) -> ChunkPlan:
    """Only the changed inputs of the chunk planned and encoded again; the others' samples kept (`reencode`)."""
    inputs = read_chunk_inputs(out, ref)
    changed = {c.path for c, _ in now if c is not None}
    stats = reencode.changed_stats(inputs, [s for _, s in now], changed)
    new = reencode.replan(chunk, (ref.part, ref.chunk), inputs, changed, settings, probe_fn=probe_fn, strict=strict)

    def write(p: ChunkPlan, stats: list[Stat]) -> None:
        write_text_atomic(out / ref.plan_name, chunk_plan_json(job_plan, ref, p, stats))

    return reencode.reencode_chunk(out, (ref.part, ref.chunk), chunk, new, stats, changed, write)


def _chunk_from_dict(d: dict[str, Any], job_plan: JobPlan, ref: ChunkRef) -> ChunkPlan:
    if d["fingerprint"] != job_plan.fingerprint or d["inputs_sha256"] != ref.sha256:
        raise ValueError("made under another plan.json (fingerprint or inputs differ)")
    if d["part"] != ref.part or d["chunk"] != ref.chunk:
        raise ValueError(f"it says part {d['part']!r} chunk {d['chunk']!r}")
    clips = []
    for c in d["clips"]:
        clip = PlannedClip(**c)
        if not (isinstance(clip.relpath, str) and is_count(clip.index)
                and clip.key == clip_key(clip.relpath, clip.index)
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
    return ChunkPlan(job_plan.fingerprint, job_plan.settings, job_plan.vae, clips, shards, rejected)
