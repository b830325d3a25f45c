"""chunks.py: the top-level plan without probing, chunk plans probed by their rank, append, and plan files as data."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ENCODE_SMALL, REPO_ROOT, SMALL_VIDEOS, tiny_settings

import latentcache.encode.decoding.probing
from latentcache.cli import EXIT_SOME_FAILED, build_parser, settings_from_args
from latentcache.encode import chunks, finalize, job, job_plan, planning, rerun_inputs
from latentcache.encode.chunk_plan import InputVideo, clip_key
from latentcache.encode.chunks import read_chunk_plan
from latentcache.encode.inputs import discover_inputs, iter_inputs
from latentcache.encode.job_plan import InputTable, JobPlan, Part, chunks_for_rank, read_job_plan
from latentcache.errors import ConfigError, ShardFormatError
from latentcache.format.manifest import read_manifest
from latentcache.format.out_layout import INPUT_LISTS_RECORD, inputs_name


def _plan(counts: list[int], chunk_size: int) -> JobPlan:
    parts = []
    for i, n in enumerate(counts):
        k = -(-n // chunk_size)
        parts.append(Part(i, n, "0" * 64, chunk_size, [(c, 1, "0" * 64) for c in range(k)]))
    return JobPlan("f", {}, {}, parts)


def test_chunks_go_round_robin_over_all_parts() -> None:
    plan = _plan([2500, 1001], 1000)  # 3 + 2 chunks, the last of each part short
    refs = plan.chunk_refs()
    assert [(r.part, r.chunk, r.count) for r in refs] == [(0, 0, 1000), (0, 1, 1000), (0, 2, 500), (1, 0, 1000),
                                                          (1, 1, 1)]
    taken = [r.index for rank in range(3) for r in chunks_for_rank(plan, rank, 3)]
    assert sorted(taken) == list(range(5))
    assert [r.index for r in chunks_for_rank(plan, 1, 3)] == [1, 4]


def test_input_table_orders_by_key_and_finds_duplicates_without_a_dict() -> None:
    videos = [InputVideo(f"/d/{n}.mp4", f"{n}.mp4") for n in ("c", "a", "b")]
    table = InputTable(videos + [videos[1]])  # the same file twice is one input
    assert len(table) == 3
    order = [json.loads(table.line(i))["relpath"] for i in range(3)]
    assert order == sorted(order, key=lambda r: clip_key(r, 0))  # key order, whatever order the list had
    assert [json.loads(line)["relpath"] for line in map(InputTable(videos[::-1]).line, range(3))] == order
    with pytest.raises(ConfigError, match="share the relative path 'a.mp4'.*keys would collide"):
        InputTable([*videos, InputVideo("/elsewhere/a.mp4", "a.mp4")])


def test_parquet_and_jsonl_lists_are_streamed(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["x/a.mp4", "b.mp4"], "caption": ["a cat", None]}), tmp_path / "l.parquet")
    (tmp_path / "l.jsonl").write_text('{"path": "x/a.mp4", "caption": "a cat"}\r\n{"path": "b.mp4"}\n')
    for name in ("l.parquet", "l.jsonl"):
        rows = iter_inputs([tmp_path / name])
        assert not isinstance(rows, list)
        assert [(v.relpath, v.caption) for v in rows] == [("x/a.mp4", "a cat"), ("b.mp4", None)]
    pq.write_table(pa.table({"file": ["a.mp4"]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="bad.parquet: a Parquet list needs a 'path' column"):
        discover_inputs([tmp_path / "bad.parquet"])


def _args(videos: Path | list[Path], out: Path, *extra: str):
    paths = [str(v) for v in (videos if isinstance(videos, list) else [videos])]
    return build_parser().parse_args(["encode", *paths, "--out", str(out), "--device", "cpu", "--workers", "0",
                                      *ENCODE_SMALL, *extra])


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every video the code under test probes, through the real probe."""
    seen: list[str] = []
    real = latentcache.encode.decoding.probing.probe

    def counting(path: str, **kwargs):
        seen.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(latentcache.encode.decoding.probing, "probe", counting)
    return seen


