"""The names of the files in an output directory (OUT, a local Path or a storage ObjectPath): for each kind of file,
the one builder of its name and the one pattern that matches it. Every module that makes, finds or sweeps a file of
OUT goes through here, the write side and the readers of strangers' outputs alike (`tests/test_layout.py` holds that
rule); docs/format.md describes each file.

    OUT/.latentcache                              OUTPUT_MARKER: written first, the directory is latentcache's
    OUT/plan.json                                 PLAN_FILE
    OUT/inputs/part-NNNN.jsonl, .keys.npy         inputs_name(part), keys_name(part)
    OUT/inputs/lists.json                         INPUT_LISTS_RECORD: what the input lists were when last read
    OUT/chunks/pNNNN/cNNNNNN.json                 chunk_plan_name(part, chunk)
    OUT/chunks/pNNNN/cNNNNNN.carry.tar (+ .json)  carry_name(part, chunk): --reencode-changed's carried samples
    OUT/chunks/done/<digest>/wNNNNNN/rNNNNNN      share_world_folder(...), share_rank_marker(...): a rank's share done
    OUT/chunks/done/<digest>/complete             share_complete(...): a finalized job
    OUT/shards/<bucket>/pNNNN-cNNNNNN-NNNNNN.tar  shard_name(bucket, index, part, chunk); NNNNNN.tar without a chunk
    OUT/shards/<bucket>/<shard>.tar.json          sidecar_of(shard)
    OUT/failures.jsonl, OUT/manifest.json         FAILURES_FILE, MANIFEST_FILE (the manifest written last)

A file written through a temporary is first `<name>.<host>.<pid>.tmp` (`temporary_of`, matched by `temporaries`).
The patterns match a name inside its folder (`fullmatch` on `Path.name`): a folder's own pattern says where.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

# Written first into every output directory latentcache makes: marks it as ours (safe to resume, to clear with
# --overwrite) and keeps it out of input discovery.
OUTPUT_MARKER = ".latentcache"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
FAILURES_FILE = "failures.jsonl"
INPUTS_DIR = "inputs"
CHUNKS_DIR = "chunks"
SHARDS_DIR = "shards"
INPUT_LISTS_RECORD = f"{INPUTS_DIR}/lists.json"
SHARE_MARKERS_DIR = f"{CHUNKS_DIR}/done"
SHARE_COMPLETE = "complete"
SHARD_SUFFIX = ".tar"
SIDECAR_SUFFIX = ".json"
TMP_SUFFIX = ".tmp"

# Everything latentcache writes into OUT besides the plan (and the marker); `--overwrite` removes exactly these.
OUTPUTS = (SHARDS_DIR, CHUNKS_DIR, INPUTS_DIR, MANIFEST_FILE, FAILURES_FILE)


# ------------------------------------------------------------------------------------------------- builders


def marker_path(out: Path) -> Path:
    return out / OUTPUT_MARKER


def plan_path(out: Path) -> Path:
    return out / PLAN_FILE


def manifest_path(out: Path) -> Path:
    return out / MANIFEST_FILE


def failures_path(out: Path) -> Path:
    return out / FAILURES_FILE


def inputs_name(part: int) -> str:
    """A part's inputs, one a line, relative to OUT."""
    return f"{INPUTS_DIR}/part-{part:04d}.jsonl"


def keys_name(part: int) -> str:
    """A part's sorted 8-byte key digests, relative to OUT."""
    return f"{INPUTS_DIR}/part-{part:04d}.keys.npy"


def chunk_plan_name(part: int, chunk: int) -> str:
    return f"{CHUNKS_DIR}/p{part:04d}/c{chunk:06d}.json"


def carry_name(part: int, chunk: int) -> str:
    """`--reencode-changed`'s carry of a chunk (encode/reencode.py), relative to OUT."""
    return f"{CHUNKS_DIR}/p{part:04d}/c{chunk:06d}.carry.tar"


def shard_name(bucket: str, index: int, part: int | None = None, chunk: int | None = None) -> str:
    """A shard's path relative to OUT (as the manifest lists it): a chunk's shards are named by part, chunk and
    their index within the chunk; a plan without chunks numbers its shards alone."""
    if chunk is not None:
        return f"{SHARDS_DIR}/{bucket}/p{part:04d}-c{chunk:06d}-{index:06d}{SHARD_SUFFIX}"
    return f"{SHARDS_DIR}/{bucket}/{index:06d}{SHARD_SUFFIX}"


def sidecar_of(path: Path) -> Path:
    """The sidecar of a shard (or of a carry): written after it, it makes it count."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def share_world_folder(out: Path, plan_digest: str, world_size: int) -> Path:
    """Where the ranks of a `world_size` run of the plan with this digest leave their markers."""
    return out / f"{SHARE_MARKERS_DIR}/{plan_digest}/w{world_size:06d}"


def share_rank_marker(world_folder: Path, rank: int) -> Path:
    return world_folder / f"r{rank:06d}"


def share_complete(out: Path, plan_digest: str) -> Path:
    return out / f"{SHARE_MARKERS_DIR}/{plan_digest}/{SHARE_COMPLETE}"


def temporary_of(path: Path) -> Path:
    """A temporary name unique to this writer: two processes that ever write the same file (a requeued SLURM task
    overlapping its old self, two array tasks making the plan) never write into one inode; the rename decides."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}{TMP_SUFFIX}")


# ------------------------------------------------------------------------------------------------- patterns

ROOT_FILE = re.compile("|".join(re.escape(n) for n in (PLAN_FILE, MANIFEST_FILE, FAILURES_FILE, OUTPUT_MARKER)))
INPUTS_FILE = re.compile(r"part-[0-9]{4,}\.jsonl")
KEYS_FILE = re.compile(r"part-[0-9]{4,}\.keys\.npy")
INPUT_LISTS_FILE = re.compile(r"lists\.json")
CHUNK_FOLDER = re.compile(r"p[0-9]{4,}")
CHUNK_PLAN_FILE = re.compile(r"c[0-9]{6,}\.json")
CARRY_FILE = re.compile(r"c[0-9]{6,}\.carry\.tar")
SHARD_FILE = re.compile(r"(?:p[0-9]{4,}-c[0-9]{6,}-)?[0-9]{6,}\.tar")
SHARE_PLAN_FOLDER = re.compile(r"[0-9a-f]{16}")
SHARE_WORLD_FOLDER = re.compile(r"w[0-9]{6}")
SHARE_RANK_MARKER = re.compile(r"r[0-9]{6}")
SHARE_COMPLETE_FILE = re.compile(re.escape(SHARE_COMPLETE))
# What `temporary_of` appends to a final name: `.<host>.<pid>.tmp` (a host name may hold dots, a pid is digits).
TMP_TAIL = r"\.(?P<host>.+)\.(?P<pid>[0-9]+)\.tmp"


def sidecar_pattern(of: re.Pattern[str]) -> re.Pattern[str]:
    """The names of the sidecars of the files `of` matches."""
    return re.compile(rf"(?:{of.pattern}){re.escape(SIDECAR_SUFFIX)}")


def any_of(*patterns: re.Pattern[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p.pattern})" for p in patterns))


def temporaries(of: re.Pattern[str]) -> re.Pattern[str]:
    """The names of the temporaries (`temporary_of`) of the files `of` matches, with the groups host and pid."""
    return re.compile(rf"(?:{of.pattern}){TMP_TAIL}")
