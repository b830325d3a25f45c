"""latentcache's encode pipeline against the naive loop peers' preparation scripts use, on the same clips and VAE.

The naive loop: decode one clip, `vae.encode` it alone in fp32, `torch.save` a `.pt`, next clip. latentcache:
decode in worker processes ahead of the VAE, batched encode in the chosen dtype, webdataset shards.

    python bench/encode.py                      # CPU: tiny random CogVideoX VAE, 17x64x96 clips
    python bench/encode.py --full --clips 16    # GPU: full-size AutoencoderKLCogVideoX (random weights), 49x480x720

Prints clips/s of each, their ratio, bytes per clip, and on a GPU peak memory with and without tiling and the
achieved TFLOP/s (FLOPs counted with torch.utils.flop_counter).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentcache import pipeline  # noqa: E402
from latentcache.decode import decode_clip  # noqa: E402
from latentcache.plan import discover_inputs, make_plan  # noqa: E402
from latentcache.settings import ClipSettings, EncodeSettings, TilingSettings, VAESettings  # noqa: E402
from latentcache.synthetic import write_video  # noqa: E402
from latentcache.vae import FAMILIES, VAEIdentity, VideoVAE, load_vae, resolve_dtype  # noqa: E402

# Dense fp16/bf16 tensor-core peaks (TFLOP/s), for the utilisation figure.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def make_videos(folder: Path, n: int, height: int, width: int, seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    codecs = ["h264", "vp9", "h264", "hevc10"]
    fps = 24
    for i in range(n):
        write_video(folder / f"v{i:03d}", codec=codecs[i % len(codecs)], num_frames=int(seconds * fps) + 2,
                    height=height, width=width, fps=fps)


def full_size_vae(device: torch.device, dtype: torch.dtype) -> VideoVAE:
    """The default AutoencoderKLCogVideoX config (215M parameters) with random weights: real cost, no download."""
    from diffusers import AutoencoderKLCogVideoX

    family = FAMILIES["cogvideox"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoencoderKLCogVideoX()
    model = model.to(device, dtype).eval().requires_grad_(False)
    identity = VAEIdentity(class_name=family.class_name, source="random-full-size", subfolder=None, revision=None,
                           config_hash="bench", random_weights=True)
    return VideoVAE(model, family.spec_from_config(model.config), identity, device, dtype)


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


def latentcache_run(inputs: list[str], settings: EncodeSettings, vae: VideoVAE, out: Path) -> tuple[float, int]:
    plan = make_plan(discover_inputs(inputs), settings, pipeline.vae_record(vae))
    started = time.perf_counter()
    summary = pipeline.run(out, plan, vae, settings)
    _sync(vae.device)
    seconds = time.perf_counter() - started
    assert summary.clips_written == len(plan.clips), summary
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
    vae.configure(tiling, None)
    torch.cuda.reset_peak_memory_stats()
    vae.encode(torch.zeros(1, clip.frames, clip.height, clip.width, 3, dtype=torch.uint8))
    torch.cuda.synchronize()
    vae.configure(None, None)
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="full-size CogVideoX VAE at 49x480x720 (GPU)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--source-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=None,
                        metavar="HxW", help="size of the generated source videos (decode cost grows with it)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="threads for the VAE on CPU; 1 leaves the other cores to decoding, as a GPU would")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    if args.full:
        clip = ClipSettings(frames=49, fps=8.0, height=480, width=720)
        vae = full_size_vae(device, dtype)
        n, src = args.clips or 8, args.source_size or (540, 960)
    else:
        clip = ClipSettings(frames=17, fps=8.0, height=64, width=96)
        vae = load_vae(VAESettings(source="tiny-random-cogvideox", subfolder=None, dtype=args.dtype), str(device))
        n, src = args.clips or 24, args.source_size or (192, 256)
    batch = args.batch_size or (1 if args.full else 4)
    settings = EncodeSettings(clip=clip, vae=VAESettings(source=vae.identity.source, subfolder=None),
                              samples_per_shard=64, batch_size=batch, workers=args.workers)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else _cpu_name()
    print(f"device: {device_name}; clips: {n} x {clip.bucket}; VAE: {vae.identity.source}; dtype {dtype}; "
          f"batch {batch}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_videos(tmp / "videos", n, *src, seconds=(clip.frames - 1) / clip.fps + 0.5)
        paths = sorted(str(p) for p in (tmp / "videos").iterdir())
        # Warm-up (allocator, cudnn autotune, page cache) so neither side pays it.
        vae.encode(decode_clip(paths[0], 0.0, clip).frames[None])
        ours_s, ours_bytes = latentcache_run([str(tmp / "videos")], settings, vae, tmp / "ours")
        # The same pipeline, one clip per VAE call: what decode overlap alone buys.
        overlap_s, _ = latentcache_run([str(tmp / "videos")], replace(settings, batch_size=1), vae, tmp / "overlap")
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
        if device.type == "cuda":
            flops = flops_per_clip(vae, clip)
            achieved = flops * n / ours_s / 1e12
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
            util = f" = {100 * achieved / peak:.0f}% of {peak:.0f} peak" if peak else ""
            print(f"VAE: {flops / 1e12:.1f} TFLOP per clip; achieved {achieved:.1f} TFLOP/s{util}")
            tile = TilingSettings(tile_height=256, tile_width=384, overlap=0.25)  # exact: see vae.tile_problem
            print(f"peak GPU memory per clip: untiled {peak_memory(vae, clip, None):.1f} GiB, "
                  f"tiled {tile.tile_height}x{tile.tile_width} {peak_memory(vae, clip, tile):.1f} GiB")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
