"""Where inputs come from: tables with clip spans and extra columns (Panda-70M's form), webdataset tars of videos
read in place (video2dataset's layout), each encoded end to end with the tiny random VAE."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ENCODE_SMALL, TINY_CLIP

from latentcache.cli import EXIT_SOME_FAILED, build_parser, settings_from_args
from latentcache.encode import job
from latentcache.encode.chunk_plan import clip_key, input_id
from latentcache.encode.decoding.decode import decode_clip
from latentcache.encode.decoding.probing import probe
from latentcache.encode.inputs import discover_inputs, iter_inputs
from latentcache.encode.job_plan import InputTable, input_from_line, input_line
from latentcache.errors import ConfigError, InputError
from latentcache.storage import sources
from latentcache.tools.synthetic import damage_packet, write_video
from latentcache.train.dataset import LatentShardDataset


def encode_job(args) -> int:
    """The encode job of these arguments, as one process."""
    return job.run(settings_from_args(args))


def _args(inputs: list[str], out: Path, *extra: str):
    return build_parser().parse_args(["encode", *inputs, "--out", str(out), "--device", "cpu", "--workers", "0",
                                      *ENCODE_SMALL, *extra])


def _samples(out: Path) -> list[dict]:
    return sorted(LatentShardDataset(out), key=lambda s: s["key"])


def _failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ tables


PANDA_SPANS = "[['0:00:00.000', '0:00:02.500'], ['0:00:02.500', '0:00:05.000']]"


def test_table_cells_panda_forms_numbers_and_json(tmp_path: Path) -> None:
    rows = [
        {"path": "v.mp4", "timestamp": PANDA_SPANS, "caption": "['a cat', 'a dog']", "videoID": "abc"},
        {"path": "v.mp4", "timestamp": "[[1, 3.5]]", "caption": "one", "videoID": "abc"},
        {"path": "w.mp4", "timestamp": "", "caption": "[not a list]", "videoID": "w"},
    ]
    with open(tmp_path / "l.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "l.jsonl").write_text(json.dumps({"url": "x/y.mp4", "start": "1:02.5", "end": 70, "score": 0.9}))
    a, b, c = iter_inputs([tmp_path / "l.csv"])
    assert a.spans == ((0.0, 2.5), (2.5, 5.0)) and a.caption == ("a cat", "a dog") and a.extra == {"videoID": "abc"}
    assert a.origin == "l.csv row 1" and b.spans == ((1.0, 3.5),) and b.caption == "one"
    assert c.spans is None and c.caption == "[not a list]" and c.origin is None
    # The same video with other spans is another input, with other keys; the same row twice is one input.
    assert len({input_id(a), input_id(b), input_id(c)}) == 3 and input_id(a).startswith("v.mp4#")
    assert len(InputTable([a, b, c, a])) == 3
    for v in (a, b, c):  # the inputs-file line round-trips; a plain input's line has no new fields
        assert input_from_line(json.loads(json.dumps(input_line(v)))) == v
    assert set(input_line(c)) == {"caption", "path", "relpath", "extra"}
    (d,) = iter_inputs([tmp_path / "l.jsonl"])
    assert d.spans == ((62.5, 70.0),) and d.extra == {"score": 0.9} and d.relpath == "x/y.mp4"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "a.mp4", "timestamp": [["soon", "later"]]}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl row 1: timestamp 'soon' is not a time; expected seconds"):
        list(iter_inputs([tmp_path / "bad.jsonl"]))


def test_parquet_table_with_span_lists_and_extra_columns(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["a.mp4", "b.mp4"], "timestamp": [[[0.0, 2.0], [3.0, 4.5]], None],
                             "caption": [["x", "y"], None], "license": ["cc-by", "cc0"], "score": [1, 2]}),
                   tmp_path / "t.parquet")
    a, b = iter_inputs([tmp_path / "t.parquet"])
    assert a.spans == ((0.0, 2.0), (3.0, 4.5)) and a.caption == ("x", "y")
    assert a.extra == {"license": "cc-by", "score": 1} and b.spans is None and b.extra == {"license": "cc0", "score": 2}


@pytest.fixture(scope="module")
def six_seconds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("table")
    write_video(d / "v", codec="h264", num_frames=144, height=64, width=96, fps=24)  # 6 s
    return d


def test_table_with_spans_encodes_end_to_end(six_seconds: Path, tmp_path: Path) -> None:
    """A Panda-70M-style CSV: clips lie inside their spans, captions per span, other columns in `meta["row"]`,
    bad spans are failure records naming the row, and the run goes on."""
    table = six_seconds / "panda.csv"
    rows = [
        ["v.mp4", PANDA_SPANS, "['first shot', 'second shot']", "abc", "[0.41, 0.44]"],
        ["v.mp4", "[[1.0, 3.5]]", "overlapping row", "abc", "0.3"],
        ["v.mp4", "[['0:00:00.000', '0:00:09.000']]", "past the end", "abc", "0.1"],
        ["v.mp4", "[[4.0, 3.0]]", "backwards", "abc", "0.1"],
    ]
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["path", "timestamp", "caption", "videoID", "matching_score"], *rows])
    out = tmp_path / "out"
    assert encode_job(_args([str(table)], out, "--clips", "uniform:2", "--samples-per-shard", "4")) == \
        EXIT_SOME_FAILED
    samples = _samples(out)
    assert len(samples) == 6  # 2 spans x 2 clips, and 2 clips of the other row's one span
    spans_of = {}
    for s in samples:
        meta = s["meta"]
        low, high = meta["span"]
        # Every frame taken is shown inside the span: a span's end (a cut) is never crossed.
        assert all(low <= t < high for t in meta["frame_times"]), (meta["span"], meta["frame_times"])
        assert meta["source"] == "v.mp4" and meta["row"]["videoID"] == "abc"
        spans_of.setdefault(tuple(meta["span"]), []).append((meta["span_index"], s["caption"]))
    assert spans_of == {(0.0, 2.5): [(0, "first shot")] * 2, (2.5, 5.0): [(1, "second shot")] * 2,
                        (1.0, 3.5): [(0, "overlapping row")] * 2}
    assert len({s["key"] for s in samples}) == 6
    failures = {f["row"]: f for f in _failures(out)}
    assert set(failures) == {"panda.csv row 3", "panda.csv row 4"}
    assert "ends past the video's end (6.000s)" in failures["panda.csv row 3"]["message"]
    assert "ends before it starts" in failures["panda.csv row 4"]["message"]
    assert all(f["stage"] == "plan" and f["path"] == str(six_seconds / "v.mp4") for f in failures.values())
    # Keys follow the span values, not the row order: the same table reordered gives the same keys.
    reordered = six_seconds / "reordered.csv"
    with open(reordered, "w", newline="") as f:
        csv.writer(f).writerows([["path", "timestamp", "caption", "videoID", "matching_score"], *rows[::-1]])
    ids = {input_id(v) for v in discover_inputs([reordered])}
    assert {s["key"] for s in samples} <= {clip_key(i, n) for i in ids for n in range(4)}


# ------------------------------------------------------------------------------------------------- tars


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """video2dataset's output folder: shards of key.mp4 + key.txt + key.json, its stats files beside them; one
    corrupt member, one symlink member and one member named `../escape.mp4`."""
    d = tmp_path_factory.mktemp("v2d")
    src = tmp_path_factory.mktemp("v2d_src")
    h264 = write_video(src / "a", codec="h264", num_frames=24, height=64, width=96, fps=8).read_bytes()
    vp9 = write_video(src / "b", codec="vp9", num_frames=24, height=64, width=96, fps=8).read_bytes()
    with tarfile.open(d / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "000000.mp4", h264)
        _add(tar, "000000.txt", b"a caption from the txt")
        _add(tar, "000000.json", json.dumps({"url": "https://example.com/0", "key": "000000", "status": "success",
                                             "caption": "the txt wins", "yt_meta_dict": {"big": "dump"}}).encode())
        _add(tar, "000001.webm", vp9)
        _add(tar, "000001.json", json.dumps({"url": "https://example.com/1", "caption": "a caption from the json"})
             .encode())
        _add(tar, "000002.mp4", np.random.default_rng(0).bytes(5000))
        link = tarfile.TarInfo("000003.mp4")
        link.type, link.linkname = tarfile.SYMTYPE, "000000.mp4"
        tar.addfile(link)
        _add(tar, "../escape.mp4", h264)
    with tarfile.open(d / "00001.tar", "w") as tar:
        _add(tar, "000010.mp4", h264)
        _add(tar, "000010.txt", b"second shard")
    (d / "00000.parquet").write_bytes(b"PAR1 stats")  # video2dataset's per-shard stats: not inputs
    (d / "00000_stats.json").write_text("{}")
    return d


def test_tar_member_file_reads_and_seeks_like_the_bytes(shard_dir: Path) -> None:
    with tarfile.open(shard_dir / "00000.tar") as tar:
        expected = tar.extractfile("000000.mp4").read()
    path = sources.tar_member_path(shard_dir / "00000.tar", "000000.mp4")
    assert sources.source_size(path) == len(expected)
    rng = np.random.default_rng(1)
    with sources.open_source(path) as f:
        assert f.read() == expected
        for _ in range(50):
            pos, n = int(rng.integers(0, len(expected) + 10)), int(rng.integers(0, 3000))
            whence = int(rng.integers(0, 3))
            target = f.seek(pos - (len(expected) if whence == 2 else f.tell() if whence == 1 else 0), whence)
            assert target == f.tell() and f.read(n) == expected[target : target + n]
    with pytest.raises(sources.UnsafeMember, match="is a link"):
        sources.open_source(sources.tar_member_path(shard_dir / "00000.tar", "000003.mp4"))
    with pytest.raises(sources.MemberNotFound, match="no member 'nope.mp4'"):
        sources.source_size(sources.tar_member_path(shard_dir / "00000.tar", "nope.mp4"))


def test_seek_heavy_clips_decode_the_same_from_a_tar(tmp_path: Path) -> None:
    """Clips late in a file, out of order, with a keyframe every second: each seeks inside the tar member."""
    video = write_video(tmp_path / "long", codec="h264", num_frames=240, height=64, width=96, fps=24, gop=24)
    mkv = write_video(tmp_path / "m", codec="av1", num_frames=96, height=64, width=96, fps=24, gop=12)
    damaged = damage_packet(mkv, tmp_path / "damaged.mkv", 30)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for f in (video, mkv, damaged):
            tar.add(f, arcname=f"x/{f.name}")
    member = sources.tar_member_path(tmp_path / "s.tar", "x/long.mp4")
    assert probe(member).duration == probe(video).duration
    for start in (7.3, 0.0, 4.1, 7.9, 2.2):
        a, b = decode_clip(video, start, TINY_CLIP), decode_clip(member, start, TINY_CLIP)
        assert np.array_equal(a.frames, b.frames) and a.meta["frame_times"] == b.meta["frame_times"]
    a = decode_clip(mkv, 0.5, TINY_CLIP)
    assert np.array_equal(a.frames, decode_clip(sources.tar_member_path(tmp_path / "s.tar", "x/m.mkv"), 0.5,
                                                TINY_CLIP).frames)
    # The Matroska CRC check reads the member's clusters: damage is caught inside the tar as in the file.
    with pytest.raises(InputError) as from_file:
        decode_clip(damaged, 0.0, TINY_CLIP)
    with pytest.raises(InputError) as from_tar:
        decode_clip(sources.tar_member_path(tmp_path / "s.tar", "x/damaged.mkv"), 0.0, TINY_CLIP)
    assert from_tar.value.reason == from_file.value.reason and "CRC-32" in from_tar.value.reason


def test_tar_folder_lists_members_with_stable_relpaths(shard_dir: Path) -> None:
    found = {v.relpath: v for v in iter_inputs([shard_dir.parent / shard_dir.name])}
    assert sorted(found) == ["00000.tar/../escape.mp4", "00000.tar/000000.mp4", "00000.tar/000001.webm",
                             "00000.tar/000002.mp4", "00000.tar/000003.mp4", "00001.tar/000010.mp4"]
    first = found["00000.tar/000000.mp4"]
    assert first.path == f"{shard_dir / '00000.tar'}::000000.mp4" and first.caption == "a caption from the txt"
    assert first.extra == {"url": "https://example.com/0", "key": "000000", "status": "success"}
    assert found["00000.tar/000001.webm"].caption == "a caption from the json"
    with pytest.raises(ConfigError, match=r"00002.tar' does not exist"):
        list(iter_inputs([str(shard_dir / "{00000..00002}.tar")]))


def test_tars_of_videos_encode_end_to_end(shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pattern = str(shard_dir / "{00000..00001}.tar")
    assert encode_job(_args([pattern], out)) == EXIT_SOME_FAILED
    samples = {s["meta"]["source"]: s for s in _samples(out)}
    assert sorted(samples) == ["00000.tar/000000.mp4", "00000.tar/000001.webm", "00001.tar/000010.mp4"]
    first = samples["00000.tar/000000.mp4"]
    assert first["key"] == clip_key("00000.tar/000000.mp4", 0)  # the tar's relative path and the member's name
    assert first["caption"] == "a caption from the txt" and first["meta"]["row"]["url"] == "https://example.com/0"
    assert samples["00000.tar/000001.webm"]["caption"] == "a caption from the json"
    assert samples["00001.tar/000010.mp4"]["caption"] == "second shard"
    failures = {f["path"].split("::")[1]: f for f in _failures(out)}
    assert set(failures) == {"000002.mp4", "000003.mp4", "../escape.mp4"}  # the rest of the tar went on
    assert "not a readable video container" in failures["000002.mp4"]["message"]
    assert "is a link, not a regular file; refused" in failures["000003.mp4"]["message"]
    assert "absolute or parent-relative" in failures["../escape.mp4"]["message"]
    # Extracting nothing: the run wrote no video file anywhere under OUT.
    assert not [p for p in out.rglob("*") if p.suffix in (".mp4", ".webm")]


def test_spans_are_part_of_the_planned_work(six_seconds: Path, tmp_path: Path, tiny_vae) -> None:
    """The top-level plan holds the spans (inputs file, key digests): other spans for a row are other work, refused in
    the same --out, naming the input; a plain input's line is what it was before spans existed."""
    from conftest import tiny_settings

    from latentcache.encode import planning
    from latentcache.encode.chunk_plan import InputVideo

    assert set(input_line(InputVideo("/d/a.mp4", "a.mp4", "c"))) == {"caption", "path", "relpath"}
    table = six_seconds / "one.jsonl"
    out, settings = tmp_path / "out", tiny_settings()
    table.write_text(json.dumps({"path": "v.mp4", "start": 0, "end": 2.5}) + "\n")
    plan = planning.load_or_make_plan(out, iter_inputs([table]), settings, tiny_vae)
    line = json.loads((out / "inputs" / "part-0000.jsonl").read_text())
    assert line["spans"] == [[0.0, 2.5]] and line["origin"] == "one.jsonl row 1"
    table.write_text(json.dumps({"path": "v.mp4", "start": 0, "end": 3.0}) + "\n")
    with pytest.raises(ConfigError, match=r"1 planned input\(s\) are missing, e\.g\. v\.mp4#"):
        planning.load_or_make_plan(out, iter_inputs([table]), settings, tiny_vae)
    assert len(plan.parts) == 1


