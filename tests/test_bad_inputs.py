"""Broken inputs: each costs one failure record and a log line, never the run, and never a garbage clip."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
from conftest import TINY_CLIP, tiny_settings

from latentcache import pipeline
from latentcache.cli import EXIT_OK, EXIT_SOME_FAILED, main, report_finalize
from latentcache.decode import decode_clip, probe
from latentcache.errors import InputError
from latentcache.plan import discover_inputs
from latentcache.synthetic import square_origin, write_video

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
    assert "failed: 10" in printed
    assert "probe/NotAVideo: 3" in printed and "decode/CorruptVideo: 2" in printed


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
    assert "skipped: 1; failed: 0" in printed and "skipped by reason: too short: 1" in printed


@pytest.mark.slow
def test_files_deleted_or_replaced_between_plan_and_decode(tmp_path, tiny_vae, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a", "b", "c"):
        write_video(d / name, codec="h264", num_frames=72)
    out = tmp_path / "out"
    settings = tiny_settings(samples_per_shard=8)
    plan = pipeline.load_or_make_plan(out, discover_inputs([d]), settings, tiny_vae)
    chunk_plans = pipeline.plan_chunks(out, plan, settings)  # probed here
    assert sum(len(c.clips) for c in chunk_plans) == 3
    (d / "a.mp4").unlink()  # deleted during the run
    (d / "b.mp4").write_text("replaced by an error page", encoding="utf-8")  # rewritten during the run
    pipeline.run(out, plan, tiny_vae, settings, chunk_plans=chunk_plans)
    assert report_finalize(out) == EXIT_SOME_FAILED
    failures = read_failures(out)
    assert (failures["a.mp4"]["stage"], failures["a.mp4"]["error"]) == ("decode", "FileNotFoundError")
    assert (failures["b.mp4"]["stage"], failures["b.mp4"]["error"]) == ("decode", "InvalidDataError")
    assert json.loads((out / "manifest.json").read_text())["counts"]["samples"] == 1
    assert "failures by kind: decode/FileNotFoundError: 1, decode/InvalidDataError: 1" in capsys.readouterr().out


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
