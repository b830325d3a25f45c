"""Restartable at any moment: real 2-process runs killed with SIGKILL at chosen moments, then restarted, must end
byte-identical to an uninterrupted run. Also: a finished directory is not encoded again, other settings are refused,
and faults inside a run (out of memory, NaN latents, a bad video) become failure records, never bad shards."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ENCODE_SMALL, SMALL_VIDEOS, TINY_VAE, tiny_settings, tree_bytes

from latentcache.cli import main
from latentcache.encode.execute import run
from latentcache.encode.finalize import finalize
from latentcache.encode.inputs import discover_inputs
from latentcache.encode.models.memory import fallback_tilings
from latentcache.encode.models.vae import VideoVAE, load_vae
from latentcache.encode.planning import load_or_make_plan
from latentcache.encode.settings import RuntimeSettings
from latentcache.errors import ConfigError
from latentcache.format.manifest import Manifest, read_manifest
from latentcache.format.out_layout import sidecar_of
from latentcache.format.reader import decode_sample, iter_tar
from latentcache.format.shards import PAUSE_ENV, remove_stale_temporaries

RANK_LINE = re.compile(r"\[rank (\d+)\] (\d+) clips in (\d+) shard\(s\) written \((\d+) left unfinished by an "
                       r"earlier run\), (\d+) shard\(s\) already done")

def _tar_tmp(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.tar.*.tmp") if ".tar.json." not in p.name]


def _tars_without_sidecar(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.tar") if not sidecar_of(p).exists()]


def _sidecars(out: Path) -> list[Path]:
    return list(out.rglob("*.tar.json"))


def _between_shards(out: Path) -> bool:
    return not _tar_tmp(out) and not _tars_without_sidecar(out)


# moment -> (where the writers freeze: a LATENTCACHE_TEST_PAUSE_AT point, how many processes must be frozen there
# before the kill, what must hold once all are killed). Each is a different half-done state. A frozen writer waits
# until it is killed, so the moment cannot pass however loaded the machine is (issue 20.8). Each of the 2 ranks
# writes 3 one-clip shards (2 members each: json, latents).
MOMENTS: dict[str, tuple[str, int, Callable[[Path], bool]]] = {
    # Planned, nothing encoded yet (rank 0 made plan.json; rank 1 waits for it).
    "after_plan": ("planned", 1, lambda out: (out / "plan.json").exists() and not _sidecars(out)),
    # Inside a tar write (a rank's 3rd member: its 2nd tar), with another shard (its 1st) already done.
    "mid_tar": ("member#3", 1, lambda out: bool(_tar_tmp(out)) and len(_sidecars(out)) >= 1),
    # A tar renamed into place but its sidecar not yet written (a rank's 3rd shard), two shards done (its own).
    "before_sidecar": ("sidecar#3", 1, lambda out: bool(_tars_without_sidecar(out)) and len(_sidecars(out)) >= 2),
    # Between shards: both ranks just after their 2nd sidecar, four complete, nothing half-written.
    "between_shards": ("sidecar-written#2", 2,
                       lambda out: 3 <= len(_sidecars(out)) < SMALL_VIDEOS and _between_shards(out)),
}
# A resubmission may get fewer or more GPUs: the plan, not the world size, fixes what each shard holds.
RESTART_PROCESSES = {"between_shards": 3}


def _process_tree(root: int) -> list[int]:
    """root and every descendant. torchrun starts its workers in new sessions, so a process-group kill misses them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_hard(proc) -> None:
    """SIGKILL the launcher and all its workers at once, as a node dying would, and wait until they are gone."""
    tree = _process_tree(proc.pid)
    _signal(tree, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in tree):
        assert time.monotonic() < deadline, "killed processes did not go away"
        time.sleep(0.05)


