"""The VAE's cost on one accelerator, setting by setting, in one run that keeps to a time budget.

    python bench/gpu.py --json matrix.json            # GPU: full-size AutoencoderKLCogVideoX, 49x480x720
    python bench/gpu.py --tiny                        # the same code with the tiny config at 17x64x96 (CPU: CI)
    bash bench/gpu.sh OUT                             # this, then the null-VAE and whole-pipeline runs, into OUT

For each dtype (fp16, bf16), tiling (off, on) and batch (1, 2, 4 clips a call), on one real decoded clip repeated to
the batch: seconds a clip of `encode(stage(clips))` as the pipeline calls it (after a warm-up call of that shape),
achieved TFLOP/s (FLOPs counted once per tiling with torch.utils.flop_counter), peak device memory, and whether the
VAE fell back to fp32 (non-finite latents in fp16). Then `torch.compile` on the encoder at bf16 and the fastest
untiled batch: the first call (the compile) apart from the timed ones. The weights are random (no download): cost
and memory are the real model's, the latents mean nothing.

Steps run in that order and each is skipped, said so, once the budget (`--budget-s`) would be passed; an error or an
out-of-memory in one is recorded and the next goes on. Each result is printed as it comes and, with `--json`, the
file is rewritten after each, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentcache.encode.decoding.decode import decode_clip  # noqa: E402
from latentcache.encode.models.memory import is_out_of_memory, release_cached_memory  # noqa: E402  (the pipeline's own OOM handling)
from latentcache.encode.models.vae import VideoVAE  # noqa: E402
from latentcache.encode.settings import ClipSettings, TilingSettings  # noqa: E402
from latentcache.tools.synthetic import write_video  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _load_encode_bench() -> ModuleType:
    """bench/encode.py (the full-size VAE, FLOP counting, the TFLOP/s peaks), by its path: bench/ is scripts, and
    putting it on sys.path would let its file names shadow modules."""
    name = "latentcache_bench_encode"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("encode.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


encode_bench = _load_encode_bench()


@dataclass
class Row:
    """One setting's figures; `error` says why there are none."""

    step: str
    dtype: str
    tiling: bool
    batch: int
    compiled: bool = False
    s_per_clip: float | None = None
    clips_per_s: float | None = None
    tflops: float | None = None
    peak_gib: float | None = None
    first_call_s: float | None = None
    fp32_fallback: bool = False
    error: str | None = None


@dataclass
class Report:
    device: dict[str, Any]
    clip: str
    flops_per_clip: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def write(self, path: Path | None) -> None:
        if path is not None:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(asdict(self), indent=1, allow_nan=False, default=str) + "\n")
            tmp.replace(path)


