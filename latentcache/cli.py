"""The `latentcache` command line.

It builds the settings once, owns printing, progress bars and exit codes; the encode job itself is job.py.
Exit codes: 0 all inputs done, 1 crash (a bug: traceback), 2 usage or configuration error,
3 finished but some inputs failed (see OUT/failures.jsonl), 4 finished but no sample was written.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from latentcache.encode.job import EXIT_CRASH, EXIT_NO_SAMPLES, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, report_finalize
from latentcache.encode.models.families import FAMILIES
from latentcache.encode.settings import (
    DECODE_CHECKS,
    ClipSettings,
    EncodeSettings,
    JobSettings,
    RuntimeSettings,
    TextSettings,
    TilingSettings,
    VAESettings,
)
from latentcache.errors import ConfigError, InputError, LatentcacheError

__all__ = ["EXIT_CRASH", "EXIT_NO_SAMPLES", "EXIT_OK", "EXIT_SOME_FAILED", "EXIT_USAGE", "build_parser", "guarded",
           "main", "report_finalize", "settings_from_args"]
log = logging.getLogger("latentcache")


DESCRIPTION = ("Encode a video dataset into VAE latents once, on every GPU, and stream them into a trainer that can "
               "trust them.")
ENCODE_DESCRIPTION = (
    "Decode each input video, cut clips at the given frames, fps and size, encode them with a diffusers video VAE "
    "and write webdataset shards of latents, a manifest and failures.jsonl into --out. Rerun the same command to "
    "resume after any interruption, or with more inputs to add them; --dry-run shows what a run would do first.")
EXIT_CODES = ("exit codes: 0 done; 2 a usage or settings error (nothing encoded); 3 done, but some inputs failed "
              "(see failures.jsonl), reported once: a rerun that adds no failure exits 0; 4 done, but no sample was "
              "written (the reason is printed); 1 a crash (a bug)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless it has none worth saying or the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)
        if "default" in text or quiet or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    """`latentcache encode`'s arguments, group by group in the order --help lists them."""
    p.add_argument("inputs", nargs="+", type=typed_input,
                   help="what to encode, any mix of: video files; folders (searched recursively); glob or brace "
                   "patterns; list files (.txt of paths, .csv/.jsonl/.parquet tables with path, caption and clip "
                   "start/end columns); webdataset .tar files of videos; s3:// (or gs://, az://) urls of any of these")
    p.add_argument("--out", required=True, type=path_or_url_out,
                   help="output directory (shards, manifest, failures), or an object-storage url (s3://bucket/prefix)")
    _add_vae_arguments(p)
    _add_clip_arguments(p)
    _add_caption_arguments(p)
    _add_output_arguments(p)


