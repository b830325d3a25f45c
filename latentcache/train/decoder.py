"""One raw sample -> the trainer's item, and items -> a batch: the last stage of a slot's stream.

`SampleDecoder` holds what decoding needs from the dataset (the manifest's `LatentSpec`, posterior sampling,
normalisation, layout, dtype, seed) and nothing of the stream. Normalisation (scaling/shift factor or per-channel
mean/std) is applied exactly once, here; `normalize=False` hands back the raw VAE posterior. Image-to-video
conditioning (`--image-latents`) is rebuilt per family as the family's pipeline builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from latentcache.errors import LatentMismatchError, ShardFormatError
from latentcache.format.checks import latent_problems, meta_problems
from latentcache.format.reader import decode_sample
from latentcache.format.spec import LatentSpec, image_condition_of
from latentcache.format.text import collate_text, item_text
from latentcache.train.partition import seed_of
from latentcache.train.raw import RawSample

# What every item holds besides its prompt tensors (`prompt_embeds`... under the family's pipeline names).
ITEM_KEYS = frozenset({"latents", "key", "meta", "caption", "image_latents"})
LAYOUTS = ("BCTHW", "BTCHW")


@dataclass(slots=True, frozen=True)
class DecodedSample:
    """One sample's tensors and JSON (`format.reader.decode_sample`), still as stored: not sampled nor normalised."""

    key: str
    url: str
    bucket: str
    draw: tuple[str, ...]  # RawSample.draw_tags: what the noise seed takes after the key
    mean: torch.Tensor
    logvar: torch.Tensor | None
    image_mean: torch.Tensor | None
    image_logvar: torch.Tensor | None
    meta: dict[str, Any]
    caption: str | None
    text: dict[str, torch.Tensor] | None

    @staticmethod
    def of(raw: RawSample) -> DecodedSample:
        sample = decode_sample(raw.members, raw.url)
        return DecodedSample(sample["key"], raw.url, raw.bucket, raw.draw_tags, sample["mean"], sample["logvar"],
                             sample["image_mean"], sample["image_logvar"], sample["meta"], sample["caption"],
                             sample["text"])


