"""Stage 4: shards -> model-ready latent tensors for a trainer, refusing anything the model does not expect.

Normalisation (scaling/shift factor or per-channel mean/std, read from the manifest) is applied exactly once,
here; `normalize=False` hands back the raw VAE posterior for code that scales it itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from latentcache.errors import LatentMismatchError, ShardFormatError
from latentcache.shards import decode_sample, read_manifest
from latentcache.vae import LatentSpec

log = logging.getLogger(__name__)

PIXEL_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".ts", ".m4v", ".png", ".jpg", ".jpeg",
                  ".webp", ".bmp"}


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _pixels_message(root: Path) -> str | None:
    """When `root` holds videos or frames rather than latents, the message that says so."""
    if not root.is_dir():
        return None
    pixels = [p for p in root.rglob("*") if p.suffix.lower() in PIXEL_SUFFIXES]
    if not pixels:
        return None
    return (
        f"{root} holds {len(pixels)} video/image file(s) (e.g. {pixels[0].name}) and no latent shards: the trainer "
        "would be given 3-channel RGB pixels where the transformer expects VAE latents (the latent_input=False "
        f"mistake). Run `latentcache encode {root} --out LATENTS_DIR` first and point the dataset at LATENTS_DIR."
    )


class LatentShardDataset(IterableDataset):
    """Streams latents written by `latentcache encode`.

    Yields dicts with `latents` (float tensor [C, T, H, W], normalised for the model), `key`, `meta`, `caption`
    and `prompt_embeds` when cached. With `batch_size=B`, yields batches of one bucket: `latents` is
    [B, C, T, H, W] (or [B, T, C, H, W] with `layout="BTCHW"`, what diffusers' CogVideoX transformer takes).

    Every sample is seen exactly once per epoch across DDP ranks and DataLoader workers: shards are split between
    them when there are enough, samples otherwise.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        expected_channels: int | None = None,
        sample_posterior: bool = True,
        normalize: bool = True,
        batch_size: int | None = None,
        layout: str = "BCTHW",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        if not (self.root / "manifest.json").is_file():
            message = _pixels_message(self.root)
            if message:
                raise LatentMismatchError(message)
        self.manifest = read_manifest(self.root)
        self.spec = LatentSpec.from_dict(self.manifest["latent_spec"])
        if expected_channels is not None and self.spec.channels != expected_channels:
            raise LatentMismatchError(
                f"{self.root}: latents have {self.spec.channels} channels ({self.manifest['vae']['class_name']}), "
                f"the model expects {expected_channels}. Encode with the VAE your model was trained with, or fix "
                "the model's in_channels."
            )
        if layout not in ("BCTHW", "BTCHW"):
            raise ValueError(f"layout {layout!r} is not 'BCTHW' or 'BTCHW'")
        self.expected_channels = expected_channels or self.spec.channels
        self.sample_posterior = sample_posterior
        self.normalize = normalize
        self.batch_size = batch_size
        self.layout = layout
        self.dtype = dtype
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.urls = [str(self.root / s["path"]) for s in self.manifest["shards"]]

    @classmethod
    def for_transformer(cls, transformer_or_config: Any, root: str | os.PathLike, **kwargs: Any
                        ) -> LatentShardDataset:
        """Read `in_channels` from a diffusers transformer (or its config) and refuse shards that do not fit."""
        config = getattr(transformer_or_config, "config", transformer_or_config)
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        in_channels = int(get("in_channels"))
        dataset = cls(root, **kwargs)
        if in_channels == 2 * dataset.spec.channels:
            raise LatentMismatchError(
                f"{root}: the transformer takes in_channels={in_channels}, twice the VAE's {dataset.spec.channels}: "
                "an image-to-video model, whose input is the noisy video latents concatenated with the image "
                "latents. Build it with expected_channels=" f"{dataset.spec.channels} and concatenate the image "
                "latents in the training step."
            )
        if in_channels != dataset.spec.channels:
            raise LatentMismatchError(
                f"{root}: latents have {dataset.spec.channels} channels, the transformer's in_channels is "
                f"{in_channels}. Encode with the VAE this transformer was trained with."
            )
        return dataset

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.manifest["counts"]["samples"])

    # --------------------------------------------------------------------------------------------- internals

    def _assignment(self) -> tuple[list[str], int, int]:
        """This worker's shard urls, and (index, count) for the sample-level split when shards are scarce."""
        rank, world = _rank_and_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        gid, total = rank * workers + worker, world * workers
        if len(self.urls) >= total:
            return self.urls[gid::total], 0, 1
        return list(self.urls), gid, total

    def _raw_samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.reraise_exception))
        try:
            yield from pipeline
        except ShardFormatError:
            raise
        except Exception as e:  # webdataset wraps tar errors in many types
            raise ShardFormatError(f"reading {urls}: {type(e).__name__}: {e}") from e

    def _latents(self, sample: dict[str, Any]) -> torch.Tensor:
        mean, logvar = sample["mean"], sample["logvar"]
        if mean.ndim != 4:
            raise LatentMismatchError(f"{sample['url']}: sample {sample['key']} has shape {tuple(mean.shape)}, "
                                      "expected [C, T, H, W]")
        if mean.shape[0] != self.expected_channels:
            hint = (" These are 3-channel pixels, not latents (the latent_input=False mistake): run "
                    "`latentcache encode` first." if mean.shape[0] == 3 else "")
            raise LatentMismatchError(f"{sample['url']}: sample {sample['key']} has {mean.shape[0]} channels, "
                                      f"expected {self.expected_channels}.{hint}")
        z = mean.float()
        if self.sample_posterior and logvar is not None:
            # Fresh noise every epoch, yet reproducible: seeded by (seed, epoch, key).
            digest = hashlib.sha1(f"{self.seed}:{self.epoch}:{sample['key']}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            z = z + torch.exp(0.5 * logvar.float()) * torch.randn(z.shape, generator=gen)
        if self.normalize:
            z = self.spec.normalize(z)
        return z.to(self.dtype)

    def _samples(self) -> Iterator[dict[str, Any]]:
        urls, index, count = self._assignment()
        for n, raw in enumerate(self._raw_samples(urls)):
            if n % count != index:
                continue
            sample = decode_sample(raw, raw.get("__url__", "?"))
            latents = self._latents(sample)
            if self.layout == "BTCHW":
                latents = latents.permute(1, 0, 2, 3)
            out = {"latents": latents, "key": sample["key"], "meta": sample["meta"],
                   "caption": sample["caption"]}
            if sample["text"] is not None:
                out["prompt_embeds"] = sample["text"].get("prompt_embeds")
                out["prompt_attention_mask"] = sample["text"].get("attention_mask")
            yield out

    def _batches(self) -> Iterator[dict[str, Any]]:
        pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for sample in self._samples():
            group = pending.setdefault(tuple(sample["latents"].shape), [])
            group.append(sample)
            if len(group) == self.batch_size:
                yield self._collate(pending.pop(tuple(sample["latents"].shape)))
        if not self.drop_last:
            for group in pending.values():
                yield self._collate(group)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        latents = torch.stack([s["latents"] for s in samples])
        batch = {"latents": latents, "key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples],
                 "caption": [s["caption"] for s in samples]}
        if all("prompt_embeds" in s for s in samples):
            batch["prompt_embeds"] = torch.stack([s["prompt_embeds"] for s in samples])
            batch["prompt_attention_mask"] = torch.stack([s["prompt_attention_mask"] for s in samples])
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._batches() if self.batch_size else self._samples()