def _add_vae_arguments(p: argparse.ArgumentParser) -> None:
    """The VAE, and how fast it runs: device, processes, batch size, decode workers."""
    g = p.add_argument_group("VAE")
    g.add_argument("--vae", default=None, help="local dir, hub id, or tiny-random-<family> "
                   "(default: the family's hub id, e.g. THUDM/CogVideoX-2b)")
    g.add_argument("--family", default=None, help=f"VAE family: {', '.join(FAMILIES)} "
                   "(default: the one a tiny-random-<family> --vae names, else cogvideox)")
    g.add_argument("--subfolder", default=None, help="subfolder of a pipeline repo holding the VAE (default: vae)")
    g.add_argument("--revision", default=None,
                   help="hub commit (or branch/tag) of --vae to load; the commit it resolves to and the sha256 of the "
                   "weights are recorded either way, and a rerun with other weights is refused")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="auto: fp16 on GPU, fp32 on CPU")
    g.add_argument("--tiling", default=None, metavar="H,W,OVERLAP",
                   help="spatial tiling in pixels, e.g. 256,384,0.25 (validated against the VAE)")
    g.add_argument("--frame-chunk", type=int, default=None, help="frames per encoder step (temporal chunking)")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (the launcher's GPU, else the CPU)")
    g.add_argument("--processes", type=_positive, default=None, metavar="N",
                   help="encode processes on this machine (default: one per visible GPU, CUDA_VISIBLE_DEVICES "
                   "choosing them; 1 on a CPU), each on its own device with its share of the shards, as under "
                   "`accelerate launch` (docs/distributed.md); refused by jobs/encode.py, where the launcher decides")
    g.add_argument("--batch-size", type=_batch_size, default=None,
                   help="clips per VAE call, or 'auto' (default): from the clip size and the GPU's memory (on a CPU, "
                   "its RAM), the same on every run on the same machine")
    g.add_argument("--workers", type=int, default=None,
                   help="decode worker processes (default: from the CPU count; 0 decodes in the main process)")
    g.add_argument("--cpu-threads", type=_positive, default=None, metavar="N",
                   help="torch threads of the encode on a CPU (default: all cores; under jobs/encode.py an equal share "
                   "per process). The latents' last bits depend on it: runs meant to write the same bytes use the "
                   "same N")
    g.add_argument("--compile", action="store_true", help="torch.compile the VAE encoder (GPU; slow first batch)")
    g.add_argument("--nvdec", action="store_true",
                   help="decode on the GPU's NVDEC (h264_cuvid, hevc_cuvid, ...) where available, else on the CPU")
    g.add_argument("--decode-check", choices=DECODE_CHECKS, default="auto",
                   help="auto (default): decode HEVC and VP9 clips a second time with another decoder, to drop clips "
                   "with damage those decoders conceal (about twice their decode CPU); off: skip that decode, for "
                   "corpora you trust (transcoded by you). Does not change what an intact clip decodes to")


def _add_clip_arguments(p: argparse.ArgumentParser) -> None:
    """What a clip is (frames, fps, size, strategy, buckets), and how clips are grouped into shards and chunks."""
    c = p.add_argument_group("clips")
    defaults = ClipSettings()
    # Geometry left out follows the family (settings_from_args); SUPPRESS keeps "(default: None)" out of the help.
    c.add_argument("--frames", type=int, default=argparse.SUPPRESS,
                   help="frames per clip; the VAE's frame rule applies (4k+1 for CogVideoX, Wan and HunyuanVideo, "
                   "8k+1 for LTX-Video, 6k+1 for Mochi: docs/families.md) (default: the family pipeline's, "
                   f"CogVideoX {defaults.frames})")
    c.add_argument("--fps", type=float, default=defaults.fps, help="frame rate clips are sampled at")
    c.add_argument("--height", type=int, default=argparse.SUPPRESS, help="clip height in pixels (crop or fit to "
                   f"it) (default: the family pipeline's, CogVideoX {defaults.height})")
    c.add_argument("--width", type=int, default=argparse.SUPPRESS,
                   help=f"clip width in pixels (default: the family pipeline's, CogVideoX {defaults.width})")
    c.add_argument("--clips", default=defaults.strategy,
                   help="first | uniform:K | random:K (seeded by --seed) | sliding:SECONDS | all")
    c.add_argument("--seed", type=int, default=defaults.seed, help="seed of random:K clip starts")
    c.add_argument("--resize", default=defaults.resize, choices=["crop", "fit"],
                   help="crop: scale to cover the clip size and cut the middle; fit: scale to fit inside and pad")
    c.add_argument("--short", default=defaults.short, choices=["skip", "pad"],
                   help="videos shorter than one clip (after --frame-buckets): skip (reported) or pad by repeating "
                   "the last frame (recorded in the clip's padded_frames)")
    c.add_argument("--buckets", default="", metavar="HxW,...",
                   help="aspect buckets, e.g. 480x720,720x480,480x480: each video takes the nearest aspect "
                   "(replaces --height/--width); shards hold one bucket each")
    c.add_argument("--frame-buckets", default="", metavar="N,...",
                   help="shorter frame counts for videos too short for --frames, e.g. 33,17 (largest that fits)")
    c.add_argument("--images", action="store_true",
                   help="take still images (jpg, png, webp) too, as 1-frame samples in their own 1xHxW bucket")
    p.add_argument("--samples-per-shard", type=int, default=EncodeSettings().samples_per_shard,
                   help="clips per shard tar (each shard holds one bucket)")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="inputs per planning chunk: each rank probes only its chunks, and each chunk's clips make its "
                   "own shards (default: from the input count and the process count, at most 1000: "
                   "docs/distributed.md; fixed once planned, new inputs use the value given when they are added). "
                   "Batches and shards never cross a chunk: fresh runs with other process counts write the same "
                   "bytes with the same N")


