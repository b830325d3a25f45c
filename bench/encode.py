"""latentcache's encode pipeline against the naive loop peers' preparation scripts use, on the same clips and VAE.

The naive loop: decode one clip, `vae.encode` it alone in fp32, `torch.save` a `.pt`, next clip. latentcache:
decode in worker processes ahead of the VAE, batched encode in the chosen dtype, webdataset shards.

    python bench/encode.py                      # CPU: tiny random CogVideoX VAE, 17x64x96 clips
    python bench/encode.py --full --clips 16    # GPU: full-size AutoencoderKLCogVideoX (random weights), 49x480x720
    python bench/encode.py --full --tiny        # the --full code path with the tiny config (runs on a CPU: CI)
    python bench/encode.py --whole-process      # `latentcache encode` at default flags vs a naive script, whole
                                                # processes timed from the outside (start-up included)
    python bench/encode.py --null-vae           # the whole pipeline at 49x480x720 on real decoded video, the VAE a
                                                # zero-cost stand-in: the main process's time outside the VAE call

Prints clips/s of each, their ratio, bytes per clip, and on a GPU peak memory with and without tiling and the
achieved TFLOP/s (FLOPs counted with torch.utils.flop_counter).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from latentcache.encode import execute, planning  # noqa: E402
from latentcache.encode.decoding.decode import decode_clip  # noqa: E402
from latentcache.encode.inputs import discover_inputs  # noqa: E402
from latentcache.encode.models.families import FAMILIES  # noqa: E402
from latentcache.encode.models.vae import VAEIdentity, VideoVAE, load_vae, resolve_dtype  # noqa: E402
from latentcache.encode.settings import ClipSettings, EncodeSettings, RuntimeSettings, TilingSettings, VAESettings  # noqa: E402
from latentcache.tools.synthetic import write_video  # noqa: E402

# Dense fp16/bf16 tensor-core peaks (TFLOP/s), for the utilisation figure.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def make_videos(folder: Path, n: int, height: int, width: int, seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    codecs = ["h264", "vp9", "h264", "hevc10"]
    fps = 24
    for i in range(n):
        write_video(folder / f"v{i:03d}", codec=codecs[i % len(codecs)], num_frames=int(seconds * fps) + 2,
                    height=height, width=width, fps=fps)


def full_size_vae(device: torch.device, dtype: torch.dtype, *, tiny: bool = False) -> VideoVAE:
    """The default AutoencoderKLCogVideoX config (215M parameters) with random weights: real cost, no download.

    `tiny` builds the family's tiny config instead, through the same code, so CI runs this path without a GPU.
    """
    from diffusers import AutoencoderKLCogVideoX

    family = FAMILIES["cogvideox"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoencoderKLCogVideoX(**(family.tiny_config if tiny else {}))
    model = model.to(device, dtype).eval().requires_grad_(False)
    source = "random-tiny" if tiny else "random-full-size"
    identity = VAEIdentity(class_name=family.class_name, source=source, subfolder=None, revision=None,
                           config_hash="bench", random_weights=True)
    return VideoVAE(model, family.spec_from_model(model), identity, device, dtype)


def naive_loop(paths: list[str], clip: ClipSettings, vae: VideoVAE, out: Path) -> tuple[float, int]:
    """What peers do: one clip at a time, fp32, a .pt per clip. Returns (seconds, bytes written)."""
    fp32 = replace_dtype(vae, torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for i, path in enumerate(paths):
        frames = decode_clip(path, 0.0, clip).frames
        mean, logvar = fp32.encode(frames[None])
        torch.save({"mean": mean[0], "logvar": logvar[0]}, out / f"{i:06d}.pt")
    _sync(vae.device)
    return time.perf_counter() - started, sum(p.stat().st_size for p in out.glob("*.pt"))


def replace_dtype(vae: VideoVAE, dtype: torch.dtype) -> VideoVAE:
    if vae.dtype == dtype:
        return vae
    vae.model.to(dtype)
    vae.dtype = dtype
    return vae


def latentcache_run(inputs: list[str], settings: EncodeSettings, runtime: RuntimeSettings, vae: VideoVAE,
                    out: Path) -> tuple[float, int]:
    # Planning (probing) happens before the clock starts, as it did when the plan was one file: the figure is the
    # decode -> encode -> write loop.
    plan = planning.load_or_make_plan(out, discover_inputs(inputs), settings, vae)
    chunk_plans = planning.plan_chunks(out, plan, settings)
    started = time.perf_counter()
    summary = execute.run(out, plan, vae, settings, runtime=runtime, chunk_plans=chunk_plans)
    _sync(vae.device)
    seconds = time.perf_counter() - started
    assert summary.clips_written == sum(len(c.clips) for c in chunk_plans), summary
    return seconds, sum(p.stat().st_size for p in (out / "shards").rglob("*.tar"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_clip(vae: VideoVAE, clip: ClipSettings) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    frames = torch.zeros(1, clip.frames, clip.height, clip.width, 3, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        vae.encode(frames)
    return float(counter.get_total_flops())


def peak_memory(vae: VideoVAE, clip: ClipSettings, tiling: TilingSettings | None) -> float:
    """GiB at the peak of encoding one clip; NaN on a CPU, where the (tiled) encode still runs."""
    cuda = vae.device.type == "cuda"
    vae.configure(tiling, None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    vae.encode(torch.zeros(1, clip.frames, clip.height, clip.width, 3, dtype=torch.uint8))
    vae.configure(None, None)
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="full-size CogVideoX VAE at 49x480x720 (GPU)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --full: the tiny config at 17x64x96, the same code path (a smoke run on a CPU)")
    parser.add_argument("--whole-process", action="store_true",
                        help="time `latentcache encode` at default flags against a naive script, each a process")
    parser.add_argument("--videos", type=int, default=4, help="--whole-process: source videos")
    parser.add_argument("--clips-per-video", type=int, default=4, help="--whole-process: clips taken from each")
    parser.add_argument("--repeat", type=int, default=2, help="--whole-process: timed rounds (the best counts)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", default=None, help="clips per VAE call, or auto (default: 4; --full: auto)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--source-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=None,
                        metavar="HxW", help="size of the generated source videos (decode cost grows with it)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="threads for the VAE on CPU; 1 leaves the other cores to decoding, as a GPU would")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="--null-vae: clips a shard (default: the batch size, so the writer has work to overlap)")
    parser.add_argument("--null-vae", action="store_true",
                        help="the VAE replaced by a stand-in returning right-shaped latents at zero cost")
    parser.add_argument("--vae-seconds", type=float, default=0.0, metavar="S",
                        help="--null-vae: the stand-in sleeps S per clip, as the main process waits on a GPU (0.3: a "
                        "49x480x720 clip on one), so decoding and writing overlap it; what is left outside the call is "
                        "the accelerator's idle time")
    args = parser.parse_args(argv)
    if args.tiny and not (args.full or args.null_vae):
        parser.error("--tiny goes with --full or --null-vae")
    if args.whole_process:
        return whole_process(args)
    if args.null_vae:
        return null_vae(args)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    if args.full and not args.tiny:
        clip = ClipSettings(frames=49, fps=8.0, height=480, width=720)
        vae = full_size_vae(device, dtype)
        n, src = args.clips or 8, args.source_size or (540, 960)
    elif args.full:
        clip = ClipSettings(frames=17, fps=8.0, height=64, width=96)
        vae = full_size_vae(device, dtype, tiny=True)
        n, src = args.clips or 2, args.source_size or (96, 128)
    else:
        clip = ClipSettings(frames=17, fps=8.0, height=64, width=96)
        vae = load_vae(VAESettings(source="tiny-random-cogvideox", subfolder=None, dtype=args.dtype), str(device))
        n, src = args.clips or 24, args.source_size or (192, 256)
    batch = args.batch_size or ("auto" if args.full else "4")
    batch = vae.auto_batch_size(clip.frames, clip.height, clip.width) if batch == "auto" else int(batch)
    settings = EncodeSettings(clip=clip, vae=VAESettings(source=vae.identity.source, subfolder=None),
                              samples_per_shard=64)
    runtime = RuntimeSettings(batch_size=batch, workers=args.workers)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else _cpu_name()
    print(f"device: {device_name}; clips: {n} x {clip.bucket}; VAE: {vae.identity.source}; dtype {dtype}; "
          f"batch {batch}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_videos(tmp / "videos", n, *src, seconds=(clip.frames - 1) / clip.fps + 0.5)
        paths = sorted(str(p) for p in (tmp / "videos").iterdir())
        # Warm-up (allocator, cudnn autotune, page cache) so neither side pays it.
        vae.encode(decode_clip(paths[0], 0.0, clip).frames[None])
        ours_s, ours_bytes = latentcache_run([str(tmp / "videos")], settings, runtime, vae, tmp / "ours")
        # The same pipeline, one clip per VAE call: what decode overlap alone buys.
        overlap_s, _ = latentcache_run([str(tmp / "videos")], settings, replace(runtime, batch_size=1), vae,
                                       tmp / "overlap")
        naive_s, naive_bytes = naive_loop(paths, clip, vae, tmp / "naive")
        replace_dtype(vae, dtype)
        name = str(dtype).split(".")[-1]
        print(f"naive loop (fp32, one clip at a time, .pt files): {n / naive_s:8.2f} clips/s  "
              f"{naive_bytes / n / 1e6:.3f} MB/clip")
        print(f"latentcache ({name}, decode workers, batch 1):      {n / overlap_s:8.2f} clips/s  "
              f"ratio {naive_s / overlap_s:.2f}x (overlap alone)")
        print(f"latentcache ({name}, decode workers, batch {batch}):      {n / ours_s:8.2f} clips/s  "
              f"{ours_bytes / n / 1e6:.3f} MB/clip")
        print(f"ratio latentcache / naive: {naive_s / ours_s:.2f}x")
        if args.full:
            flops = flops_per_clip(vae, clip)
            achieved = flops * n / ours_s / 1e12
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
            util = f" = {100 * achieved / peak:.0f}% of {peak:.0f} peak" if peak else ""
            print(f"VAE: {flops / 1e12:.4f} TFLOP per clip; achieved {achieved:.4f} TFLOP/s{util}")
            # Exact tiles (see families.tile_problem): 256x384 for 480x720, 32x48 for the tiny 64x96 clips.
            tile = (TilingSettings(tile_height=32, tile_width=48, overlap=0.5) if args.tiny else
                    TilingSettings(tile_height=256, tile_width=384, overlap=0.25))
            untiled, tiled = peak_memory(vae, clip, None), peak_memory(vae, clip, tile)
            print(f"peak {'GPU' if device.type == 'cuda' else 'CPU (not measured)'} memory per clip: untiled "
                  f"{untiled:.1f} GiB, tiled {tile.tile_height}x{tile.tile_width} {tiled:.1f} GiB")
    return 0


def null_vae(args: argparse.Namespace) -> int:
    """`execute.run` over real decoded video with `vae.encode` returning zeros of the latent shape at once: what is
    left is the main process's own cost (batching, metadata, handing shards to the writer) plus its waits on the
    decode workers. A GPU at ~0.3 s per 49x480x720 clip idles for every millisecond of the first."""
    clip = (ClipSettings(frames=17, fps=8.0, height=64, width=96) if args.tiny else
            ClipSettings(frames=49, fps=8.0, height=480, width=720))
    n = args.clips or (4 if args.tiny else 16)
    src = args.source_size or ((96, 128) if args.tiny else (540, 960))
    vae = load_vae(VAESettings(source="tiny-random-cogvideox", subfolder=None, dtype="fp32"), "cpu")
    shape = vae.spec.latent_shape(clip.frames, clip.height, clip.width)
    in_vae = [0.0]

    vae_cpu = [0.0]

    def encode(frames, *, sources=None, **_):
        started, started_cpu = time.perf_counter(), time.thread_time()
        mean, logvar = torch.zeros((len(frames), *shape)), torch.zeros((len(frames), *shape))
        if args.vae_seconds:
            time.sleep(args.vae_seconds * len(frames))  # the CPU free, as while a GPU computes
        in_vae[0] += time.perf_counter() - started
        vae_cpu[0] += time.thread_time() - started_cpu
        return mean, logvar

    vae.encode = encode  # type: ignore[method-assign]
    waits = [0.0]
    first_batch = [0.0]  # start-up: the wait for the first batch's clips, paid once per run
    real_stream = execute.ClipStream

    class TimedStream(real_stream):  # type: ignore[misc, valid-type]
        def __iter__(self):
            it = super().__iter__()
            taken = 0
            while True:
                started = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                waited = time.perf_counter() - started
                taken += 1
                if taken <= batch:
                    first_batch[0] += waited
                else:
                    waits[0] += waited
                yield item

    execute.ClipStream = TimedStream  # type: ignore[misc]
    # The last shard's write waits at the end of the run (nothing is left to overlap it): timed on its own.
    tail = [0.0]
    real_writer = execute.ShardWriter

    class TimedWriter(real_writer):  # type: ignore[misc, valid-type]
        def __exit__(self, *exc):
            started = time.perf_counter()
            try:
                return super().__exit__(*exc)
            finally:
                tail[0] += time.perf_counter() - started

    execute.ShardWriter = TimedWriter  # type: ignore[misc]
    batch = int(args.batch_size or 4)
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    per_shard = args.samples_per_shard or batch
    settings = EncodeSettings(clip=clip, vae=VAESettings(source=vae.identity.source, subfolder=None),
                              samples_per_shard=per_shard)
    runtime = RuntimeSettings(batch_size=batch, workers=workers)
    print(f"null VAE: {n} clips x {clip.bucket} from {src[0]}x{src[1]} video; batch {batch}; {per_shard} clips a "
          f"shard; {workers} decode worker(s); the stand-in takes {args.vae_seconds:g} s a clip; CPU {_cpu_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_videos(tmp / "videos", n, *src, seconds=(clip.frames - 1) / clip.fps + 0.5)
        real_run = execute.run
        run_cpu = [0.0]

        def timed_run(*a, **kw):
            started = time.thread_time()
            try:
                return real_run(*a, **kw)
            finally:
                run_cpu[0] += time.thread_time() - started

        execute.run = timed_run  # type: ignore[assignment]
        try:
            wall, _ = latentcache_run([str(tmp / "videos")], settings, runtime, vae, tmp / "out")
            main_cpu = run_cpu[0] - vae_cpu[0]
        finally:
            execute.ClipStream, execute.ShardWriter = real_stream, real_writer  # type: ignore[misc]
            execute.run = real_run  # type: ignore[assignment]
    outside = (wall - in_vae[0]) / n
    own = (wall - in_vae[0] - first_batch[0] - waits[0] - tail[0]) / n
    print(f"per clip: {1000 * outside:.1f} ms outside the VAE call: {1000 * first_batch[0] / n:.1f} ms start-up "
          f"(waiting for the first batch's clips), {1000 * waits[0] / n:.1f} ms waiting on decode after it, "
          f"{1000 * tail[0] / n:.1f} ms writing the last shard after the last batch, {1000 * own:.1f} ms the main "
          "process's own work")
    print(f"steady state (all but the start-up and the last write): {1000 * (own + waits[0] / n):.1f} ms per clip "
          f"outside the VAE call; the main thread's CPU outside the VAE call {1000 * main_cpu / n:.1f} ms per clip "
          "(start-up included)")
    print(f"decode: {n / wall / max(1, workers):.2f} clips/s per decode worker ({n / wall:.2f} clips/s in all)")
    return 0


# The loop peers' preparation scripts run, as its own process: decode a clip, encode it alone in fp32, save a .pt.
NAIVE_SCRIPT = """
import json, sys, time
from pathlib import Path
import torch
from latentcache.encode.decoding.decode import decode_clip
from latentcache.encode.settings import ClipSettings, VAESettings
from latentcache.encode.models.vae import load_vae