def _restart_stats(log: str, processes: int) -> dict[str, int]:
    rows = [tuple(map(int, m)) for m in RANK_LINE.findall(log)]
    assert len(rows) == processes, log
    return {"written": sum(r[2] for r in rows), "redone": sum(r[3] for r in rows),
            "skipped": sum(r[4] for r in rows)}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_9_then_restart_equals_an_uninterrupted_run(moment: str, small_videos: Path, encoded_reference: Path,
                                                         launch_encode, tmp_path: Path) -> None:
    point, frozen, still = MOMENTS[moment]
    out = tmp_path / "out"
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = launch_encode(small_videos, out, tmp_path / "killed.log", env={PAUSE_ENV: f"{point}:{pause}"})
    deadline = time.monotonic() + 240
    try:
        while len(list(pause.glob("*.reached"))) < frozen:
            assert proc.poll() is None, f"finished before the {moment} moment:\n{(tmp_path / 'killed.log').read_text()}"
            assert time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.05)
    finally:  # also when the wait failed: a frozen writer never ends by itself
        _signal(_process_tree(proc.pid), signal.SIGSTOP)  # the others too, wherever they are; then kill -9 all
        kill_hard(proc)
    assert still(out), f"the kill missed the {moment} state"
    done_before = len(_sidecars(out))

    log = tmp_path / "restart.log"
    processes = RESTART_PROCESSES.get(moment, 2)
    assert launch_encode(small_videos, out, log, nproc=processes).wait(timeout=240) == 0, log.read_text()
    stats = _restart_stats(log.read_text(), processes)
    print(f"\n{moment}: {done_before} shard(s) done at the kill; restart ({processes} processes) wrote "
          f"{stats['written']} ({stats['redone']} left half-written), skipped {stats['skipped']}")
    assert stats["skipped"] == done_before
    assert stats["written"] + stats["skipped"] == SMALL_VIDEOS
    if moment in ("mid_tar", "before_sidecar"):
        assert stats["redone"] >= 1
    assert not list(out.rglob("*.tmp"))
    # Nothing lost, nothing twice, not a byte different (manifest included: it carries no timestamp).
    assert tree_bytes(out) == tree_bytes(encoded_reference)


def test_stale_temporaries_go_live_ones_stay(tmp_path: Path) -> None:
    """Finalize sweeps temporaries of dead writers (this host) or old ones (other hosts), never a live writer's."""
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {"dead": f"plan.json.{host}.{dead.pid}.tmp", "live": f"manifest.json.{host}.{os.getpid()}.tmp",
             "other_host_new": "shards/17x64x96/000001.tar.elsewhere.7.tmp",
             "other_host_old": "failures.jsonl.elsewhere.8.tmp"}
    for name in names.values():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("partial")
    old = time.time() - 2 * 3600
    os.utime(tmp_path / names["other_host_old"], (old, old))
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == sorted([names["dead"],
                                                                                  names["other_host_old"]])
    assert (tmp_path / names["live"]).exists() and (tmp_path / names["other_host_new"]).exists()


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# A user's files in latentcache's output, named like temporaries, in and out of the folders latentcache writes.
USERS_TMP_FILES = ("my_notes/draft.tmp", "shards/17x64x96/notes.tmp", "draft.tmp", "inputs/part-0000.jsonl.old.tmp",
                   "shards/17x64x96/p0000-c000000-000000.tar.notes.tmp", "shards/mine/000000.tar.host.1.tmp",
                   "chunks/p0000/c000000.json.tmp", "plan.json.backup.tmp")


def test_rerun_and_finalize_keep_a_users_tmp_files_and_sweep_latentcache_s(small_videos: Path,
                                                                           tmp_path: Path) -> None:
    """Issue 20.2: only temporaries latentcache names (`<its file>.<host>.<pid>.tmp`, in the folder it writes that
    file in) are swept; a user's 2-hour-old `*.tmp` files anywhere in OUT survive a rerun and a finalize."""
    videos = tmp_path / "in"
    videos.mkdir()
    shutil.copy(small_videos / "v0.mp4", videos)
    out = tmp_path / "out"
    assert main(_cli_args(videos, out)) == 0
    written = tree_bytes(out)
    # A killed writer's leftover for every file latentcache wrote: on another host (2 h old) and on this host (a
    # dead pid, new): each is one of latentcache's temporaries.
    dead = subprocess.Popen(["true"])
    dead.wait()
    ours = []
    for name in written:
        ours += [out / f"{name}.elsewhere.example.4242.tmp", out / f"{name}.{socket.gethostname()}.{dead.pid}.tmp"]
        ours[-2].write_bytes(b"partial")
        _age(ours[-2], 2 * 3600)
        ours[-1].write_bytes(b"partial")
    for name in USERS_TMP_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"mine: {name}")
        _age(out / name, 2 * 3600)
    assert main(_cli_args(videos, out)) == 0
    assert main(["finalize", str(out)]) == 0
    assert [p for p in ours if p.exists()] == []
    assert {n: (out / n).read_text() for n in USERS_TMP_FILES} == {n: f"mine: {n}" for n in USERS_TMP_FILES}
    assert {k: v for k, v in tree_bytes(out).items() if k not in USERS_TMP_FILES} == written


