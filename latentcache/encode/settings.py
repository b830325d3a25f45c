"""One tree of settings, built once by the CLI (or a test) and passed down; nothing reads settings elsewhere.

`fingerprint()` hashes the fields that change what is written, so a rerun with other settings is refused instead
of mixing two kinds of latents in one directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from latentcache.errors import ConfigError

# The string choices of the settings, as the command line offers them.
ResizeMode = Literal["crop", "fit"]
ShortPolicy = Literal["skip", "pad"]
DtypeName = Literal["auto", "fp16", "bf16", "fp32"]
StoreMode = Literal["posterior", "mean"]
StoreDtype = Literal["encode", "fp16", "bf16", "fp32"]


@dataclass(kw_only=True, slots=True, frozen=True)
class ClipSettings:
    frames: int = 49
    fps: float = 8.0
    height: int = 480
    width: int = 720
    # "first", "uniform:K", "sliding:STRIDE_S" or "all" (non-overlapping clips).
    strategy: str = "first"
    # "crop": scale to fill then center-crop; "fit": scale to fit then pad with black.
    resize: ResizeMode = "crop"
    # What to do with a video shorter than one clip: "skip" (reported) or "pad" (repeat the last frame).
    short: ShortPolicy = "skip"
    seed: int = 0
    # Aspect buckets "HxW" (e.g. "480x720"): each video takes the one nearest its displayed aspect; empty: always
    # height x width.
    buckets: tuple[str, ...] = ()
    # Shorter frame counts a video too short for `frames` falls back to (the largest that fits), e.g. (33, 17).
    frame_buckets: tuple[int, ...] = ()
    # Still images (jpg, png, webp) as 1-frame samples in their own `1xHxW` bucket (--images); off: refused as not
    # videos, and image files in input folders are not even probed.
    images: bool = False

    def __post_init__(self) -> None:
        # Refused when made, by the CLI or by hand (a test, the demo, a script): what cannot work whatever the VAE.
        # What the VAE cannot encode exactly is chunk_plan.check_fits_vae's, once its spec is known.
        if self.frames < 1:
            raise ConfigError(f"--frames must be at least 1, got {self.frames}")
        if self.fps <= 0:
            raise ConfigError(f"--fps must be positive, got {self.fps}")
        parse_strategy(self.strategy)
        aspect_sizes(self)
        for f in self.frame_buckets:
            if not 1 <= f <= self.frames:
                raise ConfigError(f"--frame-buckets {f} is not between 1 and --frames {self.frames}: frame buckets are "
                                  "the shorter clips a video too short for --frames falls back to")

    @property
    def bucket(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(kw_only=True, slots=True, frozen=True)
class TilingSettings:
    """Spatial tiling of the VAE encoder, in pixels. Validated against the VAE before any clip is encoded."""

    tile_height: int
    tile_width: int
    overlap: float


@dataclass(kw_only=True, slots=True, frozen=True)
class VAESettings:
    # A built-in name (tiny-random-cogvideox), a local directory or a hub id such as THUDM/CogVideoX-2b.
    source: str = "THUDM/CogVideoX-2b"
    family: str = "cogvideox"
    subfolder: str | None = "vae"
    revision: str | None = None
    # "auto": fp16 on a GPU, fp32 on CPU.
    dtype: DtypeName = "auto"
    tiling: TilingSettings | None = None
    # Frames fed to the encoder per step (CogVideoX: a multiple of 8; None keeps the VAE's own default).
    frame_chunk: int | None = None


@dataclass(kw_only=True, slots=True, frozen=True)
class TextSettings:
    """The text encoder whose prompt embeddings are cached next to the latents (`--text-encoder`)."""

    # A local directory or hub id: a whole pipeline (text_encoder/ and tokenizer/ subfolders) or the encoder alone.
    source: str
    revision: str | None = None
    # Tokens per prompt; None uses the family's pipeline default (CogVideoX 226, Wan 512, LTX-Video 128).
    max_length: int | None = None
    # "auto": bf16 on a GPU (T5 overflows in fp16), fp32 on CPU.
    dtype: DtypeName = "auto"


@dataclass(kw_only=True, slots=True, frozen=True)
class EncodeSettings:
    clip: ClipSettings = field(default_factory=ClipSettings)
    vae: VAESettings = field(default_factory=VAESettings)
    samples_per_shard: int = 64
    # Prompt embeddings cached per sample; None writes captions only.
    text: TextSettings | None = None
    # "posterior" keeps mean and log-variance (a trainer can re-sample each epoch); "mean" halves the bytes.
    store: StoreMode = "posterior"
    # dtype of the stored tensors: "encode" keeps the VAE's dtype, or fp16/bf16/fp32.
    store_dtype: StoreDtype = "encode"
    # Also store each clip's first frame encoded as the family's image-to-video pipeline conditions on it
    # (`image_mean`, and `image_logvar` for CogVideoX) (--image-latents).
    image_latents: bool = False

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ConfigError(f"--samples-per-shard must be at least 1, got {self.samples_per_shard}")
        if self.image_latents:
            # Refused before any work for a family whose I2V conditioning is not cached (format/ imports torch: here
            # only when asked, so `latentcache --help` stays light).
            from latentcache.format.spec import image_condition_of

            image_condition_of(self.vae.family)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def output_affecting(self) -> dict[str, Any]:
        """Everything here changes what is written (runtime knobs are RuntimeSettings, outside the fingerprint); the
        dict is what plan.json and the manifest record, and `fingerprint` hashes it."""
        d = self.to_dict()
        if not d["clip"]["images"]:
            # Absent means off: caches made before --images existed keep their fingerprint and can be resumed.
            del d["clip"]["images"]
        if not d["image_latents"]:
            del d["image_latents"]  # likewise: caches made before --image-latents keep their fingerprint
        # The revision asked for only says where to look; the VAE identity records the commit it resolved to and the
        # weights' sha256, which is what the latents depend on. So `--revision COMMIT` can finish a run started
        # without one, on the same commit.
        d["vae"].pop("revision")
        return d

    def fingerprint(self) -> str:
        return hash_json(self.output_affecting())


# --decode-check: "auto" decodes HEVC and VP9 clips a second time to catch damage their decoders conceal
# (second_opinion.SECOND_OPINION); "off" trusts the corpus and skips that decode.
DECODE_CHECKS = ("auto", "off")


@dataclass(kw_only=True, slots=True, frozen=True)
class RuntimeSettings:
    """How fast the work goes, never what is written: outside the fingerprint, free to change between runs."""

    device: str = "auto"
    # Clips per VAE call; None: auto (`VideoVAE.auto_batch_size`, from the clip size and the device's memory),
    # resolved by `execute.run` once the VAE is loaded.
    batch_size: int | None = 1
    workers: int | None = None  # decode worker processes; None: from the CPU count
    # torch threads of the encode on CPU; None: all cores for one process, an equal share each under jobs/encode.py.
    # The latents' last bits depend on it (and on the batch size): both are in each shard's software record.
    cpu_threads: int | None = None
    compile: bool = False  # torch.compile the VAE encoder
    nvdec: bool = False  # decode h264/hevc/... on the GPU's NVDEC where available, else on the CPU
    strict: bool = False  # stop at the first input that fails
    # A runtime setting, outside the fingerprint: on an intact clip both modes give the same frames, so the bytes
    # written never depend on it; it only decides whether concealed damage is looked for (a damaged clip that "off"
    # keeps, "auto" drops). A resume may change it without starting OUT again.
    decode_check: str = "auto"

    def __post_init__(self) -> None:
        counts = {"--workers": (self.workers, 0), "--batch-size": (self.batch_size, 1),
                  "--cpu-threads": (self.cpu_threads, 1)}
        for flag, (value, least) in counts.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ConfigError(f"{flag} must be at least {least}, got {value!r}")
        if self.decode_check not in DECODE_CHECKS:
            raise ConfigError(f"--decode-check must be one of {', '.join(DECODE_CHECKS)}, got {self.decode_check!r}")


@dataclass(kw_only=True, slots=True, frozen=True)
class JobSettings:
    """Everything one encode job needs (`latentcache encode`, jobs/encode.py, the demo): the root of the tree."""

    inputs: tuple[str, ...]  # video files, directories, or .txt/.csv/.jsonl/.parquet lists
    out: Path
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    # Start OUT again even if it was made with other settings.
    overwrite: bool = False
    # Plan and encode again the chunks holding inputs changed since they were encoded (else such a rerun is refused);
    # like `overwrite`, it says what to do with OUT, never what a sample is: outside every fingerprint.
    reencode_changed: bool = False
    # --repair: hash every done shard of this process's share and write again those that no longer match their
    # sidecar's sha256 (same bytes as before the damage); an ordinary rerun only stats them. Outside every fingerprint.
    repair: bool = False
    # Inputs per planning chunk; None: from the number of new inputs (`job_plan.auto_chunk_size`).
    chunk_size: int | None = None
    # --dry-run: plan and describe the run, write nothing into OUT; --estimate N: also time N clips here.
    dry_run: bool = False
    estimate: int = 0

    def __post_init__(self) -> None:
        if self.estimate and not self.dry_run:
            raise ConfigError("--estimate goes with --dry-run (it times a few clips instead of encoding the run)")
        if self.estimate < 0:
            raise ConfigError(f"--estimate must be 0 or more clips, got {self.estimate}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"--chunk-size must be at least 1, got {self.chunk_size}")


STRATEGIES = "first, uniform:K, sliding:SECONDS, all, random:K"


def parse_strategy(strategy: str) -> tuple[str, float]:
    """'uniform:4' -> ('uniform', 4); raises ConfigError naming the valid forms."""
    kind, sep, arg = strategy.partition(":")
    try:
        if kind in ("first", "all") and not sep:
            return kind, 0.0
        if kind in ("uniform", "random") and int(arg) >= 1 and float(arg) == int(arg):
            return kind, float(int(arg))
        if kind == "sliding" and float(arg) > 0:
            return kind, float(arg)
    except ValueError:
        pass
    raise ConfigError(f"--clips {strategy!r} is not one of {STRATEGIES} (K a whole number >= 1, SECONDS > 0), "
                      "e.g. uniform:4 or sliding:2.5")


def aspect_sizes(clip: ClipSettings) -> list[tuple[int, int]]:
    """(height, width) of every --buckets entry, or of --height/--width without buckets."""
    sizes = []
    for b in clip.buckets:
        try:
            h, w = (int(x) for x in b.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--buckets {b!r}: expected HEIGHTxWIDTH such as 480x720") from None
        if h < 1 or w < 1:
            raise ConfigError(f"--buckets {b!r}: height and width must be positive")
        sizes.append((h, w))
    return sizes or [(clip.height, clip.width)]



def hash_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