def _add_caption_arguments(p: argparse.ArgumentParser) -> None:
    """Prompt embeddings cached beside the latents."""
    t = p.add_argument_group("captions")
    t.add_argument("--text-encoder", default=None, metavar="DIR_OR_HUB_ID",
                   help="cache prompt embeddings of each caption with this pipeline's text encoder (e.g. the "
                   "--vae pipeline); needs `pip install 'latentcache[text]'`")
    t.add_argument("--text-max-length", type=int, default=None,
                   help="tokens per prompt (default: the family's pipeline: CogVideoX 226, Wan 512, LTX 128)")


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    """What is stored, and what a run does with an existing --out (overwrite, re-encode changed inputs, repair,
    dry run)."""
    p.add_argument("--store", default="posterior", choices=["posterior", "mean"],
                   help="posterior: mean + logvar (re-sampled each epoch); mean: half the bytes")
    p.add_argument("--store-dtype", default="encode", choices=["encode", "fp16", "bf16", "fp32"],
                   help="dtype of the stored latents (default: the encode dtype)")
    p.add_argument("--image-latents", action="store_true",
                   help="also store each clip's first frame encoded as the image-to-video pipeline conditions on it "
                   "(CogVideoX, Wan); the dataset yields it as image_latents")
    p.add_argument("--strict", action="store_true", help="stop at the first failed input")
    p.add_argument("--overwrite", action="store_true", help="start OUT again even if it was made with other settings")
    p.add_argument("--reencode-changed", action="store_true",
                   help="inputs changed since they were encoded (another file under the same name) are refused; "
                   "this plans and encodes again just the chunks that hold them, every other shard stays as it is")
    p.add_argument("--repair", action="store_true",
                   help="with the same arguments as the run: read every finished shard, and write again (to the same "
                   "bytes) those that no longer match the sha256 their sidecar recorded, e.g. after `latentcache "
                   "verify` reported one changed; an ordinary rerun only checks that each shard is there whole")
    p.add_argument("--dry-run", action="store_true",
                   help="plan as a real run would (probing every input), print clips per bucket, skips and failures "
                   "by reason and the estimated output size, and write nothing into --out")
    p.add_argument("--estimate", type=int, default=0, metavar="N",
                   help="with --dry-run: also decode and encode N clips here and extrapolate the whole run's "
                   "device-hours on this device")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step (debug level)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _batch_size(text: str) -> int | None:
    """'auto' is None in the settings: resolved from the clip size and the device once the VAE is loaded."""
    if text == "auto":
        return None
    try:
        return _positive(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 'auto')") from None


def settings_from_args(args: argparse.Namespace) -> JobSettings:
    """The job's settings from `latentcache encode` (or jobs/encode.py) arguments, checked: built once, here."""
    from latentcache.encode.models.families import family_of
    from latentcache.encode.models.vae_source import check_source_name, family_for_source

    if args.vae:
        check_source_name(args.vae)
    family = family_of(family_for_source(args.vae, args.family, subfolder=args.subfolder or "vae",
                                         revision=args.revision))
    _apply_musubi_toml(args, family.name)
    tiling = None
    if args.tiling:
        try:
            h, w, overlap = args.tiling.split(",")
            tiling = TilingSettings(tile_height=int(h), tile_width=int(w), overlap=float(overlap))
        except ValueError:
            raise ConfigError(f"--tiling {args.tiling!r}: expected H,W,OVERLAP such as 256,384,0.25") from None
    vae_source = args.vae or family.default_source
    # A pipeline repo keeps its VAE in a subfolder; load_vae falls back to the root for a VAE-only repo or dir.
    subfolder = args.subfolder if args.subfolder is not None else family.default_subfolder
    # Geometry not given follows the family (its pipeline's own defaults, docs/families.md).
    frames, height, width = (given if given is not None else default for given, default in
                             zip((getattr(args, n, None) for n in ("frames", "height", "width")),
                                 family.default_clip, strict=True))
    # The values are checked by the settings records themselves (encode/settings.py), as a hand-built one is.
    encode = EncodeSettings(
        clip=ClipSettings(frames=frames, fps=args.fps, height=height, width=width,
                          strategy=args.clips, seed=args.seed, resize=args.resize, short=args.short,
                          buckets=_bucket_list(args.buckets), frame_buckets=_frame_bucket_list(args.frame_buckets),
                          images=args.images),
        vae=VAESettings(source=vae_source, family=family.name, subfolder=subfolder, revision=args.revision,
                        dtype=args.dtype, tiling=tiling, frame_chunk=args.frame_chunk),
        samples_per_shard=args.samples_per_shard,
        text=TextSettings(source=args.text_encoder, max_length=args.text_max_length) if args.text_encoder else None,
        store=args.store,
        store_dtype=args.store_dtype,
        image_latents=getattr(args, "image_latents", False),
    )
    runtime = RuntimeSettings(device=args.device, batch_size=args.batch_size, workers=args.workers,
                              cpu_threads=args.cpu_threads, compile=args.compile, nvdec=args.nvdec, strict=args.strict,
                              decode_check=args.decode_check)
    return JobSettings(inputs=tuple(args.inputs), out=args.out, encode=encode, runtime=runtime,
                       overwrite=args.overwrite, chunk_size=args.chunk_size,
                       reencode_changed=getattr(args, "reencode_changed", False),
                       repair=getattr(args, "repair", False),
                       dry_run=getattr(args, "dry_run", False), estimate=getattr(args, "estimate", 0))


