"""chunk_plan.py: inputs, clip strategies, aspect and frame buckets, the plan's shards; the CLI's clip flags."""

from __future__ import annotations

import dataclasses
import json
import tarfile

import pytest
from conftest import TINY_CLIP, tiny_settings

from latentcache.cli import main
from latentcache.encode.chunk_plan import (
    check_buckets,
    clip_settings_for,
    clip_starts,
    make_plan,
    nearest_size,
    plan_video,
)
from latentcache.encode.decoding.probing import VideoInfo, probe
from latentcache.encode.inputs import discover_inputs, iter_inputs
from latentcache.encode.job_plan import InputTable
from latentcache.encode.settings import parse_strategy
from latentcache.errors import ConfigError, InputError
from latentcache.format.buckets import Bucket
from latentcache.tools.synthetic import write_video

SPEC = {"temporal_compression": 4, "spatial_compression": 8, "frame_rule": "4k+1"}
VAE = {"spec": SPEC}


def starts(duration: float, strategy: str, frames: int = 17, fps: float = 8.0) -> list[float]:
    return clip_starts(duration, dataclasses.replace(TINY_CLIP, frames=frames, fps=fps, strategy=strategy))


# --- clip strategies -------------------------------------------------------------------------------------------

def test_first_takes_one_clip_at_zero():
    assert starts(10.0, "first") == [0.0]


def test_uniform_spreads_k_clips_that_all_fit():
    got = starts(10.0, "uniform:3")  # span 2 s, room 8 s
    assert got == [0.0, pytest.approx(3.996), pytest.approx(7.992)]
    assert starts(10.0, "uniform:1") == [4.0]  # one clip: the middle
    assert len(starts(10.0, "uniform:50")) == 50  # more clips than room: they overlap, still all inside


def test_sliding_steps_by_stride_seconds():
    assert starts(5.0, "sliding:1") == [0.0, 1.0, 2.0]  # room 3 s: a start at 3.0 would end at the last instant
    assert starts(5.0, "sliding:0.5") == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_all_is_back_to_back_without_overlap():
    got = starts(10.0, "all")
    span = 16 / 8
    assert got == [0.0, 2.125, 4.25, 6.375]
    for a, b in zip(got, got[1:], strict=False):
        assert b - a > span  # the next clip's first frame comes after the previous clip's last


@pytest.mark.parametrize("strategy", ["first", "uniform:4", "sliding:0.3", "all"])
@pytest.mark.parametrize("duration", [2.01, 3.0, 7.77])
def test_every_clip_ends_strictly_inside_the_video(strategy, duration):
    for s in starts(duration, strategy):
        assert s >= 0 and s + 2.0 < duration


@pytest.mark.parametrize("strategy", ["first", "uniform:3", "sliding:1", "all"])
def test_too_short_gives_no_clip(strategy):
    assert starts(2.0, strategy) == []  # exactly the span: the last target falls at the end, no frame there
    assert starts(1.0, strategy) == []


@pytest.mark.parametrize("bad", ["uniform:0", "uniform:x", "uniform:1.5", "sliding:", "sliding:-1", "sliding:0",
                                 "bogus", "first:2", "all:3", ""])
def test_invalid_strategy_names_the_valid_forms(bad):
    with pytest.raises(ConfigError, match="uniform:K, sliding:SECONDS, all"):
        parse_strategy(bad)


def test_strategies_are_deterministic():
    assert starts(33.3, "uniform:7") == starts(33.3, "uniform:7")


# --- inputs ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A folder as scraped: videos in subfolders, caption sidecars, a thumbnail, hidden files, a misnamed file."""
    root = tmp_path_factory.mktemp("tree")
    write_video(root / "a", codec="h264", num_frames=24)
    (root / "a.txt").write_text("  a caption from a sidecar \n", encoding="utf-8")
    (root / "deep" / "er").mkdir(parents=True)
    write_video(root / "deep" / "er" / "b", codec="vp9", num_frames=24)
    write_video(root / "deep" / "no_extension", codec="h264", num_frames=24).rename(root / "deep" / "clip")
    (root / "thumb.jpg").write_bytes(b"\xff\xd8\xff")
    (root / ".hidden.mp4").write_bytes(b"x")
    (root / ".cache").mkdir()
    write_video(root / ".cache" / "c", codec="h264", num_frames=24)
    (root / "notes.md").write_text("# not a video", encoding="utf-8")
    return root


