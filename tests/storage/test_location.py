"""storage/location.py: a path resolved once (a local Path or an ObjectPath), what differs between the two, and the
trust rule for strangers' paths. Objects live in fsspec's in-memory store (memory://), which is an object store to
latentcache like s3:// (one PUT per write, no rename, no folders)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from latentcache.errors import ConfigError, ShardFormatError
from latentcache.storage import location, sources, trust
from latentcache.storage.location import ObjectPath
from latentcache.storage.trust import UnsupportedUrl

pytest.importorskip("fsspec")


@pytest.fixture
def bucket() -> str:
    return f"memory://test-location-{uuid.uuid4().hex}"


def test_resolve_picks_the_kind_once(tmp_path):
    assert location.resolve(str(tmp_path)) == tmp_path
    assert location.resolve("s3://bucket/out/") == ObjectPath("s3://bucket/out")
    assert location.resolve(ObjectPath("s3://b/x")) == ObjectPath("s3://b/x")
    assert location.local("s3://b/x") is None and location.local(ObjectPath("s3://b/x")) is None
    assert location.local("http://example.invalid/x") is None
    assert location.local("videos/a.mp4") == Path("videos/a.mp4")
    for refused in ("http://example.invalid/out", "simplecache::s3://b/x", "file::s3://b/x"):
        with pytest.raises(UnsupportedUrl, match="not an object-storage url"):
            location.resolve(refused)
    with pytest.raises(ConfigError, match="^--out http://example.invalid/out: not an object-storage url"):
        location.output_location("http://example.invalid/out")


def test_open_url_trusts_only_what_the_user_typed(tmp_path, monkeypatch):
    """A string read from a file is a local path or an object, never a command or a web address; a url the user
    typed may be anything webdataset's gopen opens."""
    monkeypatch.chdir(tmp_path)
    Path("pipe:echo hi").write_bytes(b"the file's bytes")
    with location.open_url("pipe:echo hi", trusted=False) as f:
        assert f.read() == b"the file's bytes"  # a file of that name, not a command
    with location.open_url("pipe:echo hi", trusted=True) as f:
        assert f.read() == b"hi\n"  # the user's own command
    for url in ("http://example.invalid/x.tar", "pipe://x", "simplecache::s3://b/x"):
        with pytest.raises(UnsupportedUrl):
            location.open_url(url, trusted=False)
    Path("a.tar").write_bytes(b"x" * 10)
    with location.open_url(f"file://{tmp_path}/a.tar", trusted=True) as f:
        assert f.read() == b"x" * 10
    os.mkfifo("fifo.tar")
    for trusted in (False, True):  # a FIFO would block the reader forever: refused, whoever named it
        with pytest.raises(ShardFormatError, match="fifo.tar: is a FIFO; latentcache reads only regular files"):
            location.open_url("fifo.tar", trusted=trusted)


def test_read_with_a_limit_local_and_in_a_store(tmp_path, bucket):
    local = tmp_path / "m.json"
    local.write_bytes(b"0123456789")
    obj = location.resolve(f"{bucket}/m.json")
    obj.write_bytes(b"0123456789")
    for where in (local, str(local), obj, str(obj)):
        assert location.read(where) == b"0123456789"
        assert location.read(where, 4) == b"01234"  # limit + 1: the caller tells "more than the limit"
        assert location.size(where) == 10
    with pytest.raises(FileNotFoundError):
        location.read(f"{bucket}/missing.json", 4)
    with pytest.raises(FileNotFoundError):
        location.read(tmp_path / "missing.json", 4)
    with pytest.raises(UnsupportedUrl):
        location.read("http://example.invalid/m.json", 4)


def test_read_whole_refuses_a_larger_file_before_reading_it(tmp_path, bucket):
    local = tmp_path / "s.tar"
    local.write_bytes(b"x" * 100)
    obj = f"{bucket}/s.tar"
    ObjectPath(obj).write_bytes(b"x" * 100)
    for url in (str(local), obj):
        assert bytes(location.read_whole(url, 100)) == b"x" * 100
        with pytest.raises(location.TooLarge) as e:
            location.read_whole(url, 99)
        assert e.value.size == 100
    buffer = bytearray()
    assert bytes(location.read_whole(str(local), 100, buffer)) == b"x" * 100 and len(buffer) == 101