def _apply_musubi_toml(args: argparse.Namespace, family: str) -> None:
    """A musubi-tuner dataset TOML given as the input: its folders become the inputs and its clip settings these
    arguments (encode/inputs/musubi_config.py says what maps and what is refused); each mapping is logged."""
    from latentcache.encode.inputs.musubi_config import read_musubi_toml

    if not any(str(i).lower().endswith(".toml") for i in args.inputs):
        return
    if len(args.inputs) != 1:
        raise ConfigError("a musubi-tuner dataset TOML is the only input of an encode: its video_directory entries "
                          "are the inputs")
    argv = getattr(args, "argv", None) or []
    fps_given = any(a == "--fps" or a.startswith("--fps=") for a in argv)
    m = read_musubi_toml(Path(args.inputs[0]), family, args.fps if fps_given else None)
    log.info("%s: inputs %s; --frames %d --fps %g --width %d --height %d --clips %s%s", args.inputs[0],
             ", ".join(m.inputs), m.frames, m.fps, m.width, m.height, m.clips,
             f" --buckets {','.join(m.buckets)}" if m.buckets else "")
    for note in m.notes:
        log.info("%s", note)
    args.inputs = list(m.inputs)
    args.frames, args.fps, args.width, args.height, args.clips = m.frames, m.fps, m.width, m.height, m.clips
    args.buckets = ",".join(m.buckets)


def _bucket_list(text: str) -> tuple[str, ...]:
    return tuple(b.strip().lower() for b in text.split(",") if b.strip())


def _frame_bucket_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(f) for f in text.split(",") if f.strip()}, reverse=True))
    except ValueError:
        raise ConfigError(f"--frame-buckets {text!r}: expected frame counts separated by commas, e.g. 33,17") from None


def _cmd_encode(args: argparse.Namespace) -> int:
    from latentcache.encode import job, launch

    settings = settings_from_args(args)
    if launch.is_child():  # one of the processes a plain `latentcache encode` started below
        world = launch.child_world(settings.runtime.device, settings.runtime.cpu_threads)
        try:
            return job.run(settings, world)
        finally:
            launch.close()
    multi = args.device in ("auto", "cuda") and args.processes is None
    processes = 1 if settings.dry_run else launch.process_count(
        args.processes, args.device, launch.visible_accelerators() if multi else 0)
    if processes == 1:
        return job.run(settings)
    job.check_before_loading(settings)  # refused once here, not once per process
    print(f"launching {processes} encode processes on this machine (--processes to choose)")
    return launch.launch(args.argv, processes)


def _cmd_finalize(args: argparse.Namespace) -> int:
    return report_finalize(args.dir)


def _cmd_demo(args: argparse.Namespace) -> int:
    from latentcache.tools.demo import run_demo

    return run_demo(args.out)


