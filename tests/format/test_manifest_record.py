"""format/manifest.py's `Manifest` record: finalize writes through it the bytes the dict literal it replaced wrote, a
manifest read and written again is the same file, and a stranger's unknown keys are kept and read by nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from latentcache.encode import chunks, job_plan
from latentcache.encode.models.provenance import merge_software
from latentcache.format.manifest import Manifest, ShardEntry, read_manifest, write_manifest
from latentcache.format.outcomes import tally
from latentcache.format.shards import read_done


def _manifest_as_finalize_built_it_before(out: Path) -> dict[str, Any]:
    """The manifest as the dict literal of finalize (encode/pipeline.py's finalize_with_outcome, before the record)
    built it from the same plan and sidecars: the reference the record's bytes are held to."""
    plan = job_plan.read_job_plan(out)
    shards, failures, software = [], [], []
    samples = planned_clips = 0
    for ref in plan.chunk_refs():
        chunk = chunks.read_chunk_plan(out, plan, ref)
        failures.extend(chunk.rejected)
        seen: set[str] = set()
        for shard in chunk.shards:
            record = read_done(out / shard.relpath)
            seen.update(record["keys"])
            failures.extend(record.get("failures", []))
            software.append(record.get("software"))
            shards.append({"path": shard.relpath, "bucket": shard.bucket, "samples": record["samples"],
                           "bytes": record["bytes"], "sha256": record["sha256"]})
        samples += len(seen)
        planned_clips += len(chunk.clips)
    buckets: dict[str, int] = {}
    for s in shards:
        buckets[s["bucket"]] = buckets.get(s["bucket"], 0) + s["samples"]
    counted = tally(failures)
    return {
        "latent_spec": plan.vae["spec"],
        "vae": plan.vae["identity"],
        "dtype": plan.vae["dtype"],
        "settings": plan.settings,
        "fingerprint": plan.fingerprint,
        "counts": {"samples": samples, "shards": len(shards), "planned_clips": planned_clips,
                   "skipped": counted.skipped_total, "failed": counted.failed_total,
                   "skipped_by_reason": dict(counted.skipped.most_common()),
                   "failed_by_reason": dict(counted.failed.most_common())},
        "buckets": buckets,
        "shards": shards,
        "software": merge_software(software),
    }


def test_finalize_writes_the_manifest_the_dict_literal_wrote_field_by_field(encoded_dir: Path) -> None:
    written = (encoded_dir / "manifest.json").read_bytes()
    before = {"format_version": 1, **_manifest_as_finalize_built_it_before(encoded_dir)}
    after = json.loads(written)
    assert list(after) == sorted(before)  # the same keys (sorted in the file, as always)
    for name in before:
        assert after[name] == before[name], name
    assert written.decode() == json.dumps(before, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
    assert len(after["shards"]) == 4 and after["counts"]["samples"] == 8


def test_a_manifest_read_and_written_again_is_the_same_file(encoded_dir: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(encoded_dir)
    assert manifest.shards[0] == ShardEntry(**read_manifest(encoded_dir)["shards"][0])
    assert manifest.counts["samples"] == sum(s.samples for s in manifest.shards) == 8
    assert manifest.clip["frames"] == 17 and manifest.counts_problem(encoded_dir) is None
    write_manifest(tmp_path, manifest)
    assert (tmp_path / "manifest.json").read_bytes() == (encoded_dir / "manifest.json").read_bytes()


def test_a_strangers_unknown_keys_are_kept_and_read_by_nothing(encoded_dir: Path, tmp_path: Path) -> None:
    from latentcache import LatentShardDataset
    from latentcache.tools.verify import verify

    copy = tmp_path / "copy"
    shutil.copytree(encoded_dir, copy)
    document = json.loads((copy / "manifest.json").read_text())
    document["made_by"] = {"tool": "someone else's", "version": [2, 1]}
    document["shards"][0]["note"] = "an extra field in a shard entry"
    (copy / "manifest.json").write_text(json.dumps(document, indent=1, sort_keys=True))
    assert read_manifest(copy)["made_by"] == {"tool": "someone else's", "version": [2, 1]}
    manifest = Manifest.read(copy)
    assert manifest.extra == {"made_by": {"tool": "someone else's", "version": [2, 1]}}
    assert manifest.shards == Manifest.read(encoded_dir).shards  # the shard entry's extra field is not read
    assert verify(copy).ok and len(list(LatentShardDataset(copy))) == 8


def test_a_manifest_leaves_out_what_a_writer_leaves_none(tmp_path: Path) -> None:
    """The benchmarks' synthetic outputs write only some fields; None is left out, not written as null."""
    from latentcache.tools.synthetic import write_latent_dataset

    write_latent_dataset(tmp_path, samples=3, per_shard=2, shape=(16, 1, 4, 4))
    document = json.loads((tmp_path / "manifest.json").read_text())
    assert list(document) == ["counts", "format_version", "latent_spec", "shards", "vae"]
    assert [s["path"] for s in document["shards"]] == ["shards/17x480x720/000000.tar", "shards/17x480x720/000001.tar"]