def test_atomic_writer_renames_locally_and_puts_once_in_a_store(tmp_path, bucket):
    def tmp_name(path: Path) -> Path:
        return path.with_name(path.name + ".mine.tmp")

    local = tmp_path / "a.json"
    with location.atomic_writer(local, tmp_name) as f:
        f.write(b"new")
        assert not local.exists() and tmp_name(local).exists()  # readers see nothing half-written
    assert local.read_bytes() == b"new" and not tmp_name(local).exists()
    with pytest.raises(RuntimeError), location.atomic_writer(local, tmp_name) as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert local.read_bytes() == b"new"  # the old file stays whole
    obj = ObjectPath(f"{bucket}/a.json")
    with location.atomic_writer(obj, tmp_name) as f:
        f.write(b"new")
        assert not obj.is_file()  # built in memory: the PUT comes when the block ends
    assert obj.read_bytes() == b"new"
    assert location.renames_into_place(local) and not location.renames_into_place(obj)
    assert location.has_folders(local) and not location.has_folders(obj)
    assert location.read_whole_first(obj) and not location.read_whole_first(local)


def test_files_under_lists_local_folders_and_object_prefixes_alike(tmp_path, bucket):
    for name in ("b/2.tar", "a/1.tar", "a/1.tar.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
        ObjectPath(f"{bucket}/{name}").write_bytes(b"x")
    assert location.files_under(tmp_path, ".tar") == ["a/1.tar", "b/2.tar"]
    assert location.files_under(bucket, ".tar") == ["a/1.tar", "b/2.tar"]
    assert location.files_under(tmp_path / "none", ".tar") is None
    assert location.files_under(f"{bucket}/none", ".tar") == []


def test_expand_pattern_keeps_local_matches_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("b.tar", "a.tar", "pipe:c.tar"):
        Path(name).write_bytes(b"")
    assert location.expand_pattern("*.tar") == ["a.tar", "b.tar", os.path.join(".", "pipe:c.tar")]
    assert location.expand_pattern("none-*.tar") == []
    assert location.expand_pattern(f"file://{tmp_path}/a.tar") == [f"{tmp_path}/a.tar"]
    assert location.expand_pattern("s3://b/x-*.tar") == ["s3://b/x-*.tar"]  # the store's own name, not a glob


def test_identity_and_names(tmp_path):
    assert location.identity("S3://b//out/./x/") == "s3://b/out/x"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert location.identity(str(tmp_path / "link")) == location.identity(f"file://{tmp_path}/real")
    assert location.url_name("s3://bucket/v/a.mp4") == "bucket/v/a.mp4" and location.url_name("v/a.mp4") is None
    assert location.object_url("s3://b/out/") == "s3://b/out" and location.object_url("out") is None


def test_the_plan_path_rule_and_ffmpeg_names(tmp_path):
    assert trust.openable_from_file("/data/a.mp4") and trust.openable_from_file("/data/x.tar::a.mp4")
    assert trust.openable_from_file("s3://bucket/a.mp4")
    for hostile in ("pipe:cat /etc/passwd", "http://example.invalid/a.mp4", "concat:/a|/b", "videos/a.mp4",
                    "/data/a\n.mp4", "", None):
        assert not trust.openable_from_file(hostile), hostile
    assert sources.ffmpeg_name("/data/a.mp4") == "file:/data/a.mp4"
    assert sources.ffmpeg_name("/data/x.tar::a.mp4") is None and sources.ffmpeg_name("s3://b/a.mp4") is None
    assert sources.object_stat(str(tmp_path / "a.mp4")) is None


def test_the_trust_rule_for_a_strangers_path(tmp_path):
    """storage/trust.py: what a string read from a file may name, in one place."""
    assert trust.opener("pipe:cat x", trusted=False) == ("local", "pipe:cat x")
    assert trust.opener("pipe:cat x", trusted=True) == ("gopen", "pipe:cat x")
    assert trust.opener("file:///d/a.tar", trusted=True) == ("local", "/d/a.tar")
    assert trust.opener("s3://b/a.tar", trusted=False) == ("object", "s3://b/a.tar")
    with pytest.raises(UnsupportedUrl):
        trust.opener("https://example.invalid/a.tar", trusted=False)
    assert trust.plain_relative("shards/17x64x96/000000.tar") and trust.plain_relative("a/.hidden/b.tar")
    for hostile in ("/dev/zero", "../x.tar", "a/../../x.tar", "pipe:cmd", "s3://b/x.tar", "a//b.tar", "a\\b.tar",
                    "a/./b.tar", "", "a\x00.tar", None, 3):
        assert not trust.plain_relative(hostile), hostile
    (tmp_path / "out" / "shards").mkdir(parents=True)
    (tmp_path / "other.tar").write_bytes(b"")
    (tmp_path / "out" / "shards" / "a.tar").symlink_to(tmp_path / "other.tar")
    (tmp_path / "out" / "shards" / "b.tar").write_bytes(b"")
    root = str(tmp_path / "out")
    assert trust.own_file_problem(f"{root}/shards/b.tar", root, "shards/b.tar") is None
    assert "symbolic link" in trust.own_file_problem(f"{root}/shards/a.tar", root, "shards/a.tar")
    assert trust.own_file_problem("s3://b/out/shards/a.tar", "s3://b/out", "shards/a.tar") is None
    assert trust.own_file_problem("s3://b/out/shards/a.tar", root, "shards/a.tar") == "is not under the dataset's root"


def test_a_file_url_the_user_typed_is_the_local_path_it_names_everywhere(tmp_path, monkeypatch):
    """One rule for a location the user typed: file:///abs and file://localhost/abs are /abs, for an output, an
    input, a dataset url and the identity that tells two spellings apart; never a folder named `file:`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    url = f"file://{tmp_path}/real"
    for spelling in (url, f"file://localhost{tmp_path}/real", f"FILE://LocalHost{tmp_path}/real"):
        assert trust.typed(spelling) == f"{tmp_path}/real"
        assert location.resolve(spelling) == location.output_location(spelling) == tmp_path / "real"
        assert location.local(spelling) == location.argument(spelling) == tmp_path / "real"
        assert location.identity(spelling) == str(tmp_path / "real")
        assert trust.local_path(spelling) == f"{tmp_path}/real"
    assert trust.typed("videos/a.mp4") == "videos/a.mp4" and trust.typed("s3://b/x") == "s3://b/x"
    assert not any(p.name.startswith("file:") for p in tmp_path.iterdir())


@pytest.mark.parametrize(("spelling", "why"), [
    ("file://nas.example/x/a.mp4", "names a file on the host 'nas.example'"),
    ("file:relative/a.mp4", r"a file url is file:///ABSOLUTE/PATH \(three slashes\)"),
    ("file:/abs/a.mp4", r"a file url is file:///ABSOLUTE/PATH \(three slashes\)"),
    ("file://", "names no path"),
    ("file:///x/my%20video.mp4", "percent-escapes, queries and fragments"),
])
def test_an_unusual_file_url_the_user_typed_is_refused_naming_it_and_why(spelling, why, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for how in (trust.typed, location.resolve, location.local, location.identity, location.argument,
                location.output_location, trust.local_path):
        with pytest.raises(ConfigError, match=f"^'{spelling}': (it )?{why}.*refused, nothing was opened or written"):
            how(spelling)
    assert list(tmp_path.iterdir()) == []


def test_a_file_url_read_from_a_file_keeps_the_strangers_rule(tmp_path, monkeypatch):
    """Not loosened: a string read from a file (a list row, a manifest) that spells file:///x is a local file of that
    very spelling, never /x, and opening one that is not there fails naming it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.tar").write_bytes(b"x")
    assert trust.opener(f"file://{tmp_path}/a.tar", trusted=False) == ("local", f"file://{tmp_path}/a.tar")
    with pytest.raises(FileNotFoundError):
        location.open_url(f"file://{tmp_path}/a.tar", trusted=False)
    assert not trust.openable_from_file(f"file://{tmp_path}/a.tar")
