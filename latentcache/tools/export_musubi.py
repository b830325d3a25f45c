"""`latentcache export musubi OUT --to CACHE_DIR`: musubi-tuner's own cache files from a latentcache output.

The format is musubi-tuner's, read at commit 30c658c4f4b0bf05038b3346eff9670259b10fc7 (kohya-ss/musubi-tuner):
- names (dataset/image_video_dataset.py, VideoDataset.retrieve_latent_cache_batches / get_latent_cache_path and
  prepare_for_training, which parses them back): `{item}_{start:05d}-{frames:03d}_{W:04d}x{H:04d}_{arch}.safetensors`
  for the latents and `{item}_{arch}_te.safetensors` for the text-encoder outputs; `arch` is `wan` or `hv`.
- keys and metadata (dataset/cache_io.py, save_latent_cache_wan / save_latent_cache / save_latent_cache_common and
  save_text_encoder_output_cache_wan): `latents_{F}x{H}x{W}_{dtype}` (dtype as torch names it, e.g. bfloat16)
  holding `[C, F, H, W]`; metadata
  `architecture`, `width`, `height`, `format_version` 1.0.1, `frame_count`; text `varlen_t5_{dtype}` (Wan) with
  metadata `architecture`, `caption1`, `format_version`.
- values: Wan (wan_cache_latents.py + wan/modules/vae.py WanVAE_.encode) stores the posterior mean normalised as
  `(mu - latents_mean) / latents_std`, cast to the VAE dtype (bf16 by default). HunyuanVideo (cache_latents.py
  encode_and_save_batch) stores `latent_dist.sample()` unscaled (the trainer multiplies by the scaling factor), in
  the VAE dtype (fp16 by default). latentcache stores the raw posterior (`mean`, `logvar`, docs/format.md), so the
  export applies exactly those steps. Wan's T5 cache is the unpadded prompt embedding (`u[:v]` for the true length).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from latentcache.errors import ConfigError, LatentMismatchError
from latentcache.format import strictjson
from latentcache.format.reader import decode_sample
from latentcache.format.shards import write_text_atomic
from latentcache.train.shard_sources import read_shard, resolve_source

# latentcache family -> musubi-tuner architecture short name (dataset/architectures.py) and its full name.
ARCHITECTURES = {"wan": ("wan", "wan"), "hunyuanvideo": ("hv", "hunyuan_video")}
# The dtype musubi's own caching script leaves the latents in by default (--vae_dtype unset).
DEFAULT_DTYPES = {"wan": torch.bfloat16, "hunyuanvideo": torch.float16}
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype_str(dtype: torch.dtype) -> str:
    """musubi's dtype_to_str (utils/model_utils.py): the torch name, `bfloat16`, `float16`, `float32`."""
    return str(dtype).split(".")[-1]
FORMAT_VERSION = "1.0.1"
# musubi's WanVAE (wan/modules/vae.py) normalises with these constants whatever the checkpoint: the Wan 2.1 VAE's
# latents_mean/latents_std. It has no Wan 2.2 (48-channel) VAE.
MUSUBI_WAN_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
MUSUBI_WAN_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(slots=True)
class ExportResult:
    latents: list[Path] = field(default_factory=list)
    text: list[Path] = field(default_factory=list)
    stale_removed: list[str] = field(default_factory=list)  # an earlier export's files this one did not write


# musubi's VideoDataset globs every `*_{arch}.safetensors` (and `*_{arch}_te.safetensors`) of its cache directory, so
# a file an earlier export left there is trained on as well. The marker says the directory is an export target; its
# cache files that this export does not write again are removed once it is complete.
EXPORT_MARKER = ".latentcache-export.json"
_CACHE_FILE = re.compile(r"[^/\\]+_(?:wan|hv)(?:_te)?\.safetensors")


def _cache_files(out: Path) -> set[str]:
    """The cache files musubi would read, and the temporaries a killed export left (`_atomic_save`)."""
    return {p.name for p in out.iterdir()
            if (_CACHE_FILE.fullmatch(p.name) or _CACHE_FILE.fullmatch(p.name[1:-4]) and p.name.endswith(".tmp"))
            and p.is_file()}


def _claim(out: Path, source: str | os.PathLike) -> set[str]:
    """The musubi cache files already in `out`, which must be latentcache's (its marker there); marks `out` as an
    export in progress. A directory holding cache files without the marker is refused: they are someone else's."""
    marker = out / EXPORT_MARKER
    present = _cache_files(out)
    if not marker.is_file():
        if present:
            example = sorted(present)[0]
            raise ConfigError(f"{out}: holds {len(present)} musubi cache file(s) latentcache did not export (e.g. "
                              f"{example}); musubi trains on every cache file of its directory: export into an "
                              "empty directory")
    else:
        try:
            strictjson.loads(marker.read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{marker}: not a latentcache export marker ({e}); export into an empty "
                              "directory") from None
    write_text_atomic(marker, json.dumps({"source": str(source), "complete": False}, indent=1))
    return present


def _finish(out: Path, source: str | os.PathLike, result: ExportResult, before: set[str]) -> None:
    written = {p.name for p in (*result.latents, *result.text)}
    for name in sorted(before - written):
        (out / name).unlink(missing_ok=True)
        result.stale_removed.append(name)
    write_text_atomic(out / EXPORT_MARKER, json.dumps({"source": str(source), "complete": True,
                                                       "files": sorted(written)}, indent=1))


def _item_name(key: str, meta: dict[str, Any]) -> str:
    """The source video's stem, as musubi names its items (`os.path.basename` of the video, extension dropped), so
    musubi's own cache_text_encoder_outputs.py over the same videos writes text caches these latents find. musubi
    takes the name's `_` tokens from the end (start-frames, size, architecture), so underscores inside are fine."""
    source = meta.get("source")
    stem = Path(source).stem if isinstance(source, str) and source else key
    return re.sub(r"[^A-Za-z0-9_.-]", "-", stem)


def _check_wan_spec(spec: dict[str, Any], source: str | os.PathLike) -> None:
    """musubi's `wan` cache means the Wan 2.1 VAE's latents; anything else would be normalised differently there."""
    if int(spec["channels"]) != 16:
        raise ConfigError(f"{source}: a {spec['channels']}-channel wan VAE (Wan 2.2 TI2V's is 48); musubi-tuner's Wan "
                          "VAE and cache are the 16-channel Wan 2.1 VAE's (also used by Wan 2.2 A14B)")
    for name, musubi_value in (("latents_mean", MUSUBI_WAN_MEAN), ("latents_std", MUSUBI_WAN_STD)):
        value = spec.get(name)
        if value is None or len(value) != 16 or any(abs(a - b) > 1e-4 for a, b in zip(value, musubi_value,
                                                                                         strict=True)):
            raise ConfigError(f"{source}: the manifest's {name} is not the Wan 2.1 VAE's, which musubi-tuner's Wan "
                              "VAE applies always; musubi would read these latents with the wrong normalisation")


def _source_size(meta: dict[str, Any], fallback: tuple[int, int]) -> tuple[int, int]:
    width, height = meta.get("source_width"), meta.get("source_height")
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        return width, height
    return fallback


def _start_frame(meta: dict[str, Any]) -> int:
    """The clip's first frame in the source, for musubi's `{start:05d}` token (informational only to musubi)."""
    start, fps = meta.get("clip_start"), meta.get("source_fps") or meta.get("fps")
    if isinstance(start, int | float) and isinstance(fps, int | float) and start >= 0 and fps > 0:
        return round(start * fps)
    return 0


def _refused(where: str, reason: str) -> LatentMismatchError:
    """A sample musubi's cache cannot express: the export stops (a cache silently missing samples would train on
    less than the user asked for); the CLI exits 2 with this message."""
    return LatentMismatchError(f"{where}: {reason}")


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    # A killed export leaves no half-written file that musubi's glob would pick up.
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def musubi_latent(sample: dict[str, Any], spec: dict[str, Any], dtype: torch.dtype, seed: int,
                  where: str) -> torch.Tensor:
    """What musubi's caching script stores for this sample's pixels: `[C, F, H, W]` in `dtype`."""
    family = spec["family"]
    mean = sample["mean"].float()
    if family == "wan":
        if spec.get("latents_mean") is None or spec.get("latents_std") is None:
            raise _refused(where, "the manifest's wan latent_spec has no latents_mean/latents_std; musubi's "
                             "Wan cache holds normalised latents")
        shape = (-1, 1, 1, 1)
        m = torch.tensor(spec["latents_mean"], dtype=torch.float32).view(shape)
        s = torch.tensor(spec["latents_std"], dtype=torch.float32).view(shape)
        return ((mean - m) / s).to(dtype)
    if sample["logvar"] is None:
        raise _refused(where, "has no logvar (encoded with --store mean); musubi's "
                         "HunyuanVideo cache holds a posterior sample. Re-encode without --store mean")
    # diffusers' DiagonalGaussianDistribution: logvar clamped to [-30, 20], std = exp(0.5 * logvar).
    std = torch.exp(0.5 * sample["logvar"].float().clamp(-30.0, 20.0))
    # Seeded per sample key, so a sample's draw does not depend on shard order or on which samples went before.
    digest = hashlib.sha256(f"{seed}:{sample['key']}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    return (mean + std * noise).to(dtype)


def export_musubi(source: str | os.PathLike, to: str | os.PathLike, *, dtype: str | None = None,
                  seed: int = 0) -> ExportResult:
    """Write musubi-tuner cache files for every sample of a latentcache output into `to`."""
    manifest, _, shards = resolve_source(source)
    spec = manifest["latent_spec"]
    family = spec["family"]
    if family not in ARCHITECTURES:
        raise ConfigError(f"{source}: family {family} has no musubi-tuner latent cache that latentcache can write "
                          f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    if family == "wan":
        _check_wan_spec(spec, source)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_NAMES)}")
    out_dtype = DTYPE_NAMES[dtype] if dtype else DEFAULT_DTYPES[family]
    arch, arch_full = ARCHITECTURES[family]
    ratio = int(spec["spatial_compression"])
    tcomp = int(spec["temporal_compression"])
    out = Path(to)
    out.mkdir(parents=True, exist_ok=True)
    before = _claim(out, source)
    result = ExportResult()
    written: dict[Path, str] = {}  # cache file -> the sample key that wrote it
    captions: dict[Path, str] = {}  # text cache file -> its caption
    for shard in shards:
        for raw in read_shard(shard):
            sample = decode_sample(raw, shard.url)
            where = f"{shard.url}: sample {sample['key']}"
            if sample["image_mean"] is not None:
                raise _refused(where, "has image-to-video latents; the musubi export writes text-to-video "
                                 "caches only (musubi's I2V cache needs its CLIP embedding as well)")
            if sample["mean"].dim() != 4:
                raise _refused(where, f"mean has shape {tuple(sample['mean'].shape)}, expected [C, T, H, W]")
            latent = musubi_latent(sample, spec, out_dtype, seed, where)
            _, lf, lh, lw = latent.shape
            frames = (lf - 1) * tcomp + 1
            # musubi names and tags a clip with its video's original frame size (ItemInfo.original_size), not the
            # bucket's; the clip's own size stands in where the sidecar lacks it.
            width, height = _source_size(sample["meta"], (lw * ratio, lh * ratio))
            start = _start_frame(sample["meta"])
            item = _item_name(sample["key"], sample["meta"])
            name = f"{item}_{start:05d}-{frames:03d}_{width:04d}x{height:04d}_{arch}.safetensors"
            dstr = _dtype_str(out_dtype)
            meta = {"architecture": arch_full, "width": str(width), "height": str(height),
                    "format_version": FORMAT_VERSION, "frame_count": str(frames)}
            path = out / name
            if path in written:
                raise _refused(where, f"its musubi cache name {name} is also {written[path]}'s (same video stem, "
                                 "start frame, length and size); musubi names items by the video's file name, so "
                                 "export outputs with distinct video names")
            written[path] = sample["key"]
            _atomic_save({f"latents_{lf}x{lh}x{lw}_{dstr}": latent}, meta, path)
            result.latents.append(path)
            text = sample["text"]
            if text is None:
                continue
            te_path = out / f"{item}_{arch}_te.safetensors"
            caption = sample["caption"] or ""
            if te_path in captions:
                # musubi shares one text cache among a video's clips; two captions for one video cannot be expressed
                if captions[te_path] != caption:
                    raise _refused(where, f"caption {caption!r} differs from {captions[te_path]!r} of another "
                                     f"clip of the same video; musubi keeps one text cache per video ({te_path.name})")
                continue
            captions[te_path] = caption
            result.text.append(_write_text(text, sample, family, arch_full, te_path, where))
    _finish(out, source, result, before)
    return result


def _write_text(text: dict[str, torch.Tensor], sample: dict[str, Any], family: str, arch_full: str, path: Path,
                where: str) -> Path:
    if family != "wan":
        # musubi's HunyuanVideo cache needs llm + llm_mask and the CLIP-L pooled vector (clipL); latentcache's
        # text cache holds one encoder's prompt_embeds, so it cannot be expressed.
        raise _refused(where, "musubi's HunyuanVideo text cache needs the LLM and CLIP-L outputs; latentcache "
                         "cached only prompt_embeds. Run musubi's cache_text_encoder_outputs.py for the captions "
                         "(the exported latents are usable)")
    embeds, mask = text.get("prompt_embeds"), text.get("attention_mask")
    if embeds is None or embeds.dim() != 2:
        raise _refused(where, "text embeddings missing or not [tokens, dim]")
    # musubi keeps only the true tokens (`u[:v]`); the mask says how many.
    length = int(mask.sum()) if mask is not None else embeds.shape[0]
    # musubi's Wan T5 runs in bfloat16 (wan/configs/shared_config.py t5_dtype) and caches its output as is.
    embeds = embeds.to(torch.bfloat16)
    dstr = _dtype_str(torch.bfloat16)
    meta = {"architecture": arch_full, "caption1": sample["caption"] or "", "format_version": FORMAT_VERSION}
    _atomic_save({f"varlen_t5_{dstr}": embeds[:length]}, meta, path)
    return path