def _cmd_verify(args: argparse.Namespace) -> int:
    from latentcache.tools.verify import verify

    report = verify(args.dir, trainer_config=args.trainer_config, check_sha256=not args.no_sha256)
    for line in report.lines():
        print(line)
    # The check ran to the end but the data is not right: like inputs that failed (3), not a usage error (2).
    return EXIT_OK if report.ok else EXIT_SOME_FAILED


def _cmd_info(args: argparse.Namespace) -> int:
    from latentcache.tools.verify import info_lines

    for line in info_lines(args.dir):
        print(line)
    return EXIT_OK


def _cmd_preview(args: argparse.Namespace) -> int:
    from latentcache.tools.preview import preview

    result = preview(args.dir, args.out, keys=args.key, random_count=args.random, seed=args.seed,
                     device=args.device)
    for key, with_source, (source, start) in zip(result.keys, result.with_source, result.sources, strict=True):
        print(f"{source} from {start:.2f}s ({key}): "
              f"{'source | reconstruction' if with_source else 'reconstruction only (source not found)'}")
    print(f"wrote {result.out}: {result.frames} frames, {result.size[0]}x{result.size[1]}")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latentcache.tools.export import run_export

    with tqdm(unit="sample", desc=f"export {args.trainer}", disable=None) as bar:
        def progress(n: int, total: int) -> None:
            bar.total = total
            bar.update(n)

        result = run_export(args.trainer, args.dir, args.to, dry_run=args.dry_run, progress=progress,
                            arch=args.arch, dtype=args.dtype, seed=args.seed)
    if result.dry_run:
        for name in result.written:
            print(f"would write {result.target / name}")
        for name in result.removed:
            print(f"would remove {result.target / name} (an earlier export's, not written again)")
    print(f"{'would write' if result.dry_run else 'wrote'} {len(result.written)} file(s) to {result.target}"
          f"{f', {len(result.unchanged)} already there unchanged' if result.unchanged else ''}")
    if result.removed:
        print(f"{'would remove' if result.dry_run else 'removed'} {len(result.removed)} file(s) an earlier export "
              f"wrote there and this one does not hold, e.g. {result.removed[0]}")
    if result.kept:
        print(f"kept {len(result.kept)} file(s) already there that latentcache did not write, e.g. {result.kept[0]}")
    for note in result.notes:
        print(f"next: {note}")
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    from latentcache.format.manifest import Manifest
    from latentcache.train.trainer_config import config_problems, load_trainer_config

    config = load_trainer_config(*args.config)
    problems = config_problems(config, Manifest.read(args.data))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"{config.path}: fits {args.data}" if not problems else
          f"{config.path}: {len(problems)} problem(s) with {args.data}")
    return EXIT_USAGE if problems else EXIT_OK


def typed_input(text: str) -> str:
    """A path the user typed, a file url read as the local path it names (file:///x is /x; storage/trust.py)."""
    from latentcache.storage.trust import typed

    try:
        return typed(text)
    except LatentcacheError as e:
        raise argparse.ArgumentTypeError(str(e)) from None  # argparse names the argument, and exits 2


def local_arg(text: str) -> Path:
    """A local file or folder argument; a file url names its path."""
    return Path(typed_input(text))


def path_or_url(text: str) -> Path | str:
    """A local path, or an object-storage url (s3://bucket/prefix) kept as text: Path() would fold its '//'."""
    from latentcache.storage.location import argument

    return argument(typed_input(text))


def path_or_url_out(text: str) -> Any:
    """--out: a local Path, or a location.ObjectPath that the pipeline writes through with single PUTs."""
    from latentcache.storage.location import output_location

    try:
        return output_location(text)
    except LatentcacheError as e:
        # argparse shows this text ("argument --out: ..."), where a ValueError gives only "invalid value".
        raise argparse.ArgumentTypeError(str(e).removeprefix("--out ")) from None


