"""Broken inputs: each costs one failure record and a log line, never the run, and never a garbage clip."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLIP, tiny_settings

from latentcache.cli import EXIT_NO_SAMPLES, EXIT_OK, EXIT_SOME_FAILED, main, report_finalize
from latentcache.encode import execute, planning
from latentcache.encode.decoding.decode import decode_clip
from latentcache.encode.decoding.probing import probe
from latentcache.encode.inputs import discover_inputs
from latentcache.errors import ConfigError, InputError
from latentcache.tools.synthetic import square_origin, write_video

CLI = ["--vae", "tiny-random-cogvideox", "--frames", "17", "--fps", "8", "--height", "64", "--width", "96"]

# kind -> (the error type recorded, a piece of the message)
NOT_PROBED = {
    "empty": ("TruncatedVideo", "empty file (0 bytes)"),
    "truncated_mp4": ("InvalidDataError", "not a readable video container"),
    "random": (None, ""),  # random bytes may look like some format or none: any probe failure will do
    "text": ("InvalidDataError", "not a readable video container"),
    "audio": ("NotAVideo", "no video stream (streams found: audio)"),
    "cover_art": ("NotAVideo", "no video stream (streams found: audio, video (cover art))"),
    "png": ("NotAVideo", "a still image (png_pipe format), not a video"),
}


@pytest.mark.parametrize("kind", sorted(NOT_PROBED))
def test_probe_rejects_what_is_not_a_readable_video(bad_inputs, kind):
    error, message = NOT_PROBED[kind]
    with pytest.raises(InputError) as err:
        probe(bad_inputs[kind])
    assert err.value.stage == "probe" and message in err.value.reason and not err.value.skipped
    if error:
        assert type(err.value.__cause__).__name__ == error


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found") as err:
        decode_clip(tmp_path / "gone.mp4", 0.0, TINY_CLIP)
    assert isinstance(err.value.__cause__, FileNotFoundError) and err.value.stage == "decode"


def test_truncated_streamable_file_is_a_failure_not_a_short_clip(bad_inputs):
    assert probe(bad_inputs["truncated_webm"]).duration == pytest.approx(3.0)  # what the header claims
    with pytest.raises(InputError, match=r"ends at 1\.\d+s, but the container announces 3\.00s") as err:
        decode_clip(bad_inputs["truncated_webm"], 0.0, TINY_CLIP)
    assert type(err.value.__cause__).__name__ == "TruncatedVideo" and not err.value.skipped
    # Not even --short pad turns a damaged file into a padded clip.
    with pytest.raises(InputError, match="truncated"):
        decode_clip(bad_inputs["truncated_webm"], 0.0, dataclasses.replace(TINY_CLIP, short="pad"))


def square_xs(frames: np.ndarray) -> list[float]:
    xs = []
    for f in frames:
        r, g, b = (f[..., c].astype(int) for c in range(3))
        cols = np.nonzero((r > 170) & (g < 110) & (b < 100))[1]
        xs.append(float(cols.mean()) if len(cols) else float("nan"))
    return xs


def assert_intact(clip, num_frames: int = 120) -> None:
    """Every frame shows the source frame its timestamp names (garbage or a stale frame would not)."""
    meta = clip.meta
    for x, t in zip(square_xs(clip.frames), meta["frame_times"], strict=True):
        x0, _ = square_origin(round(t * 24), num_frames, 96, 128)
        want = (x0 + 12) * meta["scaled_size"][0] / 128 - meta["box"][0]
        assert abs(x - want) < 2.5, (t, x, want)
    assert len(set(meta["frame_times"])) == len(meta["frame_times"])


def test_corrupt_transport_stream_drops_the_damaged_clip_and_decodes_around_it(bad_inputs):
    path = bad_inputs["corrupt_ts"]
    clip = dataclasses.replace(TINY_CLIP, frames=9)  # 1 s clips
    assert_intact(decode_clip(path, 0.5, clip))  # before the damage at 2.2 s
    with pytest.raises(InputError, match="clip dropped") as err:
        decode_clip(path, 1.8, clip)  # over it
    assert type(err.value.__cause__).__name__ == "CorruptVideo" and err.value.stage == "decode"
    assert "2.1" in err.value.reason or "2.2" in err.value.reason  # says where
    # After the next keyframe (3 s) the pictures are whole again: that clip is decoded, and is right.
    assert_intact(decode_clip(path, 3.0, clip))


def test_corrupt_frame_inside_an_mp4_drops_the_clip(bad_inputs):
    """The mp4 index is intact, so only the H.264 decoder can tell: it must say so, not conceal a smear."""
    path = bad_inputs["corrupt_mp4"]
    clip = dataclasses.replace(TINY_CLIP, frames=9)
    with pytest.raises(InputError, match="a packet does not decode") as err:
        decode_clip(path, 1.8, clip)
    assert type(err.value.__cause__).__name__ == "CorruptVideo"
    assert_intact(decode_clip(path, 0.5, clip))
    assert_intact(decode_clip(path, 3.0, clip))


@pytest.mark.parametrize("kind", ["corrupt_ts", "corrupt_mp4"])
def test_sliding_over_a_damaged_file_gives_no_garbage(bad_inputs, kind):
    """Every clip is either right or dropped, none is silently wrong."""
    kept, dropped = 0, 0
    for start in np.arange(0.0, 3.9, 0.25):
        try:
            assert_intact(decode_clip(bad_inputs[kind], float(start), dataclasses.replace(TINY_CLIP, frames=9)))
            kept += 1
        except InputError as e:
            assert type(e.__cause__).__name__ == "CorruptVideo", e.reason
            dropped += 1
    assert kept >= 8 and dropped >= 3


def read_failures(out) -> dict[str, dict]:
    lines = (out / "failures.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in records}
    assert len(by_name) == len(records), "one record per failed input"
    for r in records:
        assert {"path", "stage", "error", "message"} <= set(r)
    return by_name


@pytest.mark.slow
def test_a_run_over_every_bad_input_records_each_and_writes_the_rest(bad_inputs, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main(["encode", str(bad_inputs["good"].parent), "--out", str(out), *CLI, "--clips", "all"])
    printed = capsys.readouterr().out
    assert code == EXIT_SOME_FAILED, printed
    failures = read_failures(out)
    assert {name: (r["stage"], r["error"]) for name, r in failures.items() if name != "random.mp4"} == {
        "empty.mp4": ("probe", "TruncatedVideo"),
        "truncated.mp4": ("probe", "InvalidDataError"),
        "text.mp4": ("probe", "InvalidDataError"),
        "audio.mp4": ("probe", "NotAVideo"),
        "song.mp3": ("probe", "NotAVideo"),
        "image.mp4": ("probe", "NotAVideo"),
        "truncated.webm": ("decode", "TruncatedVideo"),
        "corrupt.ts": ("decode", "CorruptVideo"),  # its second clip; the first is written
        "corrupt.mp4": ("decode", "CorruptVideo"),  # the same
    }
    assert failures["random.mp4"]["stage"] == "probe"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 3  # good.mp4 and the undamaged first clips of the corrupt files
    # Every failure is also a log line naming the file.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for name in failures:
        assert name in logged
    assert "videos: 11 input(s), 3 with clips written" in printed
    assert "0 skipped, 10 failed (" in printed
    assert "probe/NotAVideo: 3" in printed and "decode/CorruptVideo: 2" in printed
    # One vocabulary: the summary's counts are the manifest's and failures.jsonl's.
    assert (manifest["counts"]["skipped"], manifest["counts"]["failed"]) == (0, 10)
    assert manifest["counts"]["failed_by_reason"]["probe/NotAVideo"] == 3
    assert {r["outcome"] for r in failures.values()} == {"failed"}


def test_strict_stops_at_the_first_failure(bad_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["encode", str(bad_inputs["good"].parent), "--out", str(out), *CLI, "--strict"])
    assert code == EXIT_SOME_FAILED
    assert "error:" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()


def test_only_skips_exit_zero_and_are_reported_by_reason(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    write_video(d / "ok", codec="h264", num_frames=72)
    write_video(d / "short", codec="h264", num_frames=12)
    code = main(["encode", str(d), "--out", str(tmp_path / "out"), *CLI])
    printed = capsys.readouterr().out
    assert code == EXIT_OK, printed
    assert "1 written of 1 planned; 1 skipped (too short: 1), 0 failed" in printed
    # The same counts in the manifest, `info` and failures.jsonl, in the same words: a skip is not a failure.
    out = tmp_path / "out"
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert (counts["skipped"], counts["failed"], counts["skipped_by_reason"]) == (1, 0, {"too short": 1})
    [record] = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert (record["outcome"], record["reason"], "error" in record) == ("skipped", "too short", False)
    assert main(["info", str(out)]) == EXIT_OK
    info = capsys.readouterr().out
    assert re.search(r"skipped\s+1 \(too short: 1\)", info) and re.search(r"failed\s+0\n", info)


def test_a_run_that_writes_no_sample_exits_4_saying_why(tmp_path, capsys):
    """Two 5 s videos at the defaults' 49 frames / 8 fps (6 s needed): nothing is written, so the run fails loudly
    with the reason and the flags that would change it; verify and the dataset refuse the empty output too."""
    from latentcache import LatentShardDataset
    from latentcache.errors import ShardFormatError

    d = tmp_path / "in"
    d.mkdir()
    for name in ("a", "b"):
        write_video(d / name, codec="h264", num_frames=40, fps=8)
    out = tmp_path / "out"
    code = main(["encode", str(d), "--out", str(out), "--vae", "tiny-random-cogvideox", "--height", "64",
                 "--width", "96", "--workers", "0"])
    captured = capsys.readouterr()
    assert code == EXIT_NO_SAMPLES == 4, captured.out
    assert (f"error: {out}: no sample was written. All 2 input(s) are shorter than 49 frames at 8 fps (6.0 s); "
            "the longest is 5.00 s and holds 37 frames at 8 fps (4k+1 for this VAE): try --frame-buckets 37 (or "
            "--frames 37), --fps 10, --short pad.") in captured.err
    assert main(["verify", str(out)]) == EXIT_SOME_FAILED
    assert f"{out}: no samples" in capsys.readouterr().out
    with pytest.raises(ShardFormatError, match="no samples"):
        iter(LatentShardDataset(out))
    # A rerun of the same command over the same output says the same, again with exit 4.
    assert main(["encode", str(d), "--out", str(out), "--vae", "tiny-random-cogvideox", "--height", "64",
                 "--width", "96", "--workers", "0"]) == EXIT_NO_SAMPLES


@pytest.mark.slow
def test_files_deleted_or_replaced_between_plan_and_decode(tmp_path, tiny_vae, capsys):
    """A video deleted after planning is a failure record; one replaced after planning stops the run before any shard
    holds latents of other bytes under its key (encode/decoding/decoded_identity.py), naming it."""
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a", "b", "c"):
        write_video(d / name, codec="h264", num_frames=72)
    out = tmp_path / "out"
    settings = tiny_settings(samples_per_shard=8)
    plan = planning.load_or_make_plan(out, discover_inputs([d]), settings, tiny_vae)
    chunk_plans = planning.plan_chunks(out, plan, settings)  # probed here
    assert sum(len(c.clips) for c in chunk_plans) == 3
    (d / "a.mp4").unlink()  # deleted during the run
    execute.run(out, plan, tiny_vae, settings, chunk_plans=chunk_plans)
    assert report_finalize(out) == EXIT_SOME_FAILED
    failures = read_failures(out)
    assert (failures["a.mp4"]["stage"], failures["a.mp4"]["error"]) == ("decode", "FileNotFoundError")
    assert json.loads((out / "manifest.json").read_text())["counts"]["samples"] == 2
    assert "0 skipped, 1 failed (decode/FileNotFoundError: 1)" in capsys.readouterr().out

    out2 = tmp_path / "out2"
    plan = planning.load_or_make_plan(out2, discover_inputs([d]), settings, tiny_vae)
    chunk_plans = planning.plan_chunks(out2, plan, settings)
    (d / "b.mp4").write_text("replaced by an error page", encoding="utf-8")  # rewritten during the run
    with pytest.raises(ConfigError, match=r"b\.mp4 changed before it was decoded"):
        execute.run(out2, plan, tiny_vae, settings, chunk_plans=chunk_plans)
    assert not list(out2.rglob("*.tar"))


def test_a_raw_elementary_stream_is_a_record_not_a_crash(tmp_path):
    """A .h264 file has no container: it cannot seek, and its duration must be found by demuxing afresh."""
    (tmp_path / "in").mkdir()
    write_video(tmp_path / "in" / "good", codec="h264", num_frames=72)
    write_video(tmp_path / "in" / "raw.h264", codec="h264", num_frames=72)
    code = main(["encode", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--vae", "tiny-random-cogvideox",
                 "--frames", "17", "--fps", "8", "--height", "64", "--width", "96", "--workers", "0"])
    assert code in (EXIT_OK, EXIT_SOME_FAILED)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    # Either the raw stream was encoded, or it has its record; the good video is always there.
    assert manifest["counts"]["samples"] + len(records) == 2 and manifest["counts"]["samples"] >= 1


# ------------------------------------------------------------------------ hostile lists, sidecars and configs
# Every parser of a user's file turns malformed content into a clear error naming the file (exit 2), never a
# traceback (exit 1, "a bug"), and refuses it before anything is planned.

DEEP = "[" * 100_000
HUGE = "1" + "0" * 400


def _csv(rows: list[list[str]]) -> str:
    return "".join(",".join(f'"{c}"' for c in row) + "\n" for row in rows)


# name -> (list file name, its bytes, a piece of the error)
HOSTILE_LISTS = {
    "txt_nul_byte": ("l.txt", b"v.mp4\n# a comment\nv\x00.mp4\n", "row 2: the path 'v\\x00.mp4' holds a NUL byte"),
    "csv_nul_byte": ("l.csv", _csv([["path"], ["v.mp4\x00"]]).encode(), "row 1: the path"),
    "jsonl_nul_byte": ("l.jsonl", b'{"path": "v.mp4\\u0000"}\n', "holds a NUL byte"),
    "csv_deep_timestamp": ("l.csv", _csv([["path", "timestamp"], ["v.mp4", DEEP]]).encode(),
                           "is not a list of [start, end] spans"),
    "jsonl_deep_line": ("l.jsonl", ('{"path": "v.mp4", "x": ' + DEEP + "]" * 100_000 + "}\n").encode(),
                        "line 1 is not JSON (nested more than 32 levels deep)"),
    "jsonl_deep_cell": ("l.jsonl", ('{"path": "v.mp4", "x": ' + "[" * 100 + "]" * 100 + "}\n").encode(),
                        "line 1 is not JSON (nested more than 32 levels deep)"),
    "jsonl_huge_time": ("l.jsonl", ('{"path": "v.mp4", "start": ' + HUGE + "}\n").encode(),
                        "row 1: start 1000000"),
    "jsonl_nan_time": ("l.jsonl", b'{"path": "v.mp4", "end": NaN}\n', "row 1: end nan is not a time"),
    "jsonl_huge_int": ("l.jsonl", ('{"path": "v.mp4", "n": ' + "9" * 5000 + "}\n").encode(), "line 1 is not JSON"),
    "csv_huge_clock": ("l.csv", _csv([["path", "start"], ["v.mp4", HUGE + ":00:00"]]).encode(),
                       "row 1: start '1000000"),
    "csv_huge_span": ("l.csv", _csv([["path", "timestamp"], ["v.mp4", f"[[0, {HUGE}]]"]]).encode(),
                      "is not a time"),
    "csv_latin1": ("l.csv", "path,caption\nv.mp4,un café\n".encode("latin-1"),
                   "the byte at offset 25 (line 2) is not UTF-8; a list must be UTF-8 text"),
    "txt_latin1": ("l.txt", "v.mp4\ncafé.mp4\n".encode("latin-1"), "the byte at offset 9 (line 2) is not UTF-8"),
    "csv_cell_past_the_bound": ("l.csv", b'path,caption\nv.mp4,"' + b"x" * ((16 << 20) + 1) + b'"\n',
                                "line 2: a cell is longer than 16777216 characters"),
    "csv_bad_quoting": ("l.csv", b'path,caption\nv.mp4,"a"b\n', None),  # the csv module reads this; fine either way
    "parquet_not_parquet": ("l.parquet", b"PAR1 this is not parquet at all", "not a Parquet file latentcache can read"),
    "parquet_empty": ("l.parquet", b"", "not a Parquet file latentcache can read"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_LISTS))
def test_hostile_list_content_is_a_clear_error_before_anything_is_planned(tmp_path, capsys, name):
    if name.startswith("parquet"):
        pytest.importorskip("pyarrow")
    write_video(tmp_path / "v", codec="h264", num_frames=24, height=64, width=96, fps=8)
    file, data, message = HOSTILE_LISTS[name]
    (tmp_path / file).write_bytes(data)
    out = tmp_path / "out"
    code = main(["encode", str(tmp_path / file), "--out", str(out), *CLI])  # a bug would raise here
    err = capsys.readouterr().err
    if message is None:
        assert code in (EXIT_OK, 2), err
        return
    assert code == 2, err
    assert f"error: {tmp_path / file}" in err or f"error: {file}" in err, err
    assert message in err, err
    assert len(err) < 2000  # the hostile cell is shown cut short, not echoed whole
    assert not (out / "plan.json").exists()  # nothing planned: a fixed list runs without --overwrite


@pytest.mark.slow  # runs the console script twice in subprocesses
def test_a_nul_byte_row_refused_then_the_fixed_list_runs(tmp_path):
    """Through the console script: exit 2 and no traceback; the output is not stuck on the bad row."""
    write_video(tmp_path / "v", codec="h264", num_frames=24, height=64, width=96, fps=8)
    listing, out = tmp_path / "videos.txt", tmp_path / "out"
    listing.write_bytes(b"v.mp4\nw\x00.mp4\n")
    exe = [str(Path(sys.executable).parent / "latentcache"), "encode", str(listing), "--out", str(out), *CLI,
           "--device", "cpu"]
    bad = subprocess.run(exe, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert f"{listing}: row 2: the path 'w\\x00.mp4' holds a NUL byte" in bad.stderr
    listing.write_text("v.mp4\n")
    good = subprocess.run(exe, capture_output=True, text=True, timeout=300)
    assert good.returncode == EXIT_OK, good.stderr
    assert (out / "manifest.json").is_file()


def test_a_long_csv_caption_just_works(tmp_path):
    caption = "a very detailed caption " * 8000  # 192,000 characters: past the csv module's default limit
    with open(tmp_path / "l.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "caption"], ["v.mp4", caption]])
    (video,) = discover_inputs([tmp_path / "l.csv"])
    assert video.caption == caption.strip()


# Cells no reader may crash on: each row either gives an input whose line is strict JSON, or a ConfigError.
HOSTILE_CELLS = ["\x00", DEEP, "[" * 500 + "]" * 500, HUGE, HUGE + ":00:00", "1e999", "-1e999", "NaN", "Infinity",
                 "9" * 5000, "[[0, 1e999]]", "[[NaN, 1]]", "{'a': " * 300, "\ud800", "0:99:99", "::", "[[1]]",
                 "x" * 200_000, "\r\n\x85\u2028", "[" + "1," * 10000 + "]"]


@pytest.mark.parametrize("column", ["path", "caption", "start", "end", "timestamp", "other"])
def test_hostile_cells_through_every_list_reader(tmp_path, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from latentcache.encode.job_plan import input_line
    from latentcache.errors import ConfigError

    for i, cell in enumerate(HOSTILE_CELLS):
        row = {"path": "v.mp4", column: cell}
        safe = cell.encode("utf-8", "surrogatepass").decode("utf-8", "replace")  # files hold UTF-8 only
        files = {"l.jsonl": (json.dumps(row) + "\n").encode("utf-8", "surrogatepass"),
                 "j.jsonl": ("{" + ", ".join(f'"{k}": {v if k != "path" else json.dumps(v)}' for k, v in row.items())
                             + "}\n").encode("utf-8", "surrogatepass")}  # the cell as raw JSON text
        with open(tmp_path / "l.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([list(row), [safe if k == column else v for k, v in row.items()]])
        pq.write_table(pa.table({k: [safe if k == column else v] for k, v in row.items()}), tmp_path / "l.parquet")
        if column == "path":
            files["l.txt"] = safe.encode() + b"\n"
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        for name in [*files, "l.csv", "l.parquet"]:
            try:
                inputs = discover_inputs([tmp_path / name])
            except ConfigError as e:
                assert name in str(e), (i, name, e)
                continue
            for v in inputs:
                json.dumps(input_line(v), allow_nan=False)  # what is planned is strict JSON


def test_check_config_refuses_what_is_not_a_number(encoded_dir, tmp_path, capsys):
    example = (Path(__file__).resolve().parents[2] / "examples" / "configs" / "cogvideox_tiny_sat.yaml").read_text()
    for old, new, key in [("in_channels: 16", "in_channels: .inf", "in_channels = inf"),
                          ("in_channels: 16", "in_channels: .nan", "in_channels = nan"),
                          ("in_channels: 16", "in_channels: 16.5", "in_channels = 16.5"),
                          ("z_channels: 16", "z_channels: sixteen", "z_channels = 'sixteen'"),
                          ("z_channels: 16", "z_channels: [16]", "z_channels = [16]")]:
        assert old in example
        path = tmp_path / "trainer.yaml"
        path.write_text(example.replace(old, new, 1))
        assert main(["check-config", str(path), "--data", str(encoded_dir)]) == 2  # a bug would raise here
        err = capsys.readouterr().err
        assert f"error: {path}: " in err and key in err and "is not a valid" in err, err


def test_a_row_naming_a_path_too_long_for_the_os_is_a_failure_record(tmp_path, capsys):
    """Like a row naming a missing file: one failure record, the rest of the list is encoded."""
    write_video(tmp_path / "v", codec="h264", num_frames=24, height=64, width=96, fps=8)
    (tmp_path / "l.txt").write_text("v.mp4\n" + "a" * 5000 + ".mp4\n" + "b/" * 3000 + "c.mp4\n")
    out = tmp_path / "out"
    assert main(["encode", str(tmp_path / "l.txt"), "--out", str(out), *CLI]) == EXIT_SOME_FAILED
    failures = read_failures(out)
    assert len(failures) == 2 and all("File name too long" in f["message"] for f in failures.values())
    assert (out / "manifest.json").is_file()


def _mjpeg_avi(path: Path, sizes: tuple[tuple[int, int], ...] = ((96, 64),) * 3) -> bytes:
    """An MJPEG AVI whose frames have these (width, height): each JPEG carries its own size, the AVI the first's."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mjpeg", rate=8)
        s.width, s.height, s.pix_fmt = *sizes[0], "yuvj420p"
        for i, (width, height) in enumerate(sizes):
            encoder = av.CodecContext.create("mjpeg", "w")
            encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuvj420p"
            encoder.time_base = Fraction(1, 8)
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), i * 10 % 256, np.uint8), format="rgb24")
            frame = frame.reformat(format="yuvj420p")
            frame.pts = i
            for p in [*encoder.encode(frame), *encoder.encode(None)]:
                p.stream, p.time_base, p.pts, p.dts = s, Fraction(1, 8), i, i
                c.mux(p)
    return path.read_bytes()


