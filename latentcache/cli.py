"""`latentcache` command line: builds the settings once, owns printing, progress bars and exit codes.

Exit codes: 0 all inputs done, 1 crash (a bug: traceback), 2 usage or configuration error,
3 finished but some inputs failed (see OUT/failures.jsonl).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from latentcache.errors import ConfigError, InputError, LatentcacheError
from latentcache.settings import ClipSettings, EncodeSettings, TilingSettings, VAESettings

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_SOME_FAILED = 0, 1, 2, 3
log = logging.getLogger("latentcache")


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="video files, directories (recursive), or a .txt/.csv/.jsonl list")
    p.add_argument("--out", required=True, type=Path, help="output directory (shards, manifest, failures)")
    g = p.add_argument_group("VAE")
    g.add_argument("--vae", default=None, help="local dir, hub id, or tiny-random-cogvideox "
                   "(default: the family's hub id, e.g. THUDM/CogVideoX-2b)")
    g.add_argument("--family", default="cogvideox", help="VAE family (default cogvideox)")
    g.add_argument("--subfolder", default=None, help="subfolder of a pipeline repo holding the VAE (default: vae)")
    g.add_argument("--revision", default=None)
    g.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="auto: fp16 on GPU, fp32 on CPU")
    g.add_argument("--tiling", default=None, metavar="H,W,OVERLAP",
                   help="spatial tiling in pixels, e.g. 240,360,0.25 (validated against the VAE)")
    g.add_argument("--frame-chunk", type=int, default=None, help="frames per encoder step (temporal chunking)")
    g.add_argument("--device", default="auto")
    g.add_argument("--batch-size", type=int, default=1, help="clips per VAE call")
    c = p.add_argument_group("clips")
    defaults = ClipSettings()
    c.add_argument("--frames", type=int, default=defaults.frames)
    c.add_argument("--fps", type=float, default=defaults.fps)
    c.add_argument("--height", type=int, default=defaults.height)
    c.add_argument("--width", type=int, default=defaults.width)
    c.add_argument("--clips", default=defaults.strategy, help="first | uniform:K | sliding:SECONDS | all")
    c.add_argument("--resize", default=defaults.resize, choices=["crop", "fit"])
    c.add_argument("--short", default=defaults.short, choices=["skip", "pad"],
                   help="videos shorter than one clip: skip (reported) or pad by repeating the last frame")
    p.add_argument("--samples-per-shard", type=int, default=EncodeSettings().samples_per_shard)
    p.add_argument("--strict", action="store_true", help="stop at the first failed input")
    p.add_argument("--overwrite", action="store_true", help="start OUT again even if it was made with other settings")
    p.add_argument("-v", "--verbose", action="store_true")


def settings_from_args(args: argparse.Namespace) -> EncodeSettings:
    from latentcache.vae import family_of

    family = family_of(args.family)
    tiling = None
    if args.tiling:
        try:
            h, w, overlap = args.tiling.split(",")
            tiling = TilingSettings(tile_height=int(h), tile_width=int(w), overlap=float(overlap))
        except ValueError:
            raise ConfigError(f"--tiling {args.tiling!r}: expected H,W,OVERLAP such as 240,360,0.25") from None
    source = args.vae or family.default_source
    subfolder = args.subfolder if args.subfolder is not None else (
        family.default_subfolder if source == family.default_source else None)
    for name in ("frames", "batch_size", "samples_per_shard"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.fps <= 0:
        raise ConfigError(f"--fps must be positive, got {args.fps}")
    return EncodeSettings(
        clip=ClipSettings(frames=args.frames, fps=args.fps, height=args.height, width=args.width,
                          strategy=args.clips, resize=args.resize, short=args.short),
        vae=VAESettings(source=source, family=family.name, subfolder=subfolder, revision=args.revision,
                        dtype=args.dtype, tiling=tiling, frame_chunk=args.frame_chunk),
        samples_per_shard=args.samples_per_shard,
        device=args.device,
        batch_size=args.batch_size,
        strict=args.strict,
    )


def encode_job(args: argparse.Namespace, *, rank: int = 0, world_size: int = 1, is_main: bool = True,
               barrier: Callable[[], None] = lambda: None, device: str | None = None, finalize_at_end: bool = True,
               progress_position: int = 0) -> int:
    """The encode job, shared by `latentcache encode` and `jobs/encode.py` (accelerate, SLURM)."""
    from tqdm import tqdm

    from latentcache import pipeline
    from latentcache.plan import Plan, discover_inputs, shards_for_rank
    from latentcache.vae import load_vae

    settings = settings_from_args(args)
    out: Path = args.out
    vae = load_vae(settings.vae, device or settings.device)
    if vae.identity.random_weights and is_main:
        print(f"NOTE: {settings.vae.source} has random weights: these latents are for demos and tests only.")
    if is_main:
        inputs = discover_inputs(args.inputs)
        plan = pipeline.load_or_make_plan(out, inputs, settings, vae, overwrite=args.overwrite)
    barrier()
    if not is_main:
        plan = Plan.from_json((out / pipeline.PLAN_FILE).read_text(encoding="utf-8"))
    mine = shards_for_rank(plan, rank, world_size)
    total = sum(len(s.keys) for s in mine)
    label = f"rank {rank}" if world_size > 1 else "encode"
    with tqdm(total=total, unit="clip", desc=label, position=progress_position, dynamic_ncols=True,
              disable=not sys.stderr.isatty() and world_size > 1) as bar:
        summary = pipeline.run(out, plan, vae, settings, rank=rank, world_size=world_size, on_clip=bar.update)
    written = summary.shards_written
    print(f"[{label}] {summary.clips_written} clips in {written} shard(s) written, {summary.shards_skipped} shard(s) "
          f"already done, {len(summary.failures)} clip failure(s), {summary.seconds:.1f}s "
          f"({summary.clips_per_second:.2f} clips/s on {vae.device}, {str(vae.dtype).split('.')[-1]})")
    barrier()
    if not (is_main and finalize_at_end):
        return EXIT_OK
    if summary.shards_written == 0 and summary.shards_skipped == len(mine) and (out / "manifest.json").is_file():
        print(f"{out}: every shard was already done; nothing encoded")
    return report_finalize(out)


def report_finalize(out: Path) -> int:
    from latentcache.pipeline import finalize

    manifest = finalize(out)
    counts = manifest["counts"]
    failures = [line for line in (out / "failures.jsonl").read_text(encoding="utf-8").splitlines() if line]
    print(f"{out}: {counts['samples']} samples in {counts['shards']} shard(s), "
          f"{counts['failures']} failure(s); manifest at {out / 'manifest.json'}")
    if failures:
        import json

        reasons = Counter(json.loads(f)["error"] for f in failures)
        print("failures by kind: " + ", ".join(f"{k}: {n}" for k, n in reasons.most_common())
              + f" (details in {out / 'failures.jsonl'})")
        return EXIT_SOME_FAILED
    return EXIT_OK


def _cmd_encode(args: argparse.Namespace) -> int:
    return encode_job(args)


def _cmd_finalize(args: argparse.Namespace) -> int:
    return report_finalize(args.dir)


def _cmd_demo(args: argparse.Namespace) -> int:
    from latentcache.demo import run_demo

    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentcache", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("encode", help="decode videos, encode them with a VAE, write latent shards")
    add_encode_arguments(p)
    p.set_defaults(func=_cmd_encode)
    p = sub.add_parser("finalize", help="merge finished shards' sidecars into manifest.json")
    p.add_argument("dir", type=Path)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_finalize)
    p = sub.add_parser("demo", help="generate videos, encode them with a tiny random VAE, feed a tiny transformer")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return guarded(lambda: args.func(args))


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("PIL", "urllib3", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guarded(job: Callable[[], int]) -> int:
    """Turn known errors into a message and an exit code; let bugs show their traceback (exit 1)."""
    try:
        return job()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SOME_FAILED
    except LatentcacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