def _cli_args(videos: Path, out: Path, **changes: str) -> list[str]:
    args = list(ENCODE_SMALL)
    for flag, value in changes.items():
        flag = "--" + flag.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return ["encode", str(videos), "--out", str(out), "--device", "cpu", *args]


def test_finished_directory_is_not_encoded_again(small_videos: Path, encoded_reference: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(encoded_reference, out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}

    def no_encoding(*args, **kwargs):
        raise AssertionError("a finished directory was encoded again")

    monkeypatch.setattr(VideoVAE, "encode", no_encoding)
    # 0: the broken input is still a failure, but the run that recorded it reported it; this one added nothing.
    assert main(_cli_args(small_videos, out)) == 0
    printed = capsys.readouterr().out
    assert "were reported by an earlier run; this run added none" in printed
    assert f"all {SMALL_VIDEOS} shard(s) are already done; nothing to encode" in printed
    assert "0 clips in 0 shard(s) written" in printed
    assert tree_bytes(out) == tree_bytes(encoded_reference)
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}


@pytest.mark.slow
def test_other_settings_are_refused_and_overwrite_starts_again(small_videos: Path, encoded_reference: Path,
                                                               tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(encoded_reference, out)
    assert main(_cli_args(small_videos, out, frames="9")) == 2
    err = capsys.readouterr().err
    assert "was made with other settings" in err and "clip.frames: 17 then, 9 now" in err
    assert "--overwrite" in err
    assert main(_cli_args(small_videos, out, dtype="bf16")) == 2
    assert "settings.vae.dtype: 'auto' then, 'bf16' now" in capsys.readouterr().err
    assert tree_bytes(out) == tree_bytes(encoded_reference)  # a refused run touches nothing

    assert main([*_cli_args(small_videos, out, frames="9"), "--overwrite"]) == 3
    manifest = read_manifest(out)
    assert manifest["settings"]["clip"]["frames"] == 9
    assert manifest["counts"]["samples"] == SMALL_VIDEOS
    assert not (out / "shards" / "17x64x96").exists()  # the old latents are gone, not mixed in


def test_new_inputs_are_a_new_part_and_a_missing_one_is_refused(small_videos: Path, tmp_path: Path,
                                                                 tiny_vae: VideoVAE) -> None:
    settings = tiny_settings(samples_per_shard=1)
    two = discover_inputs([small_videos / "v0.mp4", small_videos / "v1.mp4"])
    plan = load_or_make_plan(tmp_path, two, settings, tiny_vae)
    assert [p.count for p in plan.parts] == [2]
    assert load_or_make_plan(tmp_path, two, settings, tiny_vae).to_json() == plan.to_json()  # nothing new
    three = discover_inputs([small_videos / "v0.mp4", small_videos / "v1.mp4", small_videos / "v2.mp4"])
    grown = load_or_make_plan(tmp_path, three, settings, tiny_vae)
    assert [p.count for p in grown.parts] == [2, 1] and grown.parts[0] == plan.parts[0]
    with pytest.raises(ConfigError, match=r"1 planned input\(s\) are missing, e\.g\. v1\.mp4"):
        load_or_make_plan(tmp_path, [three[0], three[2]], settings, tiny_vae)


# ---------------------------------------------------------------------------------------------- faults in a run


def _encode_dir(out: Path, videos: list[Path], vae: VideoVAE, batch_size: int = 1, **overrides) -> Manifest:
    settings = tiny_settings(**overrides)
    # One chunk: these tests are about batches and shards of several clips.
    plan = load_or_make_plan(out, discover_inputs(videos), settings, vae, chunk_size=1000)
    run(out, plan, vae, settings, runtime=RuntimeSettings(batch_size=batch_size))
    return finalize(out)


def _samples(out: Path) -> dict[str, dict]:
    samples = {}
    for tar in sorted(out.rglob("*.tar")):
        for raw in iter_tar(tar):
            sample = decode_sample(raw, str(tar))
            samples[sample["key"]] = sample
    return samples


def _failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


def test_fallback_tilings_are_valid_and_shrink() -> None:
    tilings = fallback_tilings(64, 96, 8)
    assert [(t.tile_height, t.tile_width) for t in tilings] == [(32, 48), (16, 24), (16, 16)]
    assert [(t.tile_height, t.tile_width) for t in fallback_tilings(480, 720, 8)][:2] == [(240, 360), (120, 176)]
    assert fallback_tilings(16, 16, 8) == []


@pytest.mark.slow
def test_out_of_memory_is_retried_with_smaller_tiles(small_videos: Path, tmp_path: Path) -> None:
    """The untiled encode and the first tiling 'run out of memory'; the second, real tiled encode is written."""
    vae = load_vae(TINY_VAE, "cpu")
    real_encode, tried = vae.model.encode, []

    def encode_within_memory(x, *args, **kwargs):
        m = vae.model
        tile = (m.tile_sample_min_height, m.tile_sample_min_width) if m.use_tiling else None
        tried.append(tile)
        if tile is None or tile[1] > 24:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real_encode(x, *args, **kwargs)

    vae.model.encode = encode_within_memory
    manifest = _encode_dir(tmp_path, [small_videos / "v0.mp4"], vae)
    assert tried == [None, (32, 48), (16, 24)]
    assert manifest.counts["samples"] == 1 and _failures(tmp_path) == []
    (sample,) = _samples(tmp_path).values()
    assert sample["meta"]["tiling_fallback"] == {"tile_height": 16, "tile_width": 24, "overlap": 0.0,
                                                 "reason": "out of memory"}
    assert sample["mean"].shape == (16, 5, 8, 12) and torch.isfinite(sample["mean"]).all()
    # The configured (untiled) encode is back for the next clip.
    assert vae.tiling is None and not vae.model.use_tiling


@pytest.mark.slow
def test_a_clip_that_never_fits_is_a_failure_and_the_rank_goes_on(small_videos: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    vae = load_vae(TINY_VAE, "cpu")
    real_encode, calls = vae.encode, []

    def encode(frames, *, sources=None):
        calls.append(list(sources))
        if any(s.endswith("v0.mp4") for s in sources):
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real_encode(frames, sources=sources)

    monkeypatch.setattr(vae, "encode", encode)
    videos = [small_videos / f"v{i}.mp4" for i in range(3)]
    manifest = _encode_dir(tmp_path, videos, vae, batch_size=2, samples_per_shard=3)
    (failure,) = _failures(tmp_path)
    assert failure["path"].endswith("v0.mp4") and failure["stage"] == "encode"
    assert failure["error"] == "OutOfMemoryError"
    # The batch [v0, v1] failed, then v0 alone untiled and at each of its 3 tile sizes; v1 and v2 were written.
    assert sum(any(s.endswith("v0.mp4") for s in c) for c in calls) == 1 + 1 + 3
    assert manifest.counts == {"samples": 2, "shards": 1, "planned_clips": 3, "skipped": 0, "failed": 1,
                                  "skipped_by_reason": {}, "failed_by_reason": {"encode/OutOfMemoryError": 1}}
    assert len(_samples(tmp_path)) == 2


def _nan_encoder(vae: VideoVAE, only: torch.dtype | None = None):
    def hook(module, inputs, output):
        hidden, cache = output
        if only is None or hidden.dtype == only:
            return torch.full_like(hidden, math.nan), cache
        return None

    return vae.model.encoder.register_forward_hook(hook)


@pytest.mark.slow
def test_nan_in_half_precision_is_re_encoded_in_fp32(small_videos: Path, tmp_path: Path) -> None:
    vae = load_vae(dataclasses.replace(TINY_VAE, dtype="bf16"), "cpu")
    _nan_encoder(vae, only=torch.bfloat16)
    manifest = _encode_dir(tmp_path, [small_videos / "v0.mp4"], vae)
    assert manifest.counts["samples"] == 1
    (sample,) = _samples(tmp_path).values()
    assert sample["mean"].dtype == torch.bfloat16 and torch.isfinite(sample["mean"].float()).all()
    assert vae.model.dtype == torch.bfloat16  # back in its own dtype after the fp32 retry


def test_nan_latents_are_never_written(small_videos: Path, tmp_path: Path) -> None:
    vae = load_vae(TINY_VAE, "cpu")
    _nan_encoder(vae)
    manifest = _encode_dir(tmp_path, [small_videos / "v0.mp4", small_videos / "v1.mp4"], vae, samples_per_shard=2)
    assert {k: manifest.counts[k] for k in ("samples", "shards", "planned_clips", "skipped", "failed")} == {
        "samples": 0, "shards": 1, "planned_clips": 2, "skipped": 0, "failed": 2}
    assert _samples(tmp_path) == {}
    assert {f["stage"] for f in _failures(tmp_path)} == {"encode"}
    assert all("NaN/Inf" in f["message"] for f in _failures(tmp_path))


# ---------------------------------------------------------------- the output directory is latentcache's (issue 12)


def test_out_holding_a_users_files_is_refused(small_videos: Path, tmp_path: Path, capsys) -> None:
    """A non-empty --out latentcache did not make: nothing in it is replaced, nothing is probed."""
    out = tmp_path / "mine"
    (out / "shards").mkdir(parents=True)
    mine = {"manifest.json": '{"my": "manifest"}', "failures.jsonl": "my notes\n", "shards/keep.txt": "mine"}
    for name, text in mine.items():
        (out / name).write_text(text)
    assert main(_cli_args(small_videos, out)) == 2
    assert "is not empty and was not made by latentcache" in capsys.readouterr().err
    assert {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*") if p.is_file()} == mine


def test_overwrite_removes_only_what_latentcache_wrote(small_videos: Path, tmp_path: Path, capsys, caplog) -> None:
    out = tmp_path / "out"
    videos = tmp_path / "in"
    videos.mkdir()
    shutil.copy(small_videos / "v0.mp4", videos)
    assert main(_cli_args(videos, out)) == 0
    assert json.loads((out / ".latentcache").read_text()) == {"format_version": 1}
    # A user's files dropped into latentcache's directory, even next to the shards.
    (out / "notes.txt").write_text("mine")
    (out / "shards" / "17x64x96" / "keep.txt").write_text("mine")
    (out / "shards" / "readme").write_text("mine")
    for name in USERS_TMP_FILES:  # named like temporaries, next to the very files --overwrite removes
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    assert main([*_cli_args(videos, out, frames="9"), "--overwrite"]) == 0
    # It says what it removed: 8 files (1 tar + sidecar, plan, chunk plan, 2 inputs files, manifest, failures).
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--overwrite: removed")]
    assert said == [f"--overwrite: removed 8 file(s) that latentcache wrote in {out} (1 shard tar(s) with their "
                    "sidecars, the plan, chunk plans, inputs files, manifest, failures), e.g. "
                    "shards/17x64x96/p0000-c000000-000000.tar, shards/17x64x96/p0000-c000000-000000.tar.json, "
                    "chunks/p0000/c000000.json; nothing else was touched"]
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # The new run's own "all shares done" marker; the old run's went with its plan.
    [marker] = [name for name in left if name.startswith("chunks/done/")]
    assert marker.endswith("/complete")
    left.remove(marker)
    assert left == sorted([".latentcache", "chunks/p0000/c000000.json", "failures.jsonl", "inputs/part-0000.jsonl",
                           "inputs/part-0000.keys.npy", "manifest.json", "notes.txt", "plan.json",
                           "shards/17x64x96/keep.txt", "shards/9x64x96/p0000-c000000-000000.tar",
                           "shards/9x64x96/p0000-c000000-000000.tar.json", "shards/readme", *USERS_TMP_FILES])


@pytest.mark.slow
def test_overwrite_removes_the_input_lists_record_and_counts_what_it_removed(small_videos: Path, tmp_path: Path,
                                                                            caplog) -> None:
    """OUT/inputs/lists.json is latentcache's own file (what the input lists were): --overwrite removes it with the
    rest, so a run started again from nothing compares no input with the old run's lists; a user's files named like
    it elsewhere stay. The message's counts are the files it removed and the shard tars among them."""
    out = tmp_path / "out"
    listed = tmp_path / "videos.txt"
    listed.write_text(f"{small_videos / 'v0.mp4'}\n{small_videos / 'v1.mp4'}\n")
    assert main(_cli_args(listed, out)) == 0
    assert (out / "inputs" / "lists.json").is_file()
    before = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    users = ["lists.json", "shards/lists.json", "chunks/lists.json"]
    for name in users:
        (out / name).write_text("mine")
    videos = tmp_path / "in"
    videos.mkdir()
    shutil.copy(small_videos / "v0.mp4", videos)
    assert main([*_cli_args(videos, out, frames="9"), "--overwrite"]) == 0
    [said] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--overwrite: removed")]
    # 2 tars + 2 sidecars, 2 chunk plans, the plan, 2 inputs files, the lists' record, manifest, failures.
    ours = sorted(name for name in before if name != ".latentcache" and not name.startswith("chunks/done/"))
    assert len(ours) == 12 and sum(name.endswith(".tar") for name in ours) == 2
    assert said.startswith(f"--overwrite: removed 12 file(s) that latentcache wrote in {out} (2 shard tar(s) with "
                           "their sidecars, ")
    assert not (out / "inputs" / "lists.json").exists()  # this run's inputs are a folder: it writes no record
    assert all((out / name).read_text() == "mine" for name in users)


def test_an_output_made_before_the_marker_still_resumes(small_videos: Path, encoded_reference: Path, tmp_path: Path,
                                                        capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(encoded_reference, out)
    (out / ".latentcache").unlink()
    # 0: the broken input is a failure the run that finished the output reported; this rerun adds none.
    assert main(_cli_args(small_videos, out)) == 0
    assert "shard(s) are already done" in capsys.readouterr().out
    assert tree_bytes(out) == tree_bytes(encoded_reference)  # the marker is back, byte-identical


def test_out_inside_the_input_directory_reruns(small_videos: Path, tmp_path: Path, capsys) -> None:
    """Its own shards are not discovered as new inputs on the rerun (issue 12.7)."""
    videos = tmp_path / "in"
    videos.mkdir()
    shutil.copy(small_videos / "v0.mp4", videos)
    out = videos / "latents"
    assert main(_cli_args(videos, out)) == 0
    first = tree_bytes(out)
    capsys.readouterr()
    assert main(_cli_args(videos, out)) == 0
    assert "all 1 shard(s) are already done" in capsys.readouterr().out
    assert tree_bytes(out) == first


def test_out_that_is_a_file_is_refused_before_probing(small_videos: Path, tmp_path: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import latentcache.encode.chunk_plan
    import latentcache.encode.decoding.probing

    def no_probing(*args, **kwargs):
        raise AssertionError("an input was probed before --out was checked")

    # Told by a probe that must not run, not by a time bound that a loaded machine could exceed (issue 20.8).
    monkeypatch.setattr(latentcache.encode.decoding.probing, "probe", no_probing)
    monkeypatch.setattr(latentcache.encode.chunk_plan, "probe", no_probing)
    out = tmp_path / "out.txt"
    out.write_text("a file")
    assert main(_cli_args(small_videos, out)) == 2
    assert f"--out {out} is a file" in capsys.readouterr().err
    assert main(_cli_args(small_videos, out / "sub")) == 2  # under a file: cannot even be made
    assert f"cannot write {out / 'sub'}" in capsys.readouterr().err
    assert out.read_text() == "a file"


@pytest.mark.slow
def test_full_disk_names_the_file_and_the_rerun_resumes(small_videos: Path, tmp_path: Path, capsys) -> None:
    """A real full filesystem (a 64 KiB tmpfs): the plan fits, the first shard does not."""
    videos = tmp_path / "in"
    videos.mkdir()
    shutil.copy(small_videos / "v0.mp4", videos)
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "out"
        assert main(_cli_args(videos, out)) == 2
        err = capsys.readouterr().err
        assert f"cannot write {out / 'shards/17x64x96/p0000-c000000-000000.tar'}: No space left on device" in err
        assert not list(out.rglob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        assert main(_cli_args(videos, out)) == 0
        reference = tmp_path / "reference"
        assert main(_cli_args(videos, reference)) == 0
        assert tree_bytes(out) == tree_bytes(reference)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