def test_a_video_declaring_a_huge_frame_is_refused_before_any_frame_is_decoded(tmp_path):
    """A few-KB file can declare 9000x8200 frames (74 megapixels, ~110 MB each decoded, times frame threading's
    frames in flight): refused at the probe, naming the file, its size and the limit, before FFmpeg allocates one."""
    import struct

    data = bytearray(_mjpeg_avi(tmp_path / "small.avi"))
    # The AVI headers' width and height (avih and the stream's BITMAPINFOHEADER), and every JPEG frame's SOF0.
    data = data.replace(struct.pack("<ii", 96, 64), struct.pack("<ii", 9000, 8200))
    data = data.replace(b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", 64, 96),
                        b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", 8200, 9000))
    crafted = tmp_path / "crafted.avi"
    crafted.write_bytes(bytes(data))
    assert len(data) < 10_000
    for check in (probe, lambda path: decode_clip(path, 0.0, TINY_CLIP)):
        with pytest.raises(InputError, match=r"the video stream is 9000x8200: 74 megapixels a frame, over the "
                                             r"67-megapixel limit for videos") as e:
            check(crafted)
        assert e.value.path == str(crafted)


def test_a_frame_over_the_limit_met_while_decoding_is_refused(tmp_path, monkeypatch):
    """A stream may change its resolution mid-way: a frame of a new size is checked when it is met (here the
    limit is lowered between the declared 96x64 and a later frame's 192x128)."""
    from latentcache.encode.decoding import video_file

    video = tmp_path / "grows.avi"
    _mjpeg_avi(video, ((96, 64),) * 4 + ((192, 128),) * 20)
    monkeypatch.setattr(video_file, "MAX_VIDEO_PIXELS", 96 * 64)
    info = probe(video)
    assert (info.width, info.height) == (96, 64)
    with pytest.raises(InputError, match=r"a frame is 192x128: 0 megapixels a frame, over the 0-megapixel limit") as e:
        decode_clip(video, 0.0, TINY_CLIP)
    assert e.value.stage == "decode"


def test_the_exit_4_hint_is_computed_from_the_inputs_and_the_frame_rule(tmp_path, capsys):
    """A 2 s video at --frames 17 or 49 (8 fps): the hint names 13 frames (4k+1, spans 1.5 s) and --fps 9 or 25,
    never the value in use; and what it suggests does write a sample."""
    d = tmp_path / "in"
    d.mkdir()
    write_video(d / "short_2s", codec="h264", num_frames=16, fps=8, height=64, width=96)

    def encode(out: str, *extra: str) -> int:
        return main(["encode", str(d), "--out", str(tmp_path / out), "--vae", "tiny-random-cogvideox", "--height",
                     "64", "--width", "96", "--workers", "0", "--device", "cpu", *extra])

    for frames, fps in (("17", 9), ("49", 25)):
        assert encode(f"out{frames}", "--frames", frames) == EXIT_NO_SAMPLES
        err = capsys.readouterr().err
        assert (f"shorter than {frames} frames at 8 fps; ".replace("; ", f" ({(int(frames) - 1) / 8:.1f} s); ")
                + "the longest is 2.00 s and holds 13 frames at 8 fps (4k+1 for this VAE): try --frame-buckets 13 "
                f"(or --frames 13), --fps {fps}, --short pad.") in err, err
    assert encode("out13", "--frames", "13") == 0
    assert encode("fps9", "--frames", "17", "--fps", "9") == 0
    assert encode("buckets", "--frames", "49", "--frame-buckets", "13") == 0
