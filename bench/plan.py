"""Planning at scale: the top-level plan and one task's share of chunk plans for 1M and 10M inputs.

    python bench/plan.py --smoke                          # seconds: 2,000 inputs (what tests/test_chunks.py runs)
    python bench/plan.py --inputs 1000000 10000000 --tasks 1000 --work /scratch/bench
    python bench/plan.py --rerun-check --inputs 100000 --work /scratch/bench   # what checking inputs costs a rerun
    python bench/plan.py --task-costs --inputs 1000000 10000000 --tasks 1000    # per-task costs, before and after

Everything is the real code writing real files (a JSONL list with captions, plan.json, the inputs parts, the chunk
plans), except the probe: an injected one returns a synthetic VideoInfo (a size and duration drawn from the path's
hash, spread over 18 aspect buckets) instead of opening a video. Each step runs in its own process, which reports its
wall time and peak resident memory (ru_maxrss; the ~0.5 GB of importing torch is in every figure).

Rows: the top-level plan (`planning.load_or_make_plan` from the list: no video opened); one task's share
(`planning.plan_chunks` for task 0 of --tasks: probe + bucket layout + atomic chunk-plan writes); opening a
LatentShardDataset on a synthetic manifest of as many samples; streaming the same samples from full shards and
from the tiny shards rare buckets leave in each chunk.

--task-costs: side by side in one run, a rerun task's look for new inputs with the list re-read (before) and with
its identity checked (after), and task 0's end-of-run check reading every chunk plan (before) or only its share and
the first done marker missing (after).

--rerun-check: the listed files are written for real (small ones), one process plans every chunk (recording each
input's size, mtime and sha256), then a rerun's planning is timed twice in a fresh process: reading the chunk plans
only (what a rerun did before inputs were checked) and `chunks.plan_share`, which also stats every input and compares
(nothing changed, so no byte is read). The difference over the inputs is the check's cost per input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# 18 aspect buckets (height x width, multiples of 16), as a multi-aspect dataset uses.
BUCKETS = ("480x720,720x480,480x480,432x768,768x432,384x896,896x384,512x640,640x512,448x832,832x448,416x960,"
           "960x416,544x576,576x544,352x1024,1024x352,464x704")
SETTINGS = ["--vae", "tiny-random-cogvideox", "--frames", "17", "--fps", "8", "--buckets", BUCKETS]


def fake_probe(path: str):
    """A deterministic stand-in for probing.probe: size and duration from the path's hash."""
    from latentcache.encode.decoding.probing import VideoInfo

    h = hashlib.blake2b(path.encode(), digest_size=8).digest()
    # Widths and heights spread over every aspect from 9:28 to 28:9, so every bucket gets some videos and the
    # squarer ones most, as in scraped data.
    width, height = 360 + h[0] * 4, 360 + h[1] * 4
    if h[2] % 3 == 0:
        width, height = width * 2, height
    elif h[2] % 3 == 1:
        width, height = width, height * 2
    return VideoInfo(path, 3.0 + h[3] / 16, 24.0, width, height, 0, "h264", 1)


def write_list(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"path": f"videos/{i % 997:03d}/clip_{i:08d}.mp4",
                                "caption": f"a synthetic caption for clip number {i}"}) + "\n")


def args_for(work: Path, n: int, chunk_size: int):
    from latentcache.cli import build_parser

    return build_parser().parse_args(["encode", str(work / f"list_{n}.jsonl"), "--out", str(work / f"out_{n}"),
                                      "--chunk-size", str(chunk_size), *SETTINGS])


def step_top(work: Path, n: int, chunk_size: int) -> dict:
    from latentcache.cli import settings_from_args
    from latentcache.encode import planning
    from latentcache.encode.inputs import iter_inputs
    from latentcache.encode.models.vae import load_vae

    args = args_for(work, n, chunk_size)
    settings = settings_from_args(args).encode
    vae = load_vae(settings.vae, "cpu")
    started = time.perf_counter()
    plan = planning.load_or_make_plan(args.out, iter_inputs(args.inputs), settings, vae, chunk_size=chunk_size)
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    return {"seconds": seconds, "inputs": plan.inputs, "chunks": len(plan.chunk_refs()), "bytes": size}