def add_trainer_commands(sub: argparse._SubParsersAction) -> None:
    """verify, info, preview, check-config: the trainer side of a dataset."""
    p = sub.add_parser("verify", formatter_class=HelpFormatter,
                       help="read every shard: checksums, counts, shapes, finiteness, latent statistics")
    p.add_argument("dir", type=path_or_url, help="a latentcache output directory or s3:// url")
    p.add_argument("--trainer-config", type=local_arg, nargs="+", default=None,
                   help="also check a SAT-style training YAML (several are merged in order, like SAT's --base)")
    p.add_argument("--no-sha256", action="store_true", help="skip checksum comparison (counts are still checked)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step (debug level)")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("info", formatter_class=HelpFormatter,
                       help="a short table of a dataset, from its manifest")
    p.add_argument("dir", type=path_or_url, help="a latentcache output directory or s3:// url")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step (debug level)")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("preview", formatter_class=HelpFormatter,
                       help="decode latents back to video with the manifest's VAE (mp4, beside sources)")
    p.add_argument("dir", type=local_arg, help="a latentcache output directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--key", action="append", default=None, help="sample key (repeatable)")
    which.add_argument("--random", type=int, default=1, metavar="N", help="N random samples (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --random choice")
    p.add_argument("--out", type=local_arg, default=Path("preview.mp4"), help="the mp4 to write")
    p.add_argument("--device", default="cpu", help="where the VAE decodes")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step (debug level)")
    p.set_defaults(func=_cmd_preview)
    p = sub.add_parser("check-config", formatter_class=HelpFormatter,
                       help="does a CogVideo SAT-style training YAML fit these latents?")
    p.add_argument("config", type=local_arg, nargs="+", help="YAML file(s), merged in order like SAT's --base a b")
    p.add_argument("--data", type=local_arg, required=True, help="latentcache output directory")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step (debug level)")
    p.set_defaults(func=_cmd_check_config)
    p = sub.add_parser("export", formatter_class=HelpFormatter,
                       help="write another trainer's cache files from a latentcache output",
                       description="latentcache export TRAINER OUT --to DIR: TRAINER is musubi, ltx2 or fastvideo "
                       "(docs/trainer.md); an unknown one is answered with the list of those supported")
    p.add_argument("trainer", help="the trainer whose cache files to write: musubi, ltx2 or fastvideo")
    p.add_argument("dir", type=path_or_url, help="latentcache output directory")
    p.add_argument("--to", type=local_arg, required=True, help="the folder to write the trainer's files into")
    p.add_argument("--arch", default=None,
                   help="musubi: wan, hv, hv15 or k5 (default: from the output's VAE family; k5 is Kandinsky 5, "
                   "which uses the HunyuanVideo VAE)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="musubi: latent dtype (default: musubi's own caching default for the architecture)")
    p.add_argument("--seed", type=int, default=None,
                   help="musubi hv, k5: seed of the posterior sample their caches hold (default 0)")
    p.add_argument("--dry-run", action="store_true", help="list what would be written and removed; write nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step (debug level)")
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentcache", description=DESCRIPTION, epilog=EXIT_CODES,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("encode", help="decode videos, encode them with a VAE, write latent shards",
                       description=ENCODE_DESCRIPTION, epilog=EXIT_CODES, formatter_class=HelpFormatter)
    add_encode_arguments(p)
    p.set_defaults(func=_cmd_encode)
    p = sub.add_parser("finalize", formatter_class=HelpFormatter,
                       help="merge finished shards' sidecars into manifest.json")
    p.add_argument("dir", type=path_or_url_out, help="the output directory (or s3:// url) of an encode")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step (debug level)")
    p.set_defaults(func=_cmd_finalize)
    p = sub.add_parser("demo", formatter_class=HelpFormatter,
                       help="generate videos, encode them with a tiny random VAE, feed a tiny transformer")
    p.add_argument("--out", type=local_arg, default=Path("demo_out"),
                   help="a new or empty folder; the demo writes videos/ and latents/ there")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step (debug level)")
    p.set_defaults(func=_cmd_demo)
    add_trainer_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what `encode` passes on to the processes it launches
    configure_logging(args.verbose)
    return guarded(lambda: args.func(args))


def exit_with(code: int) -> NoReturn:
    """End the process with `code`, skipping the interpreter's last garbage collection.

    With torch and diffusers imported, that collection walks ~1M objects at exit and takes about 1.2 s, longer than
    encoding a small folder. Freezing moves every live object out of the collector's reach; atexit handlers, stream
    flushes and the module teardown still run. Only for a process's entry point: a caller that goes on (a test
    calling `main`) must not freeze its heap.
    """
    gc.freeze()
    sys.exit(code)


def entry() -> NoReturn:
    """The `latentcache` command."""
    exit_with(main())


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
    entry()
