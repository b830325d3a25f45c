"""format/out_layout.py: each builder's names are matched by its kind's pattern, and by no other kind's."""

from __future__ import annotations

import os
import re
from pathlib import Path

from latentcache.format import out_layout as L


def _built() -> dict[str, tuple[re.Pattern[str], list[Path]]]:
    out = Path("/o")
    world = L.share_world_folder(out, "0123456789abcdef", 2)
    return {
        "root": (L.ROOT_FILE, [L.marker_path(out), L.plan_path(out), L.manifest_path(out), L.failures_path(out)]),
        "inputs": (L.INPUTS_FILE, [out / L.inputs_name(0), out / L.inputs_name(12345)]),
        "keys": (L.KEYS_FILE, [out / L.keys_name(3)]),
        "lists": (L.INPUT_LISTS_FILE, [out / L.INPUT_LISTS_RECORD]),
        "chunk plan": (L.CHUNK_PLAN_FILE, [out / L.chunk_plan_name(1, 7)]),
        "carry": (L.CARRY_FILE, [out / L.carry_name(1, 7)]),
        "carry sidecar": (L.sidecar_pattern(L.CARRY_FILE), [L.sidecar_of(out / L.carry_name(1, 7))]),
        "shard": (L.SHARD_FILE, [out / L.shard_name("17x64x96", 5, 0, 2), out / L.shard_name("17x64x96", 5)]),
        "shard sidecar": (L.sidecar_pattern(L.SHARD_FILE), [L.sidecar_of(out / L.shard_name("17x64x96", 5, 0, 2))]),
        "rank marker": (L.SHARE_RANK_MARKER, [L.share_rank_marker(world, 1)]),
        "complete": (L.SHARE_COMPLETE_FILE, [L.share_complete(out, "0123456789abcdef")]),
    }


def test_each_name_built_is_matched_by_its_pattern_only() -> None:
    built = _built()
    for kind, (pattern, paths) in built.items():
        for path in paths:
            assert pattern.fullmatch(path.name), (kind, path)
            assert L.temporaries(pattern).fullmatch(L.temporary_of(path).name), (kind, path)
            others = [k for k, (p, _) in built.items() if k != kind and p.fullmatch(path.name)]
            assert others == [], (kind, path, others)


def test_the_names_are_the_documented_ones() -> None:
    out = Path("/o")
    assert L.shard_name("17x64x96", 5, 0, 2) == "shards/17x64x96/p0000-c000002-000005.tar"
    assert L.shard_name("17x64x96", 5) == "shards/17x64x96/000005.tar"
    assert L.sidecar_of(out / "shards/b/000005.tar") == out / "shards/b/000005.tar.json"
    assert (L.inputs_name(3), L.keys_name(3)) == ("inputs/part-0003.jsonl", "inputs/part-0003.keys.npy")
    assert L.chunk_plan_name(1, 7) == "chunks/p0001/c000007.json"
    assert L.carry_name(1, 7) == "chunks/p0001/c000007.carry.tar"
    world = L.share_world_folder(out, "ab" * 8, 2)
    assert L.share_rank_marker(world, 1) == out / "chunks/done/abababababababab/w000002/r000001"
    assert L.share_complete(out, "ab" * 8) == out / "chunks/done/abababababababab/complete"
    assert L.SHARE_WORLD_FOLDER.fullmatch(L.share_world_folder(out, "ab" * 8, 2).name)
    assert L.SHARE_PLAN_FOLDER.fullmatch(L.share_complete(out, "ab" * 8).parent.name)
    tmp = L.temporaries(L.SHARD_FILE).fullmatch("000005.tar.my.host.42.tmp")
    assert tmp and (tmp["host"], tmp["pid"]) == ("my.host", "42")
    assert not L.temporaries(L.SHARD_FILE).fullmatch("000005.tar.notes.tmp")


def test_the_sweep_takes_a_killed_writers_input_lists_record(tmp_path: Path) -> None:
    """inputs/lists.json is written through a temporary like the part files beside it: a writer killed while writing
    it leaves `lists.json.<host>.<pid>.tmp`, which the sweep takes (it was left forever, so a killed run's tree was
    not an uninterrupted one's). A user's `lists.json.notes.tmp` stays."""
    import socket
    import subprocess

    from latentcache.format.shards import remove_stale_temporaries

    dead = subprocess.Popen(["true"])
    dead.wait()
    inputs = tmp_path / L.INPUTS_DIR
    inputs.mkdir()
    ours = [L.temporary_of(tmp_path / L.INPUT_LISTS_RECORD), L.temporary_of(tmp_path / L.inputs_name(0))]
    ours = [p.with_name(p.name.replace(f".{os.getpid()}.", f".{dead.pid}.")) for p in ours]
    users = inputs / "lists.json.notes.tmp"
    for path in [*ours, users]:
        path.write_bytes(b"partial")
    assert all(socket.gethostname() in p.name for p in ours)
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(ours)
    assert [p.name for p in inputs.iterdir()] == [users.name]