def test_directory_is_walked_recursively_skipping_hidden_and_sidecars(tree):
    found = discover_inputs([tree])
    assert [v.relpath for v in found] == ["a.mp4", "deep/clip", "deep/er/b.webm"]
    assert found[0].caption == "a caption from a sidecar"
    # A file without a video extension is still an input: probing decides, not the name.
    assert probe(found[1].path).codec == "h264"


def test_text_list_with_comments_and_relative_paths(tree, tmp_path):
    lst = tree / "list.txt"
    lst.write_text(f"# my videos\na.mp4\n\ndeep/er/b.webm\n{tree / 'deep' / 'clip'}\n", encoding="utf-8")
    found = discover_inputs([lst])
    assert [v.relpath for v in found] == ["a.mp4", "deep/clip", "deep/er/b.webm"]
    assert found[0].caption == "a caption from a sidecar"
    lst.unlink()


def test_csv_list_with_bom_and_captions(tree):
    lst = tree / "list.csv"
    lst.write_text("\ufeffpath,caption\na.mp4,a given caption\ndeep/er/b.webm,\nmissing.mp4,gone\n", encoding="utf-8")
    found = {v.relpath: v for v in discover_inputs([lst])}
    lst.unlink()
    assert found["a.mp4"].caption == "a given caption"  # the list's caption wins over the sidecar
    assert found["deep/er/b.webm"].caption is None
    # A stale line is not a configuration error: it becomes a failure record when probed.
    with pytest.raises(InputError, match="file not found"):
        probe(found["missing.mp4"].path)


def test_jsonl_list(tree):
    lst = tree / "list.jsonl"
    lst.write_text('{"path": "a.mp4", "caption": "json caption"}\n\n{"path": "deep/er/b.webm"}\n', encoding="utf-8")
    found = discover_inputs([lst])
    lst.unlink()
    assert [(v.relpath, v.caption) for v in found] == [("a.mp4", "json caption"), ("deep/er/b.webm", None)]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("l.csv", "file,caption\na.mp4,x\n", "needs a 'path' column"),
    ("l.jsonl", '{"path": "a.mp4"}\nnot json\n', "line 2 is not JSON"),
    ("l.jsonl", '["a.mp4"]\n', "line 1 is a list"),
    ("l.jsonl", '{"caption": "no path"}\n', "row 1 has no 'path'"),
])
def test_bad_lists_say_what_is_wrong(tmp_path, name, text, message):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        discover_inputs([tmp_path / name])