def _strict_json(data: bytes):
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(data, parse_constant=refuse)


def test_tar_sidecars_with_nan_infinity_and_deep_nesting(tmp_path: Path, caplog) -> None:
    """A sidecar's NaN, Infinity and 1e999 reach the sample JSON as null (strict readers reject NaN); a sidecar
    nested 200,000 deep or holding an unpaired surrogate costs one warning, not the run."""
    video = write_video(tmp_path / "a", codec="h264", num_frames=24, height=64, width=96, fps=8).read_bytes()
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        _add(tar, "000000.mp4", video)
        _add(tar, "000000.json", b'{"caption": "c", "score": NaN, "big": 1e999, "neg": -Infinity, "ok": 1.5}')
        _add(tar, "000001.mp4", video)
        _add(tar, "000001.json", b"[" * 200_000)
        _add(tar, "000002.mp4", video)
        _add(tar, "000002.json", b'{"caption": "\\ud800", "k": 1}')
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert encode_job(_args([str(tmp_path / "s.tar")], out)) == 0
    assert "000001.json is not JSON (nested more than 64 levels deep)" in caplog.text
    assert "000002.json is not JSON (holds an unpaired UTF-16 surrogate" in caplog.text
    metas = {}
    for shard in sorted(out.rglob("*.tar")):
        with tarfile.open(shard) as t:
            for m in t:
                if m.name.endswith(".json"):
                    meta = _strict_json(t.extractfile(m).read())  # what a strict reader sees
                    metas[meta["source"]] = meta
    assert sorted(metas) == ["s.tar/000000.mp4", "s.tar/000001.mp4", "s.tar/000002.mp4"]
    assert metas["s.tar/000000.mp4"]["row"] == {"score": None, "big": None, "neg": None, "ok": 1.5}
    assert "row" not in metas["s.tar/000001.mp4"] and "row" not in metas["s.tar/000002.mp4"]
    for name in ["manifest.json", *(p.relative_to(out).as_posix() for p in out.rglob("*.json"))]:
        _strict_json((out / name).read_bytes())  # manifest, sidecars, plans: strict JSON too


