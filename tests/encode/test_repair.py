"""`latentcache encode ... --repair`: a shard damaged after it was written (a flipped byte: same size, so an
ordinary rerun takes it as done) is found by its sha256 and written again to the very bytes it had."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
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


@pytest.mark.slow
def test_repair_keeps_a_damaged_shard_whose_source_is_gone(small_videos: Path, tmp_path: Path, capsys) -> None:
    """Deleting the videos once their latents exist is the point of a latent cache: --repair then cannot make a
    damaged shard's samples again, so it keeps that shard exactly as it is (never turning its samples into failures),
    names the missing source, repairs the shards it can, and exits 2 while the output stays damaged."""
    videos = tmp_path / "in"
    videos.mkdir()
    for name in ("v0.mp4", "v1.mp4"):
        shutil.copy(small_videos / name, videos)
    # A list names the inputs: a listed video that is gone is an input whose latents are of the bytes it had (a
    # folder would list it no more, and a rerun refuses a folder that lost planned inputs).
    listed = tmp_path / "videos.txt"
    listed.write_text("".join(f"{videos / n}\n" for n in ("v0.mp4", "v1.mp4")), encoding="utf-8")
    out = tmp_path / "out"
    assert _encode(listed, out) == 0
    original = tree_bytes(out)
    shards = sorted(out.rglob("*.tar"))
    damaged_bytes = {}
    for shard in shards:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        damaged_bytes[shard] = bytes(data)
    gone = next(s for s in shards if "v0" in _source_of(s))
    (videos / "v0.mp4").rename(tmp_path / "away.mp4")  # a rename keeps its size and mtime for the end
    failures_before = (out / "failures.jsonl").read_bytes() if (out / "failures.jsonl").exists() else b""
    capsys.readouterr()

    assert _encode(listed, out, "--repair") == 2
    printed = capsys.readouterr().out
    assert "[repair] 2 of 2 shard(s) do not match" in printed
    assert f"{gone}: damaged, and kept as it is: {videos / 'v0.mp4'} is gone" in printed
    assert gone.read_bytes() == damaged_bytes[gone]  # kept, not re-encoded into failures
    repaired = next(s for s in shards if s != gone)
    assert repaired.read_bytes() == original[str(repaired.relative_to(out))]
    failures_after = (out / "failures.jsonl").read_bytes() if (out / "failures.jsonl").exists() else b""
    assert failures_after == failures_before

    # The source put back as it was: --repair now makes the kept shard again, to its original bytes.
    (tmp_path / "away.mp4").rename(videos / "v0.mp4")
    assert _encode(listed, out, "--repair") == 0
    assert tree_bytes(out) == original


def _source_of(shard: Path) -> str:
    import tarfile

    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                return tar.extractfile(member).read().decode()
    return ""