def test_missing_input_and_colliding_relpaths_are_config_errors(tree, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        discover_inputs([tmp_path / "nope"])
    other = tmp_path / "other"
    other.mkdir()
    write_video(other / "a", codec="h264", num_frames=24)
    with pytest.raises(ConfigError, match="keys would collide"):
        discover_inputs([tree, other])


# --- buckets -----------------------------------------------------------------------------------------------------

BUCKETS = dataclasses.replace(TINY_CLIP, buckets=("64x96", "96x64", "64x64"), frame_buckets=(9, 5))


@pytest.mark.parametrize(("width", "height", "want"), [
    (1920, 1080, (64, 96)), (1080, 1920, (96, 64)), (500, 500, (64, 64)), (1100, 1000, (64, 64)),
    (4000, 1000, (64, 96)), (96, 127, (96, 64)),
])
def test_nearest_aspect_bucket(width, height, want):
    assert nearest_size(width, height, BUCKETS) == want


def test_no_buckets_means_the_fixed_size():
    assert nearest_size(1080, 1920, TINY_CLIP) == (64, 96)


def info(duration: float, width: int = 128, height: int = 96) -> VideoInfo:
    return VideoInfo("v.mp4", duration, 24.0, width, height, 0, "h264", 1)


def test_short_video_falls_back_to_the_largest_frame_bucket_that_fits():
    assert plan_video(info(3.0), BUCKETS) == ("17x64x96", [0.0])
    assert plan_video(info(1.5), BUCKETS) == ("9x64x96", [0.0])  # 17 frames need 2 s, 9 need 1 s
    assert plan_video(info(0.6, 96, 128), BUCKETS) == ("5x96x64", [0.0])
    with pytest.raises(InputError, match="too short: 0.40s, a clip of 5 frames") as err:
        plan_video(info(0.4), BUCKETS)
    assert err.value.skipped
    # pad: one clip of the smallest frame count, from the start; decode repeats the last frame.
    assert plan_video(info(0.4), dataclasses.replace(BUCKETS, short="pad")) == ("5x64x96", [0.0])
    assert plan_video(info(0.4), dataclasses.replace(TINY_CLIP, short="pad")) == ("17x64x96", [0.0])


def test_buckets_are_checked_against_the_vae():
    check_buckets(BUCKETS, SPEC)
    with pytest.raises(ConfigError, match=r"--frame-buckets 8 does not fit.*4k\+1.*nearest valid: 5 or 9"):
        check_buckets(dataclasses.replace(TINY_CLIP, frame_buckets=(8,)), SPEC)
    with pytest.raises(ConfigError, match="--buckets 100x96: the height 100 is not a multiple.*96 or 104"):
        check_buckets(dataclasses.replace(TINY_CLIP, buckets=("100x96",)), SPEC)
    with pytest.raises(ConfigError, match="expected HEIGHTxWIDTH"):
        check_buckets(dataclasses.replace(TINY_CLIP, buckets=("wide",)), SPEC)
    with pytest.raises(ConfigError, match="between 1 and --frames 17"):
        check_buckets(dataclasses.replace(TINY_CLIP, frame_buckets=(21,)), SPEC)


def test_plan_groups_shards_by_bucket_and_each_clip_carries_its_own(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_video(d / "land", codec="h264", num_frames=72)  # 3 s landscape
    write_video(d / "port", codec="vp9", num_frames=72, height=128, width=96)  # portrait
    write_video(d / "rot", codec="h264", num_frames=72, rotation=90)  # landscape pixels shown portrait
    write_video(d / "short", codec="h264", num_frames=30)  # 1.25 s: only 9 frames fit
    write_video(d / "tiny", codec="h264", num_frames=6)  # 0.25 s: nothing fits
    plan = make_plan(discover_inputs([d]), tiny_settings(clip=BUCKETS, samples_per_shard=8), VAE)
    by_source = {c.relpath: c.bucket for c in plan.clips}
    assert by_source == {"land.mp4": "17x64x96", "port.webm": "17x96x64", "rot.mp4": "17x96x64",
                         "short.mp4": "9x64x96"}
    assert sorted(s.bucket for s in plan.shards) == ["17x64x96", "17x96x64", "9x64x96"]
    for shard in plan.shards:
        assert {c.bucket for c in plan.clips if c.key in shard.keys} == {shard.bucket}
    assert [(r["path"].rsplit("/", 1)[-1], r["stage"], r["outcome"], r["reason"]) for r in plan.rejected] == [
        ("tiny.mp4", "plan", "skipped", "too short")]
    # Decoding a clip with its bucket's settings gives that bucket's frames and size.
    rot = next(c for c in plan.clips if c.relpath == "rot.mp4")
    assert clip_settings_for(rot.bucket, BUCKETS).frames == 17
    assert (clip_settings_for(rot.bucket, BUCKETS).height, clip_settings_for(rot.bucket, BUCKETS).width) == (96, 64)


def test_plan_is_a_pure_function_of_inputs_and_settings(video_dir):
    settings = tiny_settings(clip=dataclasses.replace(TINY_CLIP, strategy="uniform:2"))
    a = make_plan(discover_inputs([video_dir]), settings, VAE)
    b = make_plan(discover_inputs([video_dir]), settings, VAE, workers=1)
    assert a.to_json() == b.to_json()
    assert len(a.clips) == 8


# --- through the command line ------------------------------------------------------------------------------------

CLI = ["--vae", "tiny-random-cogvideox", "--fps", "8", "--height", "64", "--width", "96"]


def test_cli_frames_not_fitting_the_vae_is_a_usage_error(video_dir, tmp_path, capsys):
    code = main(["encode", str(video_dir), "--out", str(tmp_path / "out"), *CLI, "--frames", "20"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--frames 20" in err and "4k+1" in err and "nearest valid: 17 or 21" in err


def test_cli_bad_clip_strategy_and_bucket_are_usage_errors(video_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["encode", str(video_dir), "--out", out, *CLI, "--frames", "17", "--clips", "uniform:0"]) == 2
    assert "uniform:K" in capsys.readouterr().err
    assert main(["encode", str(video_dir), "--out", out, *CLI, "--frames", "17", "--frame-buckets", "9,7"]) == 2
    assert "--frame-buckets 7" in capsys.readouterr().err


def test_bucket_flags_are_parsed_without_an_encode(tmp_path):
    from latentcache.cli import build_parser, settings_from_args

    def clip(*flags: str):
        args = build_parser().parse_args(["encode", "v.mp4", "--out", str(tmp_path), *CLI, "--frames", "17", *flags])
        return settings_from_args(args).encode.clip

    parsed = clip("--buckets", " 64x96, 96X64 ,,", "--frame-buckets", "9,5,9")
    assert parsed.buckets == ("64x96", "96x64") and parsed.frame_buckets == (9, 5)
    assert clip().buckets == () and clip().frame_buckets == ()
    with pytest.raises(ConfigError, match="--frame-buckets '9,x'"):
        clip("--frame-buckets", "9,x")
    assert Bucket.parse("17x64x96") == Bucket(17, 64, 96) and str(Bucket(17, 64, 96)) == "17x64x96"
    assert clip_settings_for("9x96x64", parsed).bucket == "9x96x64"


@pytest.mark.slow
def test_cli_buckets_write_one_bucket_per_shard_at_that_size(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    write_video(d / "land", codec="h264", num_frames=72)
    write_video(d / "port", codec="h264", num_frames=72, height=128, width=96)
    write_video(d / "short", codec="vp9", num_frames=30)
    out = tmp_path / "out"
    code = main(["encode", str(d), "--out", str(out), *CLI, "--frames", "17", "--buckets", "64x96,96x64",
                 "--frame-buckets", "9"])
    assert code == 0, capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["buckets"] == {"17x64x96": 1, "17x96x64": 1, "9x64x96": 1}
    for shard in manifest["shards"]:
        frames, height, width = (int(x) for x in shard["bucket"].split("x"))
        with tarfile.open(out / shard["path"]) as tar:
            metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        assert [(m["bucket"], m["frames"], m["height"], m["width"]) for m in metas] == [
            (shard["bucket"], frames, height, width)]
        assert len(metas[0]["frame_times"]) == frames


def test_random_clips_are_seeded_per_video_and_reproducible():
    clip = dataclasses.replace(TINY_CLIP, strategy="random:3", seed=7)
    a = clip_starts(20.0, clip, "videos/a.mp4")
    assert len(a) == 3 and a == sorted(a) and all(0 <= s < 20.0 - 2.0 for s in a)
    assert clip_starts(20.0, clip, "videos/a.mp4") == a  # same seed and video: same starts, on any machine
    assert clip_starts(20.0, clip, "videos/b.mp4") != a  # each video its own draw
    assert clip_starts(20.0, dataclasses.replace(clip, seed=8), "videos/a.mp4") != a


def test_list_captions_keep_their_own_line_breaks(tmp_path):
    write_video(tmp_path / "a", codec="h264", num_frames=8)
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "a.mp4", "caption": "one\u2028two"}, ensure_ascii=False)
                                         + "\n", encoding="utf-8")
    (tmp_path / "list.csv").write_text('path,caption\na.mp4,"line one\nline two"\n', encoding="utf-8")
    assert [v.caption for v in discover_inputs([tmp_path / "list.jsonl"])] == ["one\u2028two"]
    assert [v.caption for v in discover_inputs([tmp_path / "list.csv"])] == ["line one\nline two"]


def test_list_keys_do_not_depend_on_symlinks(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    write_video(real / "a", codec="h264", num_frames=8)
    (real / "list.txt").write_text("a.mp4\n", encoding="utf-8")
    (tmp_path / "link").symlink_to(real)
    via_real = discover_inputs([real / "list.txt"])
    via_link = discover_inputs([tmp_path / "link" / "list.txt"])
    assert [v.relpath for v in via_real] == [v.relpath for v in via_link] == ["a.mp4"]


def test_empty_input_directory_is_a_usage_error(tmp_path) -> None:
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / "caption.txt").write_text("not a video")
    with pytest.raises(ConfigError, match="input directory .*empty.* holds no files to encode"):
        discover_inputs([tmp_path / "empty"])


def test_duplicate_list_row_with_another_caption_is_reported(tmp_path, caplog) -> None:
    lst = tmp_path / "list.csv"
    lst.write_text("path,caption\na.mp4,a cat\nb.mp4,a dog\na.mp4,a horse\n")
    found = discover_inputs([lst])
    assert [(v.relpath, v.caption) for v in found] == [("a.mp4", "a cat"), ("b.mp4", "a dog")]
    said = "a.mp4 is given twice with different captions ('a cat', then 'a horse'); keeping the first"
    assert said in caplog.text
    # The streamed table the encode job plans from says the same, and keeps the first row's caption.
    caplog.clear()
    table = InputTable(iter_inputs([lst]))
    assert len(table) == 2 and said in caplog.text
    rows = [json.loads(table.line(i)) for i in range(len(table))]
    assert sorted((r["relpath"], r["caption"]) for r in rows) == [("a.mp4", "a cat"), ("b.mp4", "a dog")]


def test_output_directories_are_not_inputs(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    write_video(tmp_path / "in" / "v", codec="h264", num_frames=8, height=32, width=32, fps=8)
    for name in ("marked", "given"):
        (tmp_path / "in" / name / "shards").mkdir(parents=True)
        (tmp_path / "in" / name / "shards" / "000000.tar").write_bytes(b"x")
    (tmp_path / "in" / "marked" / ".latentcache").write_text('{"format_version": 1}')
    found = discover_inputs([tmp_path / "in"], exclude=[tmp_path / "in" / "given"])
    assert [v.relpath for v in found] == ["v.mp4"]


def test_damaged_or_crafted_output_files_are_clear_errors(tmp_path, capsys):
    """plan.json, the inputs file, a chunk plan and the manifest are data: nested 100,000 deep, not UTF-8 or not
    an input, each is an error naming the file (exit 2), never a traceback."""
    import hashlib
    import shutil

    from latentcache.errors import ShardFormatError
    from latentcache.train.dataset import LatentShardDataset

    (tmp_path / "in").mkdir()
    write_video(tmp_path / "in" / "v", codec="h264", num_frames=24, height=64, width=96, fps=8)
    args = ["--vae", "tiny-random-cogvideox", "--device", "cpu", "--frames", "17", "--fps", "8", "--height", "64",
            "--width", "96"]
    base = tmp_path / "base"
    assert main(["encode", str(tmp_path / "in"), "--out", str(base), *args]) == 0
    deep = "[" * 100_000

    def damaged(name: str, change) -> tuple[int, str]:
        out = tmp_path / name
        shutil.copytree(base, out)
        change(out)
        capsys.readouterr()
        code = main(["encode", str(tmp_path / "in"), "--out", str(out), *args])  # a bug would raise here
        return code, capsys.readouterr().err

    def unplanned(out):  # the chunk must be planned again: its lines are read
        shutil.rmtree(out / "chunks")
        shutil.rmtree(out / "shards")

    code, err = damaged("plan_deep", lambda out: (out / "plan.json").write_text('{"format": 2, "x": ' + deep))
    assert code == 2 and "plan.json is not JSON (nested more than 64 levels deep)" in err, err
    code, err = damaged("plan_latin1", lambda out: (out / "plan.json").write_bytes(b'{"format": "\xe9"}'))
    assert code == 2 and "plan.json is not UTF-8 JSON" in err, err

    def chunk_deep(out):
        for p in out.rglob("*.tar*"):
            p.unlink()
        (next((out / "chunks").rglob("*.json"))).write_text(deep)

    code, err = damaged("chunk_deep", chunk_deep)
    assert code == 2 and "c000000.json: not a chunk plan of this directory" in err, err

    def inputs_crafted(line: bytes):
        def change(out):
            unplanned(out)
            (out / "inputs" / "part-0000.jsonl").write_bytes(line)
            plan = json.loads((out / "plan.json").read_text())
            sha = hashlib.sha256(line).hexdigest()
            plan["parts"][0]["sha256"], plan["parts"][0]["chunks"] = sha, [[0, len(line), sha]]
            (out / "plan.json").write_text(json.dumps(plan))
        return change

    for n, line in enumerate([b'{"caption": null, "path": "v.mp4", "relpath": ' + deep.encode() + b"\n",
                              b'{"caption": null, "relpath": "v.mp4"}\n', b'{"caption": null, "path": 3, '
                              b'"relpath": "v.mp4", "spans": [[1e999, "x"]]}\n', b"[1]\n"]):
        code, err = damaged(f"inputs_{n}", inputs_crafted(line))
        assert code == 2 and "part-0000.jsonl: line 1 of chunk 0 is not an input latentcache wrote" in err, err

    (base / "manifest.json").write_text(deep)
    with pytest.raises(ShardFormatError, match="not a JSON manifest"):
        LatentShardDataset(base)
    assert main(["verify", str(base)]) != 0  # a bug would raise here