def encode_job(args, *, rank: int = 0, world_size: int = 1) -> int:
    """The encode job of these arguments, as process `rank` of `world_size` (SLURM array tasks run one by one)."""
    return job.run(settings_from_args(args), job.World(rank=rank, world_size=world_size))


def _tar_digests(out: Path) -> list[str]:
    return sorted(hashlib.sha256((out / s["path"]).read_bytes()).hexdigest() for s in read_manifest(out)["shards"])


def test_four_ranks_one_after_another_each_probe_a_quarter(small_videos: Path, encoded_reference: Path,
                                                           tmp_path: Path, probes: list[str], capsys) -> None:
    """7 inputs in chunks of 2: rank r probes only chunk r's inputs; every input is encoded once; the samples are the
    same bytes as the 2-process run's (one sample a shard, so the tars match whatever their names; batch size 1, as
    the reference's chunks of 1 give, since a batch spans the shards of a chunk)."""
    out = tmp_path / "out"
    per_rank = []
    for rank in range(4):  # as SLURM array tasks: each plans (or reads) the top level, the last one finalizes
        before = len(probes)
        assert encode_job(_args(small_videos, out, "--chunk-size", "2", "--batch-size", "1"), rank=rank,
                          world_size=4) in (0, 3)
        per_rank.append(probes[before:])
    assert [len(p) for p in per_rank] == [2, 2, 2, 1]
    assert sorted(p for ps in per_rank for p in ps) == sorted(str(v.resolve()) for v in small_videos.iterdir())
    printed = capsys.readouterr().out
    assert "[rank 0] 2 clips in 2 shard(s) written" in printed and "manifest at" in printed
    manifest = read_manifest(out)
    assert manifest["counts"] == {"samples": SMALL_VIDEOS, "shards": SMALL_VIDEOS, "planned_clips": SMALL_VIDEOS,
                                  "skipped": 0, "failed": 1, "skipped_by_reason": {},
                                  "failed_by_reason": {"probe/InvalidDataError": 1}}
    assert _tar_digests(out) == _tar_digests(encoded_reference)
    assert (out / "failures.jsonl").read_bytes() == (encoded_reference / "failures.jsonl").read_bytes()
    # A rerun of one rank probes nothing: its chunk plan is on disk.
    before = len(probes)
    assert encode_job(_args(small_videos, out, "--chunk-size", "2", "--batch-size", "1"), rank=2,
                      world_size=4) == 0  # the broken input was reported by the run that finished the job
    assert len(probes) == before


def test_append_encodes_only_the_new_videos(small_videos: Path, tmp_path: Path, probes: list[str], capsys) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        shutil.copy(small_videos / f"v{i}.mp4", videos)
    out = tmp_path / "out"
    assert encode_job(_args(videos, out)) == 0
    old = {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("shards/*/*.tar")}
    assert len(old) == 3
    for i in (3, 4):
        shutil.copy(small_videos / f"v{i}.mp4", videos)
    capsys.readouterr()
    probes.clear()
    assert encode_job(_args(videos, out)) == 0
    assert sorted(Path(p).name for p in probes) == ["v3.mp4", "v4.mp4"]  # the old ones are not even probed
    assert "2 clips in 2 shard(s) written" in capsys.readouterr().out
    assert old == {p: (( out / p).read_bytes(), (out / p).stat().st_mtime_ns) for p in old}
    plan = read_job_plan(out)
    assert [p.count for p in plan.parts] == [3, 2]
    manifest = read_manifest(out)
    assert manifest["counts"]["samples"] == 5
    assert {s["path"].split("/")[-1][:5] for s in manifest["shards"]} == {"p0000", "p0001"}
    # Removing an input is refused, naming it.
    (videos / "v1.mp4").unlink()
    with pytest.raises(ConfigError, match=r"1 planned input\(s\) are missing, e\.g\. v1\.mp4"):
        encode_job(_args(videos, out))


