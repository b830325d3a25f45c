"""The executor: plan once, then for each shard this process owns decode -> encode -> write; finalize last.

Where a process runs (a plain loop, `accelerate launch`, a SLURM array task) only changes `rank` and `world_size`.
One error policy lives here: an `InputError` from any stage becomes a failure record in the shard's sidecar (and
later `failures.jsonl`) plus a log line, and the run goes on; anything else is a bug and propagates.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentcache.decode import Clip, decode_clip
from latentcache.errors import ConfigError, InputError, ShardFormatError
from latentcache.plan import (
    InputVideo,
    Plan,
    PlannedClip,
    PlannedShard,
    failure_record,
    make_plan,
    shards_for_rank,
)
from latentcache.settings import EncodeSettings
from latentcache.shards import (
    EncodedClip,
    read_done,
    remove_temporaries,
    sha256_file,
    write_manifest,
    write_shard,
)
from latentcache.vae import VideoVAE

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"


@dataclass(slots=True)
class RunSummary:
    shards_written: int = 0
    shards_skipped: int = 0
    clips_written: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clips_per_second(self) -> float:
        return self.clips_written / self.seconds if self.seconds else 0.0


def vae_record(vae: VideoVAE) -> dict[str, Any]:
    return {"identity": vae.identity.to_dict(), "spec": vae.spec.to_dict(), "dtype": str(vae.dtype).split(".")[-1]}


def load_or_make_plan(out: Path, inputs: list[InputVideo], settings: EncodeSettings, vae: VideoVAE, *,
                      overwrite: bool = False, write: bool = True) -> Plan:
    """Reuse OUT/plan.json when it was made with the same settings and VAE; refuse to mix otherwise."""
    vae.spec.check_clip(settings.clip)
    path = out / PLAN_FILE
    fresh = make_plan(inputs, settings, vae_record(vae))
    if path.is_file() and not overwrite:
        existing = Plan.from_json(path.read_text(encoding="utf-8"))
        if existing.fingerprint != fresh.fingerprint:
            raise ConfigError(f"{out} was made with other settings or another VAE: {_differences(existing, fresh)}. "
                              "Use a new --out directory, or --overwrite to start this one again.")
        return existing
    if write:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(PLAN_FILE + ".tmp")
        tmp.write_text(fresh.to_json(), encoding="utf-8")
        tmp.replace(path)
    return fresh


def _differences(old: Plan, new: Plan) -> str:
    diffs = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        elif a != b:
            diffs.append(f"{where}: {a!r} then, {b!r} now")

    walk({"settings": old.settings, "vae": old.vae}, {"settings": new.settings, "vae": new.vae}, "")
    return "; ".join(diffs[:6]) or "the input clips differ"


def _decode(clip: PlannedClip, settings: EncodeSettings) -> Clip | InputError:
    try:
        return decode_clip(clip.source, clip.start, settings.clip, key=clip.key)
    except InputError as e:
        return e


def _decoded(clips: list[PlannedClip], settings: EncodeSettings, pool: ThreadPoolExecutor
             ) -> Iterator[tuple[PlannedClip, Clip | InputError]]:
    """Decode ahead in a thread (PyAV releases the GIL) so the VAE does not wait for the next clip."""
    futures = [pool.submit(_decode, c, settings) for c in clips[:2]]
    for i, planned in enumerate(clips):
        if i + 2 < len(clips):
            futures.append(pool.submit(_decode, clips[i + 2], settings))
        yield planned, futures[i].result()


def encode_shard(shard: PlannedShard, plan: Plan, vae: VideoVAE, settings: EncodeSettings,
                 pool: ThreadPoolExecutor, on_clip: Callable[[int], None]) -> tuple[list[EncodedClip], list[dict]]:
    by_key = plan.clip_map()
    planned = [by_key[k] for k in shard.keys]
    encoded: list[EncodedClip] = []
    failures: list[dict[str, Any]] = []
    batch: list[tuple[PlannedClip, Clip]] = []

    def flush() -> None:
        if not batch:
            return
        try:
            mean, logvar = vae.encode(np.stack([c.frames for _, c in batch]), sources=[p.source for p, _ in batch])
        except InputError as e:
            for p, _ in batch:
                failures.append(failure_record(InputError(p.source, e.stage, e.reason)) | {"key": p.key})
                log.warning("%s: %s", p.source, e.reason)
        else:
            for i, (p, c) in enumerate(batch):
                meta = {**c.meta, "key": p.key, "source": p.relpath, "clip_index": p.index, "bucket": p.bucket,
                        "caption_source": "given" if p.caption is not None else None,
                        "vae": plan.vae["identity"], "dtype": plan.vae["dtype"]}
                encoded.append(EncodedClip(p.key, mean[i], logvar[i], meta, p.caption))
        on_clip(len(batch))
        batch.clear()

    for p, result in _decoded(planned, settings, pool):
        if isinstance(result, InputError):
            failures.append(failure_record(result) | {"key": p.key})
            log.warning("%s: %s", result.path, result.reason)
            if settings.strict:
                raise result
            on_clip(1)
            continue
        batch.append((p, result))
        if len(batch) >= settings.batch_size:
            flush()
    flush()
    if settings.strict and failures:
        raise InputError(failures[0]["path"], failures[0]["stage"], failures[0]["message"])
    return encoded, failures


def run(out: Path, plan: Plan, vae: VideoVAE, settings: EncodeSettings, *, rank: int = 0, world_size: int = 1,
        on_clip: Callable[[int], None] = lambda n: None) -> RunSummary:
    """Produce every shard this rank owns that is not already done."""
    summary = RunSummary()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for shard in shards_for_rank(plan, rank, world_size):
            path = out / shard.relpath
            if read_done(path) is not None:
                summary.shards_skipped += 1
                on_clip(len(shard.keys))
                continue
            remove_temporaries(path)
            encoded, failures = encode_shard(shard, plan, vae, settings, pool, on_clip)
            write_shard(path, encoded, extra={"shard_id": shard.shard_id, "bucket": shard.bucket,
                                              "failures": failures})
            summary.shards_written += 1
            summary.clips_written += len(encoded)
            summary.failures.extend(failures)
    summary.seconds = time.perf_counter() - started
    return summary


def finalize(out: Path) -> dict[str, Any]:
    """Merge the sidecars into manifest.json and failures.jsonl, checking that every planned clip is there once."""
    plan_path = out / PLAN_FILE
    if not plan_path.is_file():
        raise ShardFormatError(f"{out}: no {PLAN_FILE}; run `latentcache encode` into it first")
    plan = Plan.from_json(plan_path.read_text(encoding="utf-8"))
    shards, failures, seen = [], list(plan.rejected), {}
    missing = []
    for shard in plan.shards:
        record = read_done(out / shard.relpath)
        if record is None:
            missing.append(shard.relpath)
            continue
        for key in record["keys"]:
            if key in seen:
                raise ShardFormatError(f"{out}: clip {key} is in both {seen[key]} and {shard.relpath}")
            seen[key] = shard.relpath
        failures.extend(record.get("failures", []))
        shards.append({"path": shard.relpath, "bucket": shard.bucket, "samples": record["samples"],
                       "bytes": record["bytes"], "sha256": record["sha256"]})
    if missing:
        raise ShardFormatError(f"{out}: {len(missing)} planned shard(s) are not finished, e.g. {missing[0]}; "
                               "run the same `latentcache encode` again to complete them")
    failed_keys = {f["key"] for f in failures if "key" in f}
    lost = [c.key for c in plan.clips if c.key not in seen and c.key not in failed_keys]
    if lost:
        raise ShardFormatError(f"{out}: {len(lost)} planned clip(s) are neither written nor recorded as failed, "
                               f"e.g. {lost[0]}")
    with open(out / "failures.jsonl", "w", encoding="utf-8") as f:
        for record in failures:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    buckets: dict[str, int] = {}
    for s in shards:
        buckets[s["bucket"]] = buckets.get(s["bucket"], 0) + s["samples"]
    manifest = {
        "latent_spec": plan.vae["spec"],
        "vae": plan.vae["identity"],
        "dtype": plan.vae["dtype"],
        "settings": plan.settings,
        "fingerprint": plan.fingerprint,
        "counts": {"samples": len(seen), "shards": len(shards), "failures": len(failures),
                   "planned_clips": len(plan.clips)},
        "buckets": buckets,
        "shards": shards,
    }
    write_manifest(out, manifest)
    return manifest


def check_shard_checksums(out: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found re-hashing every shard listed in the manifest (empty when all match)."""
    problems = []
    for s in manifest["shards"]:
        path = out / s["path"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != s["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems
