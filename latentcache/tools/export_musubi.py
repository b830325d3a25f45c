"""`latentcache export musubi OUT --to CACHE_DIR`: musubi-tuner's own cache files from a latentcache output.

The format is musubi-tuner's, read at commit 30c658c4f4b0bf05038b3346eff9670259b10fc7 (kohya-ss/musubi-tuner):
- names (dataset/image_video_dataset.py, VideoDataset.retrieve_latent_cache_batches / get_latent_cache_path, and
  prepare_for_training, which globs `*_{arch}.safetensors` and parses the names back from the end):
  `{item}_{start:05d}-{frames:03d}_{W:04d}x{H:04d}_{arch}.safetensors` for the latents and
  `{item}_{arch}_te.safetensors` for the text-encoder outputs; `arch` from dataset/architectures.py.
- keys and metadata (dataset/cache_io.py save_latent_cache_common and each architecture's save_latent_cache_*):
  `latents_{F}x{H}x{W}_{dtype}` holding `[C, F, H, W]`; metadata `architecture`, `width`, `height`,
  `format_version` 1.0.1, `frame_count`.
- values, per architecture (ARCHITECTURES below), from each caching script's encode_and_save_batch.
latentcache stores the raw posterior (`mean`, `logvar`, docs/format.md), so the export applies exactly those steps.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from latentcache.errors import ConfigError, LatentMismatchError
from latentcache.tools.export_common import (
    ExportResult,
    ExportSample,
    ExportTarget,
    Progress,
    Source,
    meta_number,
    open_source,
    refused,
    safetensors_bytes,
)

FORMAT_VERSION = "1.0.1"
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class MusubiArch:
    """One musubi-tuner architecture whose latent cache latentcache writes."""

    short: str  # file-name suffix (dataset/architectures.py ARCHITECTURE_*)
    full: str  # the `architecture` metadata (ARCHITECTURE_*_FULL)
    family: str  # the latentcache VAE family whose latents it caches
    dtype: torch.dtype  # what its caching script leaves the latents in by default (--vae_dtype unset)
    value: str  # "normalised mean", "sample", "mean" or "scaled sample": see musubi_latent
    cache_script: str
    text_script: str
    wan_t5: bool = False  # latentcache's cached UMT5 prompt embeddings are its text cache (Wan only)


ARCHITECTURES = {
    # wan_cache_latents.py + wan/modules/vae.py WanVAE_.encode: (mu - latents_mean) / latents_std, bf16. Wan 2.2 A14B
    # trains on the same cache (docs/wan.md: "VAE is also same as Wan2.1").
    "wan": MusubiArch("wan", "wan", "wan", torch.bfloat16, "normalised mean", "wan_cache_latents.py",
                      "wan_cache_text_encoder_outputs.py", wan_t5=True),
    # cache_latents.py encode_and_save_batch: latent_dist.sample(), unscaled (the trainer scales), fp16.
    "hv": MusubiArch("hv", "hunyuan_video", "hunyuanvideo", torch.float16, "sample", "cache_latents.py",
                     "cache_text_encoder_outputs.py"),
    # hv_1_5_cache_latents.py encode_and_save_batch: vae.encode(content)[0].mode(), unscaled ("saved in VAE latent
    # space directly"), in the VAE dtype, fp16 unless --vae_dtype.
    "hv15": MusubiArch("hv15", "hunyuan_video_1_5", "hunyuanvideo15", torch.float16, "mean",
                       "hv_1_5_cache_latents.py", "hv_1_5_cache_text_encoder_outputs.py"),
    # kandinsky5_cache_latents.py encode_and_save_batch: the HunyuanVideo VAE (kandinsky5/models/vae.py build_vae,
    # fp16), latent_dist.sample() * scaling_factor, plus `latents_image_2xHxW`: its first and last latent frames.
    "k5": MusubiArch("k5", "kandinsky5", "hunyuanvideo", torch.float16, "scaled sample",
                     "kandinsky5_cache_latents.py", "kandinsky5_cache_text_encoder_outputs.py"),
}
# The architecture an output of each family exports to when --arch is not given.
DEFAULT_ARCH = {"wan": "wan", "hunyuanvideo": "hv", "hunyuanvideo15": "hv15"}
# musubi architectures whose cache latentcache cannot write, and why (shown to a user who asks for one).
NOT_EXPORTED = {
    "fp": "FramePack's cache (fpack_cache_latents.py) holds, besides HunyuanVideo latents cut into its sections, the "
          "SigLIP image-encoder embedding of each clip's first frame (`image_embeddings`), which latentcache does "
          "not compute",
}
# musubi's WanVAE (wan/modules/vae.py) normalises with these constants whatever the checkpoint: the Wan 2.1 VAE's
# latents_mean/latents_std. It has no Wan 2.2 (48-channel) VAE.
MUSUBI_WAN_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
MUSUBI_WAN_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# Bounds on a sample's JSON fields that go into a name: a stranger's 1e300 must not become a 300-digit name.
MAX_PIXELS_SIDE = 1 << 16
MAX_SECONDS = 1e7
MAX_FPS = 1000.0


def _dtype_str(dtype: torch.dtype) -> str:
    """musubi's dtype_to_str (utils/model_utils.py): the torch name, `bfloat16`, `float16`, `float32`."""
    return str(dtype).split(".")[-1]


def supported() -> str:
    return ", ".join(f"{a.short} ({a.full}, from a {a.family} output)" for a in ARCHITECTURES.values())


def choose_arch(family: str, arch: str | None, source: str) -> MusubiArch:
    """The musubi architecture to write: --arch, else the family's default; refused with the list and the reason."""
    if arch is not None and arch in NOT_EXPORTED:
        raise ConfigError(f"--arch {arch}: not exported: {NOT_EXPORTED[arch]}. Supported: {supported()}")
    if arch is not None and arch not in ARCHITECTURES:
        raise ConfigError(f"--arch {arch}: not a musubi-tuner architecture latentcache exports. Supported: "
                          f"{supported()}")
    name = arch or DEFAULT_ARCH.get(family)
    if name is None:
        raise ConfigError(f"{source}: family {family} has no musubi-tuner latent cache that latentcache can write. "
                          f"Supported: {supported()}")
    chosen = ARCHITECTURES[name]
    if chosen.family != family:
        raise ConfigError(f"{source}: a {family} output; musubi-tuner's {chosen.full} cache holds {chosen.family} VAE "
                          f"latents. Supported: {supported()}")
    return chosen


def check_wan_spec(spec: Source, source: str) -> None:
    """musubi's `wan` cache means the Wan 2.1 VAE's latents; anything else would be normalised differently there."""
    s = spec.spec
    if s.channels != 16:
        raise ConfigError(f"{source}: a {s.channels}-channel wan VAE (Wan 2.2 TI2V's is 48); musubi-tuner's Wan "
                          "VAE and cache are the 16-channel Wan 2.1 VAE's (also used by Wan 2.2 A14B)")
    for name, musubi_value in (("latents_mean", MUSUBI_WAN_MEAN), ("latents_std", MUSUBI_WAN_STD)):
        value = getattr(s, name)
        if value is None or len(value) != 16 or any(abs(a - b) > 1e-4 for a, b in zip(value, musubi_value,
                                                                                         strict=True)):
            raise ConfigError(f"{source}: the manifest's {name} is not the Wan 2.1 VAE's, which musubi-tuner's Wan "
                              "VAE applies always; musubi would read these latents with the wrong normalisation")


def _posterior_sample(sample: ExportSample, seed: int) -> torch.Tensor:
    if sample.logvar is None:
        raise refused(sample.where, "has no logvar (encoded with --store mean); this musubi cache holds a "
                                    "posterior sample. Re-encode without --store mean")
    # diffusers' DiagonalGaussianDistribution: logvar clamped to [-30, 20], std = exp(0.5 * logvar).
    std = torch.exp(0.5 * sample.logvar.float().clamp(-30.0, 20.0))
    # Seeded per sample key, so a sample's draw does not depend on shard order or on which samples went before.
    digest = hashlib.sha256(f"{seed}:{sample.key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    noise = torch.randn(sample.mean.shape, generator=generator, dtype=torch.float32)
    return sample.mean.float() + std * noise


def musubi_latent(sample: ExportSample, source: Source, arch: MusubiArch, dtype: torch.dtype,
                  seed: int) -> dict[str, torch.Tensor]:
    """What musubi's caching script stores for this sample's pixels: its tensors by key, `[C, F, H, W]`."""
    spec = source.spec
    if arch.value == "normalised mean":
        m = torch.tensor(spec.latents_mean, dtype=torch.float32).view(-1, 1, 1, 1)
        s = torch.tensor(spec.latents_std, dtype=torch.float32).view(-1, 1, 1, 1)
        latent = ((sample.mean.float() - m) / s).to(dtype)
    elif arch.value == "mean":
        latent = sample.mean.to(dtype)
    elif arch.value == "sample":
        latent = _posterior_sample(sample, seed).to(dtype)
    else:  # "scaled sample"
        latent = (_posterior_sample(sample, seed) * (spec.scaling_factor or 1.0)).to(dtype)
    _, f, h, w = latent.shape
    dstr = _dtype_str(dtype)
    tensors = {f"latents_{f}x{h}x{w}_{dstr}": latent}
    if arch.short == "k5":
        last = latent[:, -1:] if f > 1 else latent[:, :1]
        tensors[f"latents_image_2x{h}x{w}_{dstr}"] = torch.cat([latent[:, :1], last], dim=1)
    return tensors


def item_name(sample: ExportSample) -> str:
    """The source video's stem, as musubi names its items (`os.path.basename` of the video, extension dropped), so
    musubi's own text caching over the same videos writes text caches these latents find. musubi takes the name's
    `_` tokens from the end (start-frames, size, architecture), so underscores inside are fine."""
    source = sample.meta.get("source")
    stem = Path(source).stem if isinstance(source, str) and source else sample.key
    return re.sub(r"[^A-Za-z0-9_.-]", "-", stem)


def musubi_discovers(name: str, arch: str) -> bool:
    """Whether musubi's VideoDataset.prepare_for_training finds and parses this latent cache file: `glob.glob` of
    `*_{arch}.safetensors` (which, like a shell, skips names starting with a dot), then `_` tokens from the end:
    `WxH` integers, `start-frames` integers, a non-empty item name before them."""
    if name.startswith(".") or not fnmatch.fnmatchcase(name, f"*_{arch}.safetensors"):
        return False
    tokens = name.split("_")
    if len(tokens) < 4 or not "_".join(tokens[:-3]):
        return False
    try:
        width, height = (int(v) for v in tokens[-2].split("x"))
        start, frames = (int(v) for v in tokens[-3].split("-")[:2])
    except ValueError:
        return False
    return min(width, height, start, frames) >= 0


def _cache_name(sample: ExportSample, arch: MusubiArch, shape: tuple[int, ...], source: Source) -> tuple[str, dict]:
    _, lf, lh, lw = shape
    spec = source.spec
    frames = (lf - 1) * spec.temporal_compression + 1
    # musubi names and tags a clip with its video's original frame size (ItemInfo.original_size), not the bucket's;
    # the clip's own size stands in where the sidecar lacks it.
    width = meta_number(sample, "source_width", most=MAX_PIXELS_SIDE, integer=True)
    height = meta_number(sample, "source_height", most=MAX_PIXELS_SIDE, integer=True)
    if not (width and height):
        width, height = lw * spec.spatial_compression, lh * spec.spatial_compression
    start_s = meta_number(sample, "clip_start", most=MAX_SECONDS)
    fps = meta_number(sample, "source_fps", most=MAX_FPS) or meta_number(sample, "fps", most=MAX_FPS)
    start = round(start_s * fps) if start_s is not None and fps else 0  # informational only to musubi
    name = f"{item_name(sample)}_{start:05d}-{frames:03d}_{width:04d}x{height:04d}_{arch.short}.safetensors"
    if not musubi_discovers(name, arch.short):
        why = ("its name starts with a dot, and musubi's glob skips hidden files (as its own listing of the videos "
               "does)" if name.startswith(".") else "musubi could not parse it back")
        raise refused(sample.where, f"its musubi cache file would be {name}, which musubi-tuner never reads: {why}. "
                                    "Rename the source video (no leading dot) and encode it again")
    meta = {"architecture": arch.full, "width": str(width), "height": str(height), "format_version": FORMAT_VERSION,
            "frame_count": str(frames)}
    return name, meta


def _text_cache(sample: ExportSample, arch: MusubiArch) -> tuple[str, bytes] | None:
    """musubi's Wan T5 cache from the cached UMT5 prompt embeddings, cut to the prompt's tokens (`u[:v]`)."""
    text = sample.text or {}
    embeds, mask = text.get("prompt_embeds"), text.get("attention_mask")
    if not arch.wan_t5 or embeds is None:
        return None
    if embeds.dim() != 2 or embeds.dtype not in DTYPE_NAMES.values() or not torch.isfinite(embeds).all():
        raise refused(sample.where, f"prompt_embeds {list(embeds.shape)} {embeds.dtype} are not finite "
                                    "[tokens, dim] float embeddings")
    length = int(mask.sum()) if mask is not None and mask.dim() == 1 else embeds.shape[0]
    # musubi's Wan T5 runs in bfloat16 (wan/configs/shared_config.py t5_dtype) and caches its output as is.
    meta = {"architecture": arch.full, "caption1": sample.caption or "", "format_version": FORMAT_VERSION}
    data = safetensors_bytes({"varlen_t5_bfloat16": embeds[:length].to(torch.bfloat16)}, meta)
    return f"{item_name(sample)}_{arch.short}_te.safetensors", data


def _refuse_foreign_caches(target: ExportTarget, arch: MusubiArch) -> None:
    """musubi trains on every latent cache file its glob finds: one this export did not write would be trained on
    beside the export, so such a directory is refused (and left as it is)."""
    if not target.root.is_dir():
        return
    theirs = sorted(p.name for p in target.root.iterdir()
                    if musubi_discovers(p.name, arch.short) and not target.owns(p.name))
    if theirs:
        legacy = (" Its export marker is from an earlier latentcache version, which recorded no hashes: if they are "
                  "that export's files, remove them yourself" if target.legacy else "")
        raise ConfigError(f"{target.root}: holds {len(theirs)} musubi {arch.short} latent cache file(s) latentcache "
                          f"did not export (e.g. {theirs[0]}); musubi trains on every latent cache file of its "
                          f"directory: export into another --to (the trainer's text caches may stay).{legacy}")


def export_musubi(source: str | os.PathLike, to: str | os.PathLike, *, arch: str | None = None,
                  dtype: str | None = None, seed: int = 0, dry_run: bool = False,
                  progress: Progress | None = None) -> ExportResult:
    """Write musubi-tuner cache files for every sample of a latentcache output into `to`."""
    src = open_source(source)
    chosen = choose_arch(src.spec.family, arch, str(source))
    if chosen.value == "normalised mean":
        check_wan_spec(src, str(source))
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_NAMES)}")
    out_dtype = DTYPE_NAMES[dtype] if dtype else chosen.dtype
    target = ExportTarget(to, "musubi", str(source), dry_run=dry_run)
    _refuse_foreign_caches(target, chosen)
    captions: dict[str, str] = {}  # text cache file -> its caption
    texts = 0
    for sample in src.samples():
        if sample.image_mean is not None:
            raise refused(sample.where, "has image-to-video latents; the musubi export writes text-to-video caches "
                                        "only (musubi's I2V caches need its CLIP or SigLIP embedding as well)")
        tensors = musubi_latent(sample, src, chosen, out_dtype, seed)
        name, meta = _cache_name(sample, chosen, tuple(sample.mean.shape), src)
        target.write(name, safetensors_bytes(tensors, meta), sample.where)
        text = _text_cache(sample, chosen)
        if text is not None:
            te_name, data = text
            caption = sample.caption or ""
            if te_name in captions:
                # musubi shares one text cache among a video's clips; two captions for one video cannot be expressed
                if captions[te_name] != caption:
                    raise LatentMismatchError(f"{sample.where}: caption {caption!r} differs from "
                                              f"{captions[te_name]!r} of another clip of the same video; musubi "
                                              f"keeps one text cache per video ({te_name})")
            else:
                captions[te_name] = caption
                # musubi's own text cache of this video, made by its script, is kept: never overwritten
                target.write(te_name, data, sample.where, foreign_ok=True)
                texts += 1
        if progress is not None:
            progress(1, src.total)
    result = target.finish({"architecture": chosen.short})
    if not texts:
        # musubi's dataset skips a latent without its text cache; its own script writes them under matching names
        result.notes.append(f"run musubi-tuner's {chosen.text_script} with the same dataset config (cache_directory "
                            f"{target.root}): its text caches pair with these latents by video name")
    result.notes.append(f"then train with cache_directory = {target.root} in musubi-tuner's dataset config")
    return result