job = json.loads(Path(sys.argv[1]).read_text())
clip = ClipSettings(**job["clip"])
vae = load_vae(VAESettings(source=job["vae"], subfolder=None, dtype="fp32"), "auto")
out = Path(sys.argv[2])
out.mkdir(parents=True)
for i, (path, start) in enumerate(job["clips"]):
    frames = decode_clip(path, start, clip).frames
    mean, logvar = vae.encode(frames[None])
    torch.save({"mean": mean[0], "logvar": logvar[0]}, out / f"{i:06d}.pt")
"""


def whole_process(args: argparse.Namespace) -> int:
    """`latentcache encode` with default performance flags (batch size, workers, dtype) against the naive script,
    each timed as a whole process: imports, model build, planning, worker start-up and the manifest included."""
    clip = ClipSettings(frames=17, fps=8.0, height=64, width=96)
    vae = "tiny-random-cogvideox"
    src = args.source_size or (360, 640)
    k = args.clips_per_video
    flags = ["--vae", vae, "--frames", str(clip.frames), "--fps", f"{clip.fps:g}", "--height", str(clip.height),
             "--width", str(clip.width), "--clips", f"uniform:{k}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Holdout-like: a few seconds each, mixed codecs, at a common source size.
        make_videos(tmp / "videos", args.videos, *src, seconds=k * (clip.frames - 1) / clip.fps + 1.0)
        script = tmp / "naive.py"
        script.write_text(NAIVE_SCRIPT, encoding="utf-8")
        ours, naive = [], []
        for round_ in range(args.repeat):
            out = tmp / f"ours{round_}"
            cmd = [sys.executable, "-m", "latentcache.cli", "encode", str(tmp / "videos"), "--out", str(out), *flags]
            ours.append(_timed_process(cmd, env))
            planned = [c for f in sorted((out / "chunks").rglob("*.json"))
                       for c in json.loads(f.read_text(encoding="utf-8"))["clips"]]
            job = tmp / "naive_job.json"
            job.write_text(json.dumps({"clip": {"frames": clip.frames, "fps": clip.fps, "height": clip.height,
                                                "width": clip.width},
                                       "vae": vae, "clips": [[c["source"], c["start"]] for c in planned]}))
            naive.append(_timed_process([sys.executable, str(script), str(job), str(tmp / f"naive{round_}")], env))
        n = len(planned)
        print(f"{_cpu_name() if not torch.cuda.is_available() else torch.cuda.get_device_name()}; {args.videos} "
              f"videos {src[0]}x{src[1]}, {n} clips of {clip.bucket}, {vae}; best of {args.repeat}")
        print(f"naive script (decode, fp32 encode, torch.save per clip): {min(naive):6.2f} s  ({n / min(naive):.2f} "
              "clips/s)")
        print(f"latentcache encode, default flags:                        {min(ours):6.2f} s  ({n / min(ours):.2f} "
              "clips/s)")
        print(f"ratio latentcache / naive, whole process: {min(naive) / min(ours):.2f}x")
        print("latentcache command: latentcache encode VIDEOS --out OUT " + " ".join(flags))
    return 0


def _timed_process(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return seconds


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
