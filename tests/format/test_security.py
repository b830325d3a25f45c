"""Shards from strangers: crafted tars are refused with the shard and member named, and nothing runs or is written.

Each test replaces one shard of a real encoded dataset with a crafted one, then reads it the three ways
latentcache reads shards: LatentShardDataset, `latentcache verify`, and shards.iter_tar.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import tarfile
import threading
from pathlib import Path

import pytest

from latentcache import LatentShardDataset, ShardFormatError
from latentcache.cli import main
from latentcache.format.manifest import read_manifest
from latentcache.format.reader import iter_tar


class _Payload:
    """Unpickling this creates `marker`: proof, if the file appears, that a reader unpickled a member."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "this ran"))


def _member(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type, info.linkname = kind, link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _real_members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


@pytest.fixture()
def victim(encoded_dir: Path, tmp_path: Path) -> tuple[Path, Path, list[tuple[str, bytes]]]:
    """A copy of the dataset, the path of its first shard, and that shard's real members."""
    copy = tmp_path / "data"
    shutil.copytree(encoded_dir, copy)
    shard = copy / read_manifest(copy)["shards"][0]["path"]
    return copy, shard, _real_members(shard)


def _write(shard: Path, members: list[tuple], *, cut: int | None = None) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            _member(tar, *member)
    data = buffer.getvalue()
    _replace(shard, data[:cut] if cut is not None else data)


def _replace(shard: Path, data: bytes) -> None:
    """Put `data` in place of the shard and list its size and sha256 in the manifest, as a stranger's dataset
    would: the crafted content itself must be refused, not merely a checksum mismatch."""
    shard.write_bytes(data)
    root = shard.parents[2]
    manifest = json.loads((root / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if root / s["path"] == shard)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def _all_readers_refuse(root: Path, shard: Path, pattern: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ShardFormatError, match=pattern) as info:
        list(LatentShardDataset(root))
    assert str(shard) in str(info.value)
    with pytest.raises(ShardFormatError, match=pattern):
        list(iter_tar(shard))
    assert main(["verify", str(root)]) == 3
    out = capsys.readouterr().out
    assert "PROBLEM" in out and str(shard) in out


@pytest.mark.slow
def test_pickle_member_is_refused_unread(victim, tmp_path: Path, capsys) -> None:
    root, shard, members = victim
    marker = tmp_path / "pwned"
    key = members[0][0].split(".")[0]
    _write(shard, [*members[:2], (f"{key}.pyd", pickle.dumps(_Payload(marker))), *members[2:]])
    _all_readers_refuse(root, shard, rf"member '{key}\.pyd' has extension \.pyd", capsys)
    assert not marker.exists()
    # webdataset's own decoder would have unpickled it: proof the payload is live.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("name", ["../escaped.json", "/tmp/latentcache_absolute_member.json", "a/../../up.json"])
def test_escaping_member_names_are_refused(victim, name: str, capsys) -> None:
    root, shard, members = victim
    _write(shard, [(name, b"{}"), *members])
    _all_readers_refuse(root, shard, "absolute or parent-relative", capsys)
    assert not (root / "escaped.json").exists() and not (shard.parent.parent / "escaped.json").exists()
    assert not Path("/tmp/latentcache_absolute_member.json").exists()


def test_links_are_refused(victim, capsys) -> None:
    root, shard, members = victim
    key = members[0][0].split(".")[0]
    _write(shard, [(f"{key}.json", b"", tarfile.SYMTYPE, "/etc/passwd"), *members[1:]])
    _all_readers_refuse(root, shard, "is a link", capsys)


def test_safetensors_header_claiming_too_much_is_refused(victim, capsys) -> None:
    root, shard, members = victim
    name, data = next((n, d) for n, d in members if n.endswith(".latents.safetensors"))
    lying = (len(data) * 10).to_bytes(8, "little") + data[8:]
    _write(shard, [(n, lying if n == name else d) for n, d in members])
    with pytest.raises(ShardFormatError, match=r"safetensors header claims \d+ bytes, the member holds") as info:
        list(LatentShardDataset(root))
    assert str(shard) in str(info.value) and name in str(info.value)
    assert main(["verify", str(root)]) == 3
    assert "safetensors header claims" in capsys.readouterr().out


def test_tensor_offsets_beyond_the_member_are_refused(victim) -> None:
    root, shard, members = victim
    name = next(n for n, _ in members if n.endswith(".latents.safetensors"))
    # A well-formed header whose tensors claim 61440 bytes; the member holds 100.
    header = json.dumps({"mean": {"dtype": "F32", "shape": [16, 5, 8, 12], "data_offsets": [0, 30720]},
                         "logvar": {"dtype": "F32", "shape": [16, 5, 8, 12], "data_offsets": [30720, 61440]}})
    forged = len(header).to_bytes(8, "little") + header.encode() + bytes(100)
    _write(shard, [(n, forged if n == name else d) for n, d in members])
    with pytest.raises(ShardFormatError, match=r"tensor 'mean' claims bytes 0\.\.30720, the member holds 100") as info:
        list(LatentShardDataset(root))
    assert name in str(info.value)


@pytest.mark.parametrize("where", ["inside a member", "at a member boundary"])
def test_truncated_tar_is_refused(victim, where: str, capsys) -> None:
    root, shard, members = victim
    data = shard.read_bytes()
    if where == "inside a member":
        cut = 512 + (len(members[0][1]) + 511) // 512 * 512 + 512 + 100  # 100 bytes into the second member
        pattern = "truncated or corrupt tar while reading member"
    else:
        # Header + data of the first two members, padded to 512: a tar that just stops, no end-of-archive blocks.
        cut = sum(512 + (len(d) + 511) // 512 * 512 for _, d in members[:2])
        pattern = "without its end-of-archive blocks"
    _replace(shard, data[:cut])
    _all_readers_refuse(root, shard, pattern, capsys)


# ---------------------------------------------------------------- crafted plans and YAML files (issue 12)


def test_a_crafted_plan_cannot_write_outside_out(small_videos: Path, encoded_reference: Path, tmp_path: Path,
                                                 capsys) -> None:
    """A shard bucket of ../../ESCAPED in a chunk plan would make encode write OUT/../ESCAPED/...: refused, nothing
    written, by encode and finalize alike."""
    from conftest import ENCODE_SMALL

    out = tmp_path / "out"
    shutil.copytree(encoded_reference, out)
    chunk_file = sorted((out / "chunks").rglob("*.json"))[0]
    chunk = json.loads(chunk_file.read_text())
    chunk["shards"][0]["bucket"] = "../../ESCAPED"
    for c in chunk["clips"]:
        c["bucket"] = "../../ESCAPED"
    chunk_file.write_text(json.dumps(chunk))
    for sidecar in (out / "shards").rglob("*.tar.json"):
        sidecar.unlink()  # so that encode would write the shards again
    args = ["encode", str(small_videos), "--out", str(out), "--device", "cpu", *ENCODE_SMALL]
    assert main(args) == 2
    assert f"{chunk_file}: not a chunk plan of this directory" in capsys.readouterr().err
    assert main(["finalize", str(out)]) == 2
    assert "not a chunk plan of this directory" in capsys.readouterr().err
    assert not (tmp_path / "ESCAPED").exists() and not list(tmp_path.rglob("ESCAPED"))


@contextlib.contextmanager
def _deadline(seconds: int):
    """Old code looped forever on these files: fail the test instead of hanging it."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))


@pytest.mark.parametrize(("text", "why"), [
    ("model:\n  a: &a {b: *a}\n", "a recursive alias"),
    ("x: &x [*x]\n", "a recursive alias"),
    (BILLION_LAUGHS, "more than 100000 YAML nodes"),
])
def test_check_config_refuses_yaml_bombs_at_once(tmp_path: Path, text: str, why: str) -> None:
    from latentcache.errors import ConfigError
    from latentcache.train.trainer_config import load_trainer_config

    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    # The deadline only keeps a regression from hanging the suite; the refusal itself is the assertion (the
    # node count and the alias cycle are checked before anything expands).
    with _deadline(30), pytest.raises(ConfigError, match=re.escape(why)):
        load_trainer_config(path)
def _returns_within(seconds: float, job, fifo: Path) -> tuple[bool, BaseException | None]:
    """Run `job` in a thread; (finished in time, what it raised). A reader stuck opening `fifo` is released by
    opening it for writing, so even a failing test leaves no thread behind."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            job()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    finished = not thread.is_alive()
    while thread.is_alive():
        with contextlib.suppress(OSError):  # no reader waiting at this instant: try again
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(0.1)
    return finished, outcome[0] if outcome else None


def test_fifo_in_place_of_a_shard_is_refused_not_waited_on(victim, capsys) -> None:
    root, shard, _ = victim
    shard.unlink()
    os.mkfifo(shard)
    for job in (lambda: list(LatentShardDataset(root)), lambda: list(iter_tar(shard))):
        finished, error = _returns_within(20, job, shard)
        assert finished, "the reader blocked on a FIFO"
        assert isinstance(error, ShardFormatError) and f"{shard}: is a FIFO" in str(error)
    finished, _ = _returns_within(60, lambda: main(["verify", str(root)]), shard)
    assert finished
    out = capsys.readouterr().out
    assert f"PROBLEM: {shard}: is a FIFO; latentcache reads only regular files" in out and "FAILED" in out


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_huge_long_name_is_refused_from_its_header(victim, fmt: int, capsys) -> None:
    """A 4 MB member name (GNU long-name or pax header) is refused before it is read, and never echoed whole."""
    root, shard, members = victim
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in [("k" * (4 << 20) + ".pyd", b"x"), *members]:
            _member(tar, name, data)
    _replace(shard, buffer.getvalue())
    for read in (lambda: list(LatentShardDataset(root)), lambda: list(iter_tar(shard))):
        with pytest.raises(ShardFormatError, match="header claims 4194") as info:
            read()
        assert str(shard) in str(info.value) and len(str(info.value)) < 1000
    assert main(["verify", str(root)]) == 3
    out = capsys.readouterr().out
    assert "header claims 4194" in out and len(out) < 5000


def test_long_names_in_messages_are_cut(victim) -> None:
    """Names under the header bound (here 3000 characters) still appear cut short in messages."""
    root, shard, members = victim
    _write(shard, [("k" * 3000 + ".pyd", b"x"), *members])
    with pytest.raises(ShardFormatError, match=r"member 'kkk.*\.\.\. \(3006 characters\) has extension \.pyd") as info:
        list(LatentShardDataset(root))
    assert len(str(info.value)) < 1000


# ------------------------------------------------------------------ strings from files never reach a url opener


def _set_shard_path(root: Path, index: int, path: str) -> str:
    """Rename shard `index` in the manifest only (its size and sha256 stay those of the real shard): the returned
    old path is what a `cat` in a pipe: command would have served, checksum and all."""
    manifest = json.loads((root / "manifest.json").read_text())
    old, manifest["shards"][index]["path"] = manifest["shards"][index]["path"], path
    (root / "manifest.json").write_text(json.dumps(manifest))
    return old


@pytest.mark.parametrize("opened_as", [".", ""])
def test_a_manifest_shard_path_is_never_run_as_a_command(victim, tmp_path: Path, monkeypatch, capsys,
                                                        opened_as: str) -> None:
    """A stranger's manifest naming `pipe:touch X; cat REAL_SHARD` (which would even pass the sha256 check) with the
    dataset opened as `.` or "": the dataset and `latentcache verify` refuse it, naming the shard, and run nothing."""
    root, shard, _ = victim
    marker = tmp_path / "pwned"
    evil = f"pipe:touch {marker}; cat {shard}"
    _set_shard_path(root, 0, evil)
    monkeypatch.chdir(root)
    with pytest.raises(ShardFormatError, match="not a plain relative path") as info:
        list(LatentShardDataset(opened_as, shuffle=False))
    assert evil in str(info.value)
    assert not marker.exists()
    assert main(["verify", opened_as]) == 2
    captured = capsys.readouterr()
    assert evil in captured.out + captured.err
    assert not marker.exists()


@pytest.mark.parametrize("path", ["https://example.invalid/000000.tar", "s3://other-bucket/000000.tar",
                                  "C:/shards/000000.tar", "shards\\..\\..\\000000.tar", "shards//000000.tar",
                                  "./shards/000000.tar", "shards/x/../../../000000.tar", "/dev/zero",
                                  "shards/000000.tar\n", "pipe:cat /dev/null"])
def test_manifest_shard_paths_must_be_plain_relative_names(victim, monkeypatch, path: str) -> None:
    root, _, _ = victim
    _set_shard_path(root, 0, path)
    for where in (root, "."):
        monkeypatch.chdir(root)
        with pytest.raises(ShardFormatError, match="not a plain relative path") as info:
            LatentShardDataset(where)
        assert repr(path) in str(info.value)


def test_a_shard_linked_to_another_outputs_shard_is_refused(encoded_dir: Path, tmp_path: Path, capsys) -> None:
    """Output A's first shard is a symbolic link to output B's (same bytes, so its checksum passes): combining A and
    B would give that shard's samples twice. Shards must be regular files inside their output; the output
    directory itself may be a link."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(encoded_dir, a)
    shutil.copytree(encoded_dir, b)
    first = read_manifest(a)["shards"][0]["path"]
    (a / first).unlink()
    (a / first).symlink_to(b / first)
    with pytest.raises(ShardFormatError, match="symbolic link") as info:
        list(LatentShardDataset(a, shuffle=False))
    assert str(a / first) in str(info.value)
    # Combined, the same file reached twice is refused before any shard is read.
    with pytest.raises(ShardFormatError, match="symbolic link|given twice"):
        list(LatentShardDataset([a, b], shuffle=False))
    assert main(["verify", str(a)]) == 3
    out = capsys.readouterr().out
    assert f"PROBLEM: {a / first}" in out and "symbolic link" in out
    # A linked directory, or one linked folder above the output: a link to the whole output is the output.
    (tmp_path / "link").symlink_to(b)
    assert len(list(LatentShardDataset(tmp_path / "link", shuffle=False, batch_size=None))) == 8


def test_ffmpeg_protocol_prefixes_in_a_path_are_not_interpreted(tmp_path: Path, monkeypatch) -> None:
    """An input named `concat:short.mp4` (a real file: a path from a stranger's list, plan or tar) is that file,
    not FFmpeg's concat protocol reading `short.mp4`."""
    from latentcache.encode.decoding.probing import probe
    from latentcache.tools.synthetic import write_video

    short = write_video(tmp_path / "short", num_frames=8, height=64, width=96)
    long = write_video(tmp_path / "long", num_frames=40, height=64, width=96)
    os.rename(long, tmp_path / f"concat:{Path(short).name}")
    monkeypatch.chdir(tmp_path)
    assert probe(f"concat:{Path(short).name}").frames == 40
    assert probe(Path(short).name).frames == 8


def test_chained_or_web_urls_are_refused_as_inputs(tmp_path: Path) -> None:
    """A list row or plan entry naming `simplecache::file://...` (fsspec would open the local file through a chain,
    past every local-path rule) or `http://...` is a failure record, nothing opened."""
    from latentcache.encode.decoding.probing import probe
    from latentcache.errors import InputError
    from latentcache.tools.synthetic import write_video

    video = write_video(tmp_path / "v", num_frames=8, height=64, width=96)
    for url in (f"simplecache::file://{video}", "http://127.0.0.1:9/v.mp4", f"zip://v.mp4::file://{video}"):
        with pytest.raises(InputError, match="not an object-storage url latentcache reads") as info:
            probe(url)
        assert info.value.path == url


def test_a_file_named_like_a_pipe_url_matched_by_a_glob_is_read_as_a_file(tmp_path: Path, monkeypatch) -> None:
    """A stranger's file named `pipe:touch pwned; echo .tar` matched by the user's glob `*.tar` is a local file:
    expand_urls keeps it local (./ prefix), and open_url reads its bytes instead of running it."""
    from latentcache.train.shard_sources import expand_urls, open_url

    name = "pipe:touch pwned; echo .tar"
    (tmp_path / name).write_bytes(b"the file's own bytes")
    monkeypatch.chdir(tmp_path)
    (url,) = expand_urls("*.tar")
    with open_url(url) as f:
        assert f.read() == b"the file's own bytes"
    assert not (tmp_path / "pwned").exists()