def step_share(work: Path, n: int, chunk_size: int, tasks: int) -> dict:
    from latentcache.cli import settings_from_args
    from latentcache.encode import chunks, job_plan

    args = args_for(work, n, chunk_size)
    settings = settings_from_args(args).encode
    started = time.perf_counter()
    plan = job_plan.read_job_plan(args.out)
    read_seconds = time.perf_counter() - started
    mine = job_plan.chunks_for_rank(plan, 0, tasks)
    plans = [chunks.load_or_make_chunk_plan(args.out, plan, ref, settings, probe_fn=fake_probe) for ref in mine]
    seconds = time.perf_counter() - started
    shards = [s for p in plans for s in p.shards]
    small = sum(len(s.keys) < settings.samples_per_shard // 4 for s in shards)
    return {"seconds": seconds, "read_plan_seconds": read_seconds, "chunks": len(mine),
            "inputs": sum(r.count for r in mine), "clips": sum(len(p.clips) for p in plans), "shards": len(shards),
            "small_shards": small}


def step_open(work: Path, n: int) -> dict:
    """A synthetic manifest of n samples in shards of 64 (files not written: opening reads the manifest only)."""
    from latentcache import LatentShardDataset
    from latentcache.format.manifest import Manifest, ShardEntry, write_manifest
    from latentcache.format.out_layout import shard_name

    root = work / f"manifest_{n}"
    root.mkdir(exist_ok=True)
    shards = tuple(ShardEntry(shard_name("17x480x720", i % 16, 0, i // 16), "17x480x720", min(64, n - i * 64), 1 << 20,
                              "0" * 64) for i in range(-(-n // 64)))
    write_manifest(root, Manifest(latent_spec={"family": "cogvideox", "channels": 16, "temporal_compression": 4,
                                               "spatial_compression": 8, "scaling_factor": 1.15258426},
                                  vae={"class_name": "AutoencoderKLCogVideoX"}, dtype="float16",
                                  counts={"samples": n, "shards": len(shards)}, shards=shards))
    started = time.perf_counter()
    dataset = LatentShardDataset(root)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "shards": len(dataset.shards)}


def step_stream(work: Path, samples: int) -> dict:
    """samples/s from full shards (64) and from tiny ones (2 samples, what a rare bucket leaves in a chunk)."""
    from latentcache import LatentShardDataset
    from latentcache.tools.synthetic import write_latent_dataset

    result = {}
    for per_shard in (64, 2):
        root = work / f"stream_{per_shard}"
        write_latent_dataset(root, samples, per_shard)
        for _ in range(2):  # the first pass warms the page cache
            started = time.perf_counter()
            count = sum(1 for _ in LatentShardDataset(root))
            rate = count / (time.perf_counter() - started)
        result[per_shard] = rate
    return {"full": result[64], "tiny": result[2]}


def write_files(work: Path, n: int) -> None:
    """The files the list names, a few bytes each: the check stats them; their size does not matter to it."""
    for i in range(n):
        path = work / f"videos/{i % 997:03d}/clip_{i:08d}.mp4"
        if i < 997:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"%d" % i)


def step_plan_all(work: Path, n: int, chunk_size: int) -> dict:
    from latentcache.cli import settings_from_args
    from latentcache.encode import chunks, job_plan

    args = args_for(work, n, chunk_size)
    settings = settings_from_args(args).encode
    plan = job_plan.read_job_plan(args.out)
    started = time.perf_counter()
    refs = plan.chunk_refs()
    chunks.plan_share(args.out, plan, refs, settings, probe_fn=fake_probe)
    return {"seconds": time.perf_counter() - started, "chunks": len(refs)}


def step_recheck(work: Path, n: int, chunk_size: int) -> dict:
    """A rerun's planning of all chunks by one process: chunk plans read only, then read and every input checked."""
    from latentcache.cli import settings_from_args
    from latentcache.encode import chunks, job_plan

    args = args_for(work, n, chunk_size)
    settings = settings_from_args(args).encode
    plan = job_plan.read_job_plan(args.out)
    refs = plan.chunk_refs()
    started = time.perf_counter()
    for ref in refs:
        chunks.read_chunk_plan(args.out, plan, ref)
    read_only = time.perf_counter() - started
    started = time.perf_counter()
    chunks.plan_share(args.out, plan, refs, settings, probe_fn=fake_probe)
    checked = time.perf_counter() - started
    return {"read_only": read_only, "checked": checked, "inputs": plan.inputs}


def rerun_check(work: Path, sizes: list[int], chunk_size: int) -> None:
    for n in sizes:
        write_list(work / f"list_{n}.jsonl", n)
        started = time.perf_counter()
        write_files(work, n)
        made = time.perf_counter() - started
        child(["top", str(work), str(n), str(chunk_size)])
        first = child(["plan_all", str(work), str(n), str(chunk_size)])
        print(f"{n:>10,} inputs  files written in {made:.1f} s; every chunk planned (stat + sha256 of each input, "
              f"fake probe) in {first['seconds']:.1f} s")
        for _ in range(2):  # the first pass finds the inodes out of the page cache less often than a cold rerun
            r = child(["recheck", str(work), str(n), str(chunk_size)])
            per = (r["checked"] - r["read_only"]) / r["inputs"] * 1e6
            print(f"{n:>10,} inputs  rerun planning: chunk plans read {r['read_only']:.2f} s, read + every input "
                  f"checked {r['checked']:.2f} s: {per:.1f} us per input for the check ({r['max_rss_mb']:.0f} MB peak)")


def step_rerun_top(work: Path, n: int, chunk_size: int, skip: int) -> dict:
    """A rerun's top-level plan from an unchanged list: read again and compared (skip 0: before), or skipped once
    its identity matches what plan.json recorded (skip 1: after)."""
    from latentcache.cli import settings_from_args
    from latentcache.encode import planning
    from latentcache.encode.input_stats import list_identity
    from latentcache.encode.inputs import iter_inputs
    from latentcache.encode.models.vae import load_vae

    args = args_for(work, n, chunk_size)
    settings = settings_from_args(args).encode
    vae = load_vae(settings.vae, "cpu")
    started = time.perf_counter()
    lists = list_identity([str(i) for i in args.inputs]) if skip else None
    plan = planning.load_or_make_plan(args.out, iter_inputs(args.inputs), settings, vae, chunk_size=chunk_size,
                                      lists=lists)
    seconds = time.perf_counter() - started
    if not skip:  # put back the record the "before" run (no identity given) removed, for the "after" run
        from latentcache.encode import rerun_inputs

        rerun_inputs.record_lists(args.out, plan, list_identity([str(i) for i in args.inputs]))
    return {"seconds": seconds, "inputs": plan.inputs}


def step_end_check(work: Path, n: int, chunk_size: int, tasks: int) -> dict:
    """Task 0's end-of-run check, the other tasks still working: every chunk plan read (before), or its own
    shards' sidecars stat'ed and the first other task's done marker looked for (after)."""
    from latentcache.encode import chunks, finalize, job_plan

    out = args_for(work, n, chunk_size).out
    plan = job_plan.read_job_plan(out)
    started = time.perf_counter()
    finalize.pending_in_job(out, plan)
    before = time.perf_counter() - started
    started = time.perf_counter()
    mine = [s for ref in job_plan.chunks_for_rank(plan, 0, tasks)
            for s in chunks.read_chunk_plan(out, plan, ref).shards]
    finalize.mark_share_done(out, plan, 0, tasks, mine)
    waiting = finalize.first_share_pending(out, plan, tasks)
    return {"before": before, "after": time.perf_counter() - started, "waiting": waiting}


def task_costs(work: Path, sizes: list[int], chunk_size: int, tasks: int) -> None:
    for n in sizes:
        write_list(work / f"list_{n}.jsonl", n)
        child(["top", str(work), str(n), str(chunk_size)])  # the first run: plans and records the list
        child(["plan_all", str(work), str(n), str(chunk_size)])  # every chunk planned, as after the first tasks
        again = child(["rerun_top", str(work), str(n), str(chunk_size), "0"])  # warms the page cache; records
        before = child(["rerun_top", str(work), str(n), str(chunk_size), "0"])
        after = child(["rerun_top", str(work), str(n), str(chunk_size), "1"])
        assert before["inputs"] == after["inputs"] == again["inputs"] == n
        print(f"{n:>10,} inputs  a task's look for new inputs: before {before['seconds']:8.2f} s "
              f"({before['max_rss_mb']:.0f} MB peak), after {after['seconds']:8.3f} s ({after['max_rss_mb']:.0f} MB "
              "peak; the list unchanged)")
        end = child(["end_check", str(work), str(n), str(chunk_size), str(tasks)])
        print(f"{n:>10,} inputs  task 0 of {tasks}'s end-of-run check: before {end['before']:8.2f} s (every chunk "
              f"plan read), after {end['after']:8.3f} s (its share; stops at task {end['waiting']}'s missing marker)")


def child(argv: list[str]) -> dict:
    """Run one step in a fresh process: its own peak memory, nothing left over from an earlier step."""
    out = subprocess.run([sys.executable, __file__, "--step", *argv], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"step {argv} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=1000, help="array tasks sharing the chunks (task 0 is timed)")
    parser.add_argument("--stream-samples", type=int, default=512)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="2,000 inputs, chunks of 100, 4 tasks: seconds")
    parser.add_argument("--rerun-check", action="store_true",
                        help="time a rerun's check of every input against its chunk plan (real files, no video)")
    parser.add_argument("--task-costs", action="store_true",
                        help="per-task costs before and after: the look for new inputs, the end-of-run check")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        name, work, *rest = args.step
        steps = {"top": step_top, "share": step_share, "open": step_open, "stream": step_stream,
                 "plan_all": step_plan_all, "recheck": step_recheck, "rerun_top": step_rerun_top,
                 "end_check": step_end_check}
        result = steps[name](Path(work), *map(int, rest))
        result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    if args.smoke:
        args.inputs, args.chunk_size, args.tasks, args.stream_samples = [2000], 100, 4, 32
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if args.rerun_check:
            rerun_check(work, args.inputs, args.chunk_size)
            return
        if args.task_costs:
            task_costs(work, args.inputs, args.chunk_size, args.tasks)
            return
        for n in args.inputs:
            write_list(work / f"list_{n}.jsonl", n)
            top = child(["top", str(work), str(n), str(args.chunk_size)])
            print(f"{n:>10,} inputs  top-level plan   {top['seconds']:8.1f} s  {top['max_rss_mb']:7.0f} MB peak  "
                  f"{top['chunks']:,} chunks of {args.chunk_size}, {top['bytes'] / 1e6:,.0f} MB written")
            share = child(["share", str(work), str(n), str(args.chunk_size), str(args.tasks)])
            print(f"{n:>10,} inputs  one task's share {share['seconds']:8.1f} s  {share['max_rss_mb']:7.0f} MB peak  "
                  f"task 0 of {args.tasks}: {share['chunks']} chunk(s), {share['inputs']:,} inputs probed, "
                  f"{share['shards']} shards ({share['small_shards']} under a quarter full); plan.json read in "
                  f"{share['read_plan_seconds']:.2f} s")
            opened = child(["open", str(work), str(n)])
            print(f"{n:>10,} samples dataset open     {opened['seconds']:8.2f} s  {opened['max_rss_mb']:7.0f} MB peak  "
                  f"{opened['shards']:,} shards in the manifest")
            # The inputs file and chunk plans of this size are done with: room on disk for the next one.
            for p in work.glob(f"*_{n}*"):
                if p.is_dir():
                    import shutil

                    shutil.rmtree(p)
                else:
                    p.unlink()
        stream = child(["stream", str(work), str(args.stream_samples)])
        print(f"streaming {args.stream_samples} samples of 16x5x60x90: {stream['full']:.0f} samples/s from shards of "
              f"64, {stream['tiny']:.0f} samples/s from shards of 2 ({stream['tiny'] / stream['full']:.2f}x)")


if __name__ == "__main__":
    main()