def test_crafted_plans_cannot_name_paths_outside_out(small_videos: Path, tmp_path: Path, tiny_vae) -> None:
    out = tmp_path / "out"
    settings = tiny_settings(samples_per_shard=1)
    plan = planning.load_or_make_plan(out, discover_inputs([small_videos / "v0.mp4"]), settings, tiny_vae)
    (chunk,) = planning.plan_chunks(out, plan, settings)
    (ref,) = plan.chunk_refs()
    path = out / ref.plan_name
    good = json.loads(path.read_text())
    assert read_chunk_plan(out, plan, ref).shards[0].relpath == chunk.shards[0].relpath
    for field, value in (("bucket", "../../../tmp/x"), ("keys", ["../../evil_0000"])):
        bad = json.loads(json.dumps(good))
        bad["shards"][0][field] = value
        path.write_text(json.dumps(bad))
        with pytest.raises(ShardFormatError, match="c000000.json: not a chunk plan"):
            read_chunk_plan(out, plan, ref)
    bad = json.loads(json.dumps(good))
    bad["clips"][0]["key"] = "0123456789abcdef_0000"  # well formed, but not this clip's key
    path.write_text(json.dumps(bad))
    with pytest.raises(ShardFormatError, match="malformed"):
        read_chunk_plan(out, plan, ref)
    top = json.loads((out / "plan.json").read_text())
    top["parts"][0]["inputs"] = "../../etc/passwd"
    with pytest.raises(ConfigError, match="part 0 names '../../etc/passwd'"):
        JobPlan.from_json(json.dumps(top))
    # The inputs file changed after planning: the chunk's sha256 no longer matches.
    inputs = out / inputs_name(0)
    inputs.write_bytes(inputs.read_bytes().replace(b"v0.mp4", b"v9.mp4"))
    with pytest.raises(ConfigError, match="do not match plan.json's sha256"):
        chunks.read_chunk_inputs(out, ref)


def test_key_digests_are_the_keys_prefix() -> None:
    digest = job_plan.key_digest("some/video.mp4")
    assert f"{digest:016x}" == clip_key("some/video.mp4", 0).split("_")[0]
    assert np.uint64(digest) == digest


@pytest.mark.slow
def test_bench_plan_smoke(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "plan.py"), "--smoke", "--work",
                             str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "top-level plan" in result.stdout and "one task's share" in result.stdout
    assert "dataset open" in result.stdout


@pytest.mark.slow
def test_bench_plan_task_costs_smoke(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "plan.py"), "--task-costs", "--inputs", "200",
                             "--chunk-size", "20", "--tasks", "4", "--work", str(tmp_path)], capture_output=True,
                            text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "look for new inputs: before" in result.stdout and "end-of-run check: before" in result.stdout


def test_a_video_with_more_than_9999_clips_plans_and_reads_back(small_videos: Path, tmp_path: Path,
                                                                 tiny_vae) -> None:
    """Keys count clips as {index:04d}, which grows to 5-6 digits past 9,999 (a long video with --clips all): the
    chunk plan that holds them must read back, and the keys of the first 10,000 clips stay as they always were."""
    import dataclasses

    out = tmp_path / "out"
    settings = tiny_settings(samples_per_shard=4096)
    settings = dataclasses.replace(settings, clip=dataclasses.replace(settings.clip, strategy="all"))
    video = small_videos / "v0.mp4"
    real = latentcache.encode.decoding.probing.probe(video)
    long_info = dataclasses.replace(real, duration=10_500 * (settings.clip.frames + 1) / settings.clip.fps,
                                    frames=0)
    plan = planning.load_or_make_plan(out, discover_inputs([video]), settings, tiny_vae)
    (chunk,) = planning.plan_chunks(out, plan, settings, probe_fn=lambda path: long_info)
    assert len(chunk.clips) > 10_000
    (ref,) = plan.chunk_refs()
    again = read_chunk_plan(out, plan, ref)
    assert [c.key for c in again.clips] == [c.key for c in chunk.clips]
    assert again.clips[9_999].key.endswith("_9999") and again.clips[10_000].key.endswith("_10000")


