"""`latentcache encode ... --repair`: a shard damaged after it was written (a flipped byte: same size, so an
ordinary rerun takes it as done) is found by its sha256 and written again to the very bytes it had."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import ENCODE_SMALL, tree_bytes

from latentcache.cli import main


def _encode(videos: Path, out: Path, *extra: str) -> int:
    return main(["encode", str(videos), "--out", str(out), "--device", "cpu", *ENCODE_SMALL, *extra])


def test_repair_rewrites_exactly_the_damaged_shard_to_its_original_bytes(small_videos: Path, tmp_path: Path,
                                                                          capsys) -> None:
    videos = tmp_path / "in"
    videos.mkdir()
    for name in ("v0.mp4", "v1.mp4"):
        shutil.copy(small_videos / name, videos)
    out = tmp_path / "out"
    assert _encode(videos, out) == 0
    original = tree_bytes(out)
    shards = sorted(out.rglob("*.tar"))
    assert len(shards) == 2
    damaged, intact = shards
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a member's payload: the tar still parses, only the hash tells
    damaged.write_bytes(bytes(data))
    intact_mtime = intact.stat().st_mtime_ns
    capsys.readouterr()

    assert main(["verify", str(out)]) == 3
    assert "--repair" in capsys.readouterr().out

    # An ordinary rerun only stats a done shard (no hashing at scale): the damage stays.
    assert _encode(videos, out) == 0
    assert damaged.read_bytes() == bytes(data)
    capsys.readouterr()

    assert _encode(videos, out, "--repair") == 0
    printed = capsys.readouterr().out
    assert "[repair] 1 of 2 shard(s) do not match the sha256 their sidecar recorded" in printed
    assert "1 repaired" in printed
    assert tree_bytes(out) == original
    assert intact.stat().st_mtime_ns == intact_mtime  # the intact shard was not written again
    assert main(["verify", str(out)]) == 0

    # Nothing damaged: --repair reads every shard and writes none.
    capsys.readouterr()
    assert _encode(videos, out, "--repair") == 0
    assert "[repair] 0 of 2 shard(s)" in capsys.readouterr().out
    assert tree_bytes(out) == original