class SampleDecoder:
    """Decodes raw samples into model-ready items (`decode`) and stacks items of one bucket (`collate`)."""

    def __init__(self, spec: LatentSpec, *, sample_posterior: bool = True, normalize: bool = True,
                 layout: str = "BCTHW", dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        self.spec = spec
        self.sample_posterior, self.normalize = sample_posterior, normalize
        self.layout, self.dtype, self.seed = layout, dtype, seed
        # Normalisation is affine per channel: applied in place with the spec's own gain and offset.
        self._gain, self._offset = spec.affine()

    def decode(self, raw: RawSample, epoch: int) -> dict[str, Any]:
        """The item of one raw sample in `epoch` (whose number seeds the posterior noise)."""
        sample = DecodedSample.of(raw)
        latents = self.latents(sample, epoch)
        if self.layout == "BTCHW":
            latents = latents.permute(1, 0, 2, 3)
        out = {"latents": latents, "key": sample.key, "meta": sample.meta, "caption": sample.caption}
        if sample.image_mean is not None:
            image = self.image_latents(sample, epoch)
            out["image_latents"] = image.permute(1, 0, 2, 3) if self.layout == "BTCHW" else image
        if sample.text is not None:
            out.update(item_text(sample.text))
        return out

    def latents(self, sample: DecodedSample, epoch: int) -> torch.Tensor:
        """The sample's latents, [C, T, H, W]: checked, sampled from the posterior (or its mean), normalised."""
        mean, logvar = sample.mean, sample.logvar
        if mean.ndim != 4:
            raise LatentMismatchError(f"{sample.url}: sample {sample.key} has shape {tuple(mean.shape)}, "
                                      "expected [C, T, H, W]")
        if mean.shape[0] != self.spec.channels:
            hint = (" These are 3-channel pixels, not latents (what SAT with latent_input: true feeds its DiT from "
                    "a pixel dataset): run `latentcache encode` first." if mean.shape[0] == 3 else "")
            raise LatentMismatchError(f"{sample.url}: sample {sample.key} has {mean.shape[0]} channels, "
                                      f"the manifest says {self.spec.channels}.{hint}")
        # The check `latentcache verify` applies: dtype, the bucket's shape, finite, and finite once sampled and
        # normalised in float32. A sample that fails it never reaches the trainer.
        label = f"{sample.url}: sample {sample.key}"
        problems = (latent_problems(mean, logvar, self.spec, sample.bucket, label)
                    or meta_problems(sample.meta, sample.bucket, label))
        if problems:
            raise ShardFormatError(f"{problems[0]}. Run `latentcache verify` on the dataset and re-encode the shard")
        # In-place arithmetic on tensors this sample owns (decoded just now): a 49x480x720 clip's latents are 4.5 MB
        # in float32, and every temporary costs a pass over them.
        if self.sample_posterior and logvar is not None:
            # Fresh noise every epoch, yet reproducible (and the same after a resume): seeded by (seed, epoch, key).
            gen = torch.Generator().manual_seed(seed_of(self.seed, epoch, sample.key, *sample.draw) >> 1)
            std = logvar.float().mul_(0.5).exp_()
            z = torch.randn(mean.shape, generator=gen).mul_(std).add_(mean)
        else:
            z = mean.float()
        if self.normalize:
            z = z.mul_(self._gain).add_(self._offset)
        return z.to(self.dtype)

    def image_latents(self, sample: DecodedSample, epoch: int) -> torch.Tensor:
        """`--image-latents` -> the I2V pipeline's conditioning for this clip, [C', T, H, W], to concatenate to the
        (noisy) video latents along channels, exactly as the family's pipeline builds it in `prepare_latents`:

        CogVideoX: the first frame's latent (sampled from its posterior like `retrieve_latents`, or its mean with
        sample_posterior=False) times `scaling_factor` (divided by it for `invert_scale_latents`, CogVideoX 1.5),
        followed by T-1 zero frames: C channels. Wan: `cat([mask, (z - latents_mean) / latents_std])`, z the mode
        of the first frame plus zero frames encoded as one clip, mask `temporal_compression` channels that are 1 on
        the first latent frame and 0 after: C + 4 channels. `normalize=False` leaves z unscaled.
        """
        mean, logvar = sample.image_mean, sample.image_logvar
        assert mean is not None
        c, t, h, w = sample.mean.shape
        mode = image_condition_of(self.spec.family)
        if mean.shape[1] != (1 if mode == "image" else t):
            raise LatentMismatchError(f"{sample.url}: sample {sample.key} has image_mean {list(mean.shape)}, "
                                      f"the {self.spec.family} image-to-video conditioning is "
                                      f"{[c, 1 if mode == 'image' else t, h, w]}; re-encode with --image-latents")
        if self.sample_posterior and logvar is not None:
            gen = torch.Generator().manual_seed(seed_of(self.seed, epoch, sample.key, "image", *sample.draw) >> 1)
            z = torch.randn(mean.shape, generator=gen).mul_(logvar.float().mul(0.5).exp_()).add_(mean)
        else:
            z = mean.float()
        if mode == "image":
            if self.normalize:
                # The pipeline's own arithmetic (a Python float times the latents), so the result is bit-identical.
                scale = self.spec.scaling_factor if self.spec.scaling_factor is not None else 1.0
                z = 1 / scale * z if self.spec.invert_scale_latents else scale * z
            return torch.cat([z, z.new_zeros(c, t - 1, h, w)], dim=1).to(self.dtype)
        if self.normalize and self.spec.latents_mean is not None and self.spec.latents_std is not None:
            # As WanImageToVideoPipeline: (z - latents_mean) * (1 / latents_std), float32 per-channel tensors.
            z = (z - torch.tensor(self.spec.latents_mean).view(-1, 1, 1, 1)) * (
                1.0 / torch.tensor(self.spec.latents_std).view(-1, 1, 1, 1))
        mask = z.new_zeros(self.spec.temporal_compression, t, h, w)
        mask[:, 0] = 1.0
        return torch.cat([mask, z], dim=0).to(self.dtype)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Items of one bucket -> a batch: tensors stacked along a new first dimension, the rest as lists."""
    batch = {"latents": torch.stack([s["latents"] for s in samples]), "key": [s["key"] for s in samples],
             "meta": [s["meta"] for s in samples], "caption": [s["caption"] for s in samples]}
    if all("image_latents" in s for s in samples):
        batch["image_latents"] = torch.stack([s["image_latents"] for s in samples])
    # The prompt tensors (`--text-encoder`): whatever else an item holds, under the pipeline's names.
    batch.update(collate_text([{k: v for k, v in s.items() if k not in ITEM_KEYS} for s in samples]))
    return batch