def test_a_tar_holding_a_member_twice_warns_and_uses_the_last_copy(tmp_path: Path, caplog) -> None:
    video = write_video(tmp_path / "a", codec="h264", num_frames=24, height=64, width=96, fps=8).read_bytes()
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        _add(tar, "000000.mp4", b"not the video that is used")
        _add(tar, "000000.txt", b"the first caption")
        _add(tar, "000000.mp4", video)
        _add(tar, "000000.txt", b"the last caption")
    with caplog.at_level("WARNING"):
        (only,) = iter_inputs([tmp_path / "s.tar"])  # one input, not one per copy
    assert only.caption == "the last caption" and only.relpath == "s.tar/000000.mp4"
    for name in ("000000.mp4", "000000.txt"):
        assert f"{tmp_path / 's.tar'}: holds the member '{name}' 2 times; using its last copy" in caplog.text
    assert probe(only.path).duration == pytest.approx(3.0)  # the bytes read are the last copy's


@pytest.mark.slow
def test_the_deepest_rows_accepted_encode_and_read_back(tmp_path: Path) -> None:
    """The nesting bound on list rows leaves room for what latentcache writes from them: a JSONL row 32 levels deep
    and a Parquet cell as deep as pyarrow reads (49 lists) reach the sample JSON and are read back by the dataset."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def nested(depth: int):
        v = 1
        for _ in range(depth):
            v = [v]
        return v

    write_video(tmp_path / "v", codec="h264", num_frames=24, height=64, width=96, fps=8)
    write_video(tmp_path / "w", codec="h264", num_frames=24, height=64, width=96, fps=8)
    (tmp_path / "l.jsonl").write_text(json.dumps({"path": "v.mp4", "x": nested(31)}) + "\n")
    pq.write_table(pa.table({"path": ["w.mp4"], "y": [nested(49)]}), tmp_path / "l.parquet")
    out = tmp_path / "out"
    assert encode_job(_args([str(tmp_path / "l.jsonl"), str(tmp_path / "l.parquet")], out)) == 0
    rows = {s["meta"]["source"]: s["meta"]["row"] for s in _samples(out)}
    assert rows == {"v.mp4": {"x": nested(31)}, "w.mp4": {"y": nested(49)}}
    deeper = tmp_path / "deeper.jsonl"
    deeper.write_text(json.dumps({"path": "v.mp4", "x": nested(32)}) + "\n")
    with pytest.raises(ConfigError, match="deeper.jsonl: line 1 is not JSON .nested more than 32 levels deep"):
        discover_inputs([deeper])


def test_file_and_member_names_that_are_not_utf8_cost_a_warning(tmp_path: Path, caplog) -> None:
    """A Latin-1 name on disk or in a tar (the OS hands it over as surrogate escapes, which no plan or sample JSON
    can hold) is not an input: one warning naming it, and the rest is encoded."""
    import os

    d = tmp_path / "in"
    d.mkdir()
    video = write_video(d / "ok", codec="h264", num_frames=24, height=64, width=96, fps=8)
    os.link(video, os.fsencode(d) + b"/caf\xe9.mp4")
    with tarfile.open(d / "t.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        _add(tar, "caf\xe9.mp4", video.read_bytes())
        _add(tar, "fine.mp4", video.read_bytes())
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert encode_job(_args([str(d)], out)) == 0
    assert sorted(s["meta"]["source"] for s in _samples(out)) == ["ok.mp4", "t.tar/fine.mp4"]
    assert f"{d}/caf\\xe9.mp4: the file name is not UTF-8" in caplog.text
    assert f"{d}/t.tar::caf\\xe9.mp4: the file name is not UTF-8" in caplog.text
    with pytest.raises(ConfigError, match=r"caf\\\\xe9.mp4'?: the path is not UTF-8"):
        list(iter_inputs([os.fsdecode(os.fsencode(d) + b"/caf\xe9.mp4")]))


def test_csv_cells_holding_json_lists_arrive_as_lists_like_jsonl_and_parquet(tmp_path: Path) -> None:
    """Panda-70M's CSV gives `matching_score` per span as `[0.43, 0.41]`: it reaches meta["row"] as a list that can
    be indexed by span_index, as from a JSONL or Parquet list; a cell that only looks like JSON stays text."""
    write_video(tmp_path / "a", codec="h264", num_frames=72)
    with open(tmp_path / "list.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "start", "end", "matching_score", "note", "meta", "count"])
        w.writerow(["a.mp4", "0", "3", "[0.43, 0.41]", "[draft]", '{"license": "cc-by"}', "7"])
    with open(tmp_path / "list.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"path": "a.mp4", "start": 0, "end": 3, "matching_score": [0.43, 0.41],
                            "note": "[draft]", "meta": {"license": "cc-by"}, "count": "7"}) + "\n")
    [from_csv] = iter_inputs([tmp_path / "list.csv"])
    [from_jsonl] = iter_inputs([tmp_path / "list.jsonl"])
    assert from_csv.extra == from_jsonl.extra == {"matching_score": [0.43, 0.41], "note": "[draft]",
                                                  "meta": {"license": "cc-by"}, "count": "7"}