# ------------------------------------------------------------------ per-task costs that do not grow with the dataset


@pytest.fixture
def list_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every input list the code under test reads, through the real reader."""
    import latentcache.encode.inputs.lists as lists_module

    seen: list[str] = []
    real = lists_module.from_list

    def counting(list_file: Path):
        seen.append(str(list_file))
        return real(list_file)

    monkeypatch.setattr(lists_module, "from_list", counting)
    return seen


@pytest.mark.slow
def test_an_unchanged_list_is_not_read_again_and_a_changed_one_is(small_videos: Path, tmp_path: Path,
                                                                  list_reads: list[str], capsys) -> None:
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{small_videos / f'v{i}.mp4'}\n" for i in range(3)))
    out = tmp_path / "out"
    assert encode_job(_args(listed, out)) == 0
    assert list_reads == [str(listed)]
    record = json.loads((out / INPUT_LISTS_RECORD).read_text())
    assert record["lists"][0]["path"] == str(listed.resolve()) and record["lists"][0]["size"] == listed.stat().st_size

    list_reads.clear()
    assert encode_job(_args(listed, out)) == 0  # the same list: plan.json is reused without reading it
    assert list_reads == []

    # A superset (a line appended) is read and appends as before.
    with listed.open("a") as f:
        f.write(f"{small_videos / 'v3.mp4'}\n")
    capsys.readouterr()
    assert encode_job(_args(listed, out)) == 0
    assert list_reads == [str(listed)]
    assert "1 clips in 1 shard(s) written" in capsys.readouterr().out
    assert len(read_job_plan(out).parts) == 2

    # Same size and the mtime set back, but other bytes: still seen (a small list's digest is of all of it), so
    # the input no longer listed is refused by name as before.
    before = listed.stat()
    listed.write_text(listed.read_text().replace("v0.mp4", "v5.mp4"))
    import os

    os.utime(listed, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert listed.stat().st_size == before.st_size
    with pytest.raises(ConfigError, match="not given now"):
        encode_job(_args(listed, out))
    # A folder has no cheap identity: it is listed on every run, and no record is kept for it.
    assert rerun_inputs.lists_unchanged(out, read_job_plan(out), None) is False


def test_sampled_digest_of_a_big_list_sees_its_first_and_last_bytes(tmp_path: Path) -> None:
    from latentcache.encode import input_stats

    big = tmp_path / "big.txt"
    body = bytearray(b"videos/clip.mp4\n" * 400_000)  # 6.4 MB: sampled, not read whole
    big.write_bytes(body)
    first = input_stats.list_identity([str(big)])
    for where in (0, len(body) - 2):
        body[where] ^= 1
        big.write_bytes(body)
        assert input_stats.list_identity([str(big)])[0]["sampled_sha256"] != first[0]["sampled_sha256"]
        body[where] ^= 1
    assert input_stats.list_identity([str(big), str(tmp_path)]) is None  # a folder among the inputs: none


def test_a_task_that_is_not_the_last_checks_its_own_share_only(small_videos: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """SLURM array tasks one after another: each but the last stops at the first share not done (one stat), never
    reading every chunk plan; the last checks everything and finalizes. A marker is a hint: a shard removed after
    its share was marked done is still found by the full check."""
    whole: list[int] = []
    real = finalize.pending_in_job

    def counting(out: Path, plan):
        whole.append(1)
        return real(out, plan)

    monkeypatch.setattr(finalize, "pending_in_job", counting)
    out = tmp_path / "out"
    for rank in range(3):
        capsys.readouterr()
        assert encode_job(_args(small_videos, out, "--chunk-size", "2"), rank=rank, world_size=4) == 0
        assert f"rank {rank + 1} of 4 has not finished" in capsys.readouterr().out
    assert whole == [] and not (out / "manifest.json").exists()
    # A sidecar of rank 1's removed after its share was marked done: the last task's full check still finds it.
    plan = read_job_plan(out)
    shard = read_chunk_plan(out, plan, chunks_for_rank(plan, 1, 4)[0]).shards[0]
    (out / (shard.relpath + ".json")).unlink()
    capsys.readouterr()
    assert encode_job(_args(small_videos, out, "--chunk-size", "2"), rank=3, world_size=4) == 0
    assert whole == [1] and "still being worked on by other tasks" in capsys.readouterr().out
    assert not (out / "manifest.json").exists()
    assert encode_job(_args(small_videos, out, "--chunk-size", "2"), rank=1, world_size=4) == EXIT_SOME_FAILED
    assert whole == [1, 1] and read_manifest(out)["counts"]["samples"] == SMALL_VIDEOS
    # Served: a finished directory holds one `complete` marker, whatever the number of processes.
    assert [p.name for p in (out / "chunks" / "done").rglob("*") if p.is_file()] == ["complete"]


@pytest.mark.slow
def test_24_videos_on_one_process_fill_shards_and_batches(tmp_path: Path, monkeypatch) -> None:
    """Most users' case, the issue's own: a small fine-tuning folder at the default flags is one chunk and one shard
    for its bucket, and every VAE call takes a full `auto` batch (8 here): not 24 one-clip shards of batch 1."""
    from latentcache.cli import main
    from latentcache.encode.models.vae import VideoVAE
    from latentcache.tools.synthetic import write_video

    videos = tmp_path / "in"
    videos.mkdir()
    for i in range(24):
        write_video(videos / f"v{i:02d}", codec="h264", num_frames=20, height=64, width=96, fps=8)
    batches: list[int] = []
    encode = VideoVAE.encode

    def counting(self, frames, *args, **kwargs):
        batches.append(len(frames))
        return encode(self, frames, *args, **kwargs)

    monkeypatch.setattr(VideoVAE, "encode", counting)
    out = tmp_path / "out"
    assert main(["encode", str(videos), "--out", str(out), "--vae", "tiny-random-cogvideox", "--frames", "17",
                 "--height", "64", "--width", "96", "--device", "cpu"]) == 0
    assert batches == [8, 8, 8]
    assert len(list(out.rglob("*.tar"))) == 1
    assert read_manifest(out)["counts"]["samples"] == 24


def _clear_markers_repeatedly(out: str, times: int) -> None:
    plan = read_job_plan(Path(out))
    for _ in range(times):
        finalize.clear_share_markers(Path(out), plan)


@pytest.mark.slow
def test_tasks_finalizing_at_once_never_remove_each_others_markers(small_videos: Path, tmp_path: Path) -> None:
    """Array tasks that finish together all finalize at once (a CI run failed so: one task's clean-up removed the
    temporary another was renaming into `complete`). Four processes clearing the markers over and over all
    succeed and leave `complete`; a finalize keeps a live writer's temporary, removes a dead one's, every rank
    marker, and an earlier plan's markers and folders."""
    import multiprocessing
    import os
    import socket

    out = tmp_path / "out"
    assert encode_job(_args(small_videos, out)) == EXIT_SOME_FAILED  # small_videos holds one broken file
    done = out / "chunks" / "done"
    (complete,) = [p for p in done.rglob("*") if p.is_file()]
    assert complete.name == "complete"

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_clear_markers_repeatedly, args=(str(out), 40)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert [p for p in done.rglob("*") if p.is_file()] == [complete]

    host = socket.gethostname()
    world = complete.parent / "w000002"
    world.mkdir()
    for name in ("r000000", "r000001", f"r000001.{host}.999999999.tmp"):  # a pid no process has: dead
        (world / name).write_text("")
    live = complete.parent / f"complete.{host}.{os.getppid()}.tmp"  # another process's write, under way
    live.write_text("")
    earlier = done / ("0" * 16)  # an earlier plan's (before an append)
    (earlier / "w000001").mkdir(parents=True)
    (earlier / "w000001" / "r000000").write_text("")
    (earlier / "complete").write_text("")
    finalize.finalize(out)
    assert sorted(p.relative_to(done) for p in done.rglob("*")) == sorted(
        p.relative_to(done) for p in (complete.parent, complete, live))