class _Fallbacks(logging.Handler):
    """Counts VideoVAE.encode's 're-encoding in fp32' warnings: an fp16 figure that includes them is fp32's."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "re-encoding in fp32" in record.getMessage():
            self.count += 1


class _OutOfTime(Exception):
    pass


@contextmanager
def _deadline(seconds: float):
    """Raise _OutOfTime in the main thread after `seconds` (a compile that runs past the budget)."""
    def alarm(*_: Any) -> None:
        raise _OutOfTime()

    if not hasattr(signal, "SIGALRM"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def time_calls(vae: VideoVAE, frames: np.ndarray, batch: int, calls: int) -> tuple[float, float, float | None]:
    """(first call's seconds, seconds a clip over `calls` more, peak GiB) of encode(stage(batch copies))."""
    clips = [frames] * batch
    _reset_peak(vae.device)
    started = time.perf_counter()
    vae.encode(vae.stage(clips))
    encode_bench._sync(vae.device)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(calls):
        vae.encode(vae.stage(clips))
    encode_bench._sync(vae.device)
    return first, (time.perf_counter() - started) / (calls * batch), _peak_gib(vae.device)


def tile_for(tiny: bool) -> TilingSettings:
    # Exact tiles (see families.tile_problem), as bench/encode.py --full uses: 256x384 for 480x720.
    return (TilingSettings(tile_height=32, tile_width=48, overlap=0.5) if tiny else
            TilingSettings(tile_height=256, tile_width=384, overlap=0.25))


def real_clip(clip: ClipSettings, folder: Path, tiny: bool) -> np.ndarray:
    """One clip decoded (and resized) from a generated h264 video larger than the clip, as the pipeline decodes."""
    height, width = (96, 128) if tiny else (540, 960)
    path = write_video(folder / "source", codec="h264", num_frames=int((clip.frames / clip.fps + 1) * 24),
                       height=height, width=width, fps=24)
    return decode_clip(path, 0.0, clip).frames


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny CogVideoX config at 17x64x96 (a smoke run on a CPU)")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma-separated, of fp16, bf16, fp32")
    p.add_argument("--batches", default="1,2,4", help="comma-separated clips per VAE call")
    p.add_argument("--calls", type=int, default=2, help="timed calls per setting, after its warm-up call (at least "
                   "4 clips in all)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile step")
    p.add_argument("--budget-s", type=float, default=300.0, help="seconds after which no new step starts")
    p.add_argument("--json", type=Path, default=None, help="write the figures here, after every step")
    args = p.parse_args(argv)
    started = time.perf_counter()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: {d!r} is not one of {', '.join(DTYPES)}")
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import diffusers

    info: dict[str, Any] = {"name": torch.cuda.get_device_name() if device.type == "cuda" else encode_bench._cpu_name(),
                            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__}
    if device.type == "cuda":
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    clip = (ClipSettings(frames=17, fps=8.0, height=64, width=96) if args.tiny else
            ClipSettings(frames=49, fps=8.0, height=480, width=720))
    report = Report(device=info, clip=clip.bucket)
    print(f"device: {info}; clip {clip.bucket}; budget {args.budget_s:.0f} s", flush=True)
    fallbacks = _Fallbacks()
    logging.getLogger("latentcache.encode.models.vae").addHandler(fallbacks)
    peak = next((v for k, v in encode_bench.PEAK_TFLOPS.items() if k in info["name"]), None)

    with tempfile.TemporaryDirectory() as tmp:
        frames = real_clip(clip, Path(tmp), args.tiny)
    vae = encode_bench.full_size_vae(device, DTYPES[dtypes[0]], tiny=args.tiny)
    vae.tune()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    def record(row: Row) -> None:
        report.rows.append(row)
        report.write(args.json)
        if row.error:
            print(f"{row.step}: {row.dtype} tiling {'on' if row.tiling else 'off'} batch {row.batch}: {row.error}",
                  flush=True)
            return
        tf = f"{row.tflops:.3g} TFLOP/s" + (f" ({100 * row.tflops / peak:.0f}% of {peak:.0f})" if peak else "") \
            if row.tflops is not None else "TFLOP/s not counted"
        mem = f"peak {row.peak_gib:.1f} GiB" if row.peak_gib is not None else "peak memory not measured (CPU)"
        first = f"; first call {row.first_call_s:.1f} s" if row.compiled else ""
        print(f"{row.step}: {row.dtype} tiling {'on ' if row.tiling else 'off'} batch {row.batch}: "
              f"{row.s_per_clip:.3f} s/clip ({row.clips_per_s:.2f} clips/s), {tf}, {mem}"
              f"{'; FELL BACK TO FP32' if row.fp32_fallback else ''}{first}", flush=True)

    def measure(step: str, name: str, tiled: bool, batch: int, *, compiled: bool = False) -> Row:
        row = Row(step, name, tiled, batch, compiled=compiled)
        before = fallbacks.count
        calls = max(args.calls, -(-4 // batch))
        try:
            with _deadline(left()):
                first, per_clip, peak_gib = time_calls(vae, frames, batch, calls)
        except _OutOfTime:
            row.error = "cut off at the budget"
        except Exception as e:  # noqa: BLE001 - one setting's failure must not lose the others' figures
            row.error = "out of memory" if is_out_of_memory(e) else f"{type(e).__name__}: {str(e)[:300]}"
            release_cached_memory(vae)
        else:
            row.s_per_clip, row.clips_per_s, row.peak_gib = per_clip, 1.0 / per_clip, peak_gib
            row.first_call_s = first
            flops = report.flops_per_clip.get("tiled" if tiled else "untiled")
            row.tflops = flops / per_clip / 1e12 if flops else None
        row.fp32_fallback = fallbacks.count > before
        return row

    for tiled in (False, True):
        vae.configure(tile_for(args.tiny) if tiled else None, None)
        key = "tiled" if tiled else "untiled"
        try:
            report.flops_per_clip[key] = encode_bench.flops_per_clip(vae, clip)
        except Exception as e:  # noqa: BLE001
            print(f"FLOPs ({key}) not counted: {type(e).__name__}: {e}", flush=True)
            release_cached_memory(vae)
        for name in dtypes:
            encode_bench.replace_dtype(vae, DTYPES[name])
            for batch in batches:
                label = f"{name} tiling {'on' if tiled else 'off'} batch {batch}"
                if left() <= 0:
                    report.skipped.append(label)
                    print(f"skipped (budget): {label}", flush=True)
                    continue
                record(measure("matrix", name, tiled, batch))
    vae.configure(None, None)

    if args.no_compile:
        report.skipped.append("compile (--no-compile)")
    elif device.type != "cuda":
        # VideoVAE.tune compiles on CUDA only (what `--compile` does); a figure here would be the uncompiled one.
        report.skipped.append("compile (CPU: --compile applies on a GPU only)")
        print("skipped: compile (on a CPU, --compile does nothing)", flush=True)
    elif left() <= 0:
        report.skipped.append("compile (budget)")
        print("skipped (budget): compile", flush=True)
    else:
        name = "bf16" if "bf16" in dtypes else dtypes[0]
        done = [r for r in report.rows if r.dtype == name and not r.tiling and r.clips_per_s]
        batch = max(done, key=lambda r: r.clips_per_s).batch if done else batches[0]
        encode_bench.replace_dtype(vae, DTYPES[name])
        vae.tune(compile_encoder=True)
        record(measure("compile", name, False, batch, compiled=True))

    measured = [r for r in report.rows if r.s_per_clip is not None]
    print(f"{len(measured)} setting(s) measured, {len(report.rows) - len(measured)} failed, "
          f"{len(report.skipped)} skipped, in {time.perf_counter() - started:.0f} s", flush=True)
    report.write(args.json)
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
