"""The one check of a stored latent that `latentcache verify` and `LatentShardDataset` both apply.

Whatever verify passes, the dataset must deliver as finite, model-ready latents; whatever the dataset would refuse,
verify must report. So both call `latent_problems` (per sample) and `spec_problems` (the manifest's latent spec).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from latentcache.format.buckets import Bucket, FrameRule
from latentcache.format.spec import LatentSpec

# What the encoder may have stored: the dtypes `--dtype` offers.
LATENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# diffusers' DiagonalGaussianDistribution clamps logvar to [-30, 20] (and latentcache's encoder stores it clamped):
# a stored value outside was not written by a VAE, and exp(0.5 * logvar) beyond 20 heads for overflow.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# The largest |N(0, 1)| draw torch.randn can make is under 9 (Box-Muller on 53-bit uniforms gives at most ~8.6).
NOISE_BOUND = 9.0
FLOAT32_MAX = torch.finfo(torch.float32).max


def parse_bucket(bucket: Any) -> Bucket | None:
    """'49x480x720' -> Bucket(49, 480, 720), frames x height x width in pixels; None when it is not such a name."""
    return Bucket.parse_or_none(bucket)


def _finite_number(value: Any) -> bool:
    """A number a float32 holds (a stranger's 10**30 int or 1e300 would overflow the tensors built from it)."""
    try:
        return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                and abs(value) <= FLOAT32_MAX)
    except OverflowError:  # an int past a float's range
        return False


# No VAE has more latent channels or compresses more than this; a larger value (10**30 channels) is no spec, and
# tensors of its size cannot be built.
MAX_SPEC_INT = 4096


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SPEC_INT


def spec_problems(spec: Any) -> list[str]:
    """Why a manifest's `latent_spec` cannot normalise latents into finite numbers; [] if it can."""
    if not isinstance(spec, dict):
        return [f"latent_spec is a {type(spec).__name__}, expected an object"]
    problems = [f"latent_spec.{name} is {spec.get(name)!r}, expected a positive integer up to {MAX_SPEC_INT}"
                for name in ("channels", "temporal_compression", "spatial_compression")
                if not _positive_int(spec.get(name))]
    if spec.get("frame_rule") is not None:
        try:
            FrameRule.parse(spec["frame_rule"])
        except ValueError as e:
            problems.append(f"latent_spec.{e}")
    if not isinstance(spec.get("family"), str):
        problems.append(f"latent_spec.family is {spec.get('family')!r}, expected a name such as 'cogvideox'")
    for name in ("scaling_factor", "shift_factor"):
        if spec.get(name) is not None and not _finite_number(spec[name]):
            problems.append(f"latent_spec.{name} is {spec[name]!r}, expected a finite number (or null)")
    for name in ("latents_mean", "latents_std"):
        values = spec.get(name)
        if values is None:
            continue
        if not (isinstance(values, list) and all(_finite_number(v) for v in values)):
            problems.append(f"latent_spec.{name} is {str(values)[:200]}, expected a list of finite numbers")
        elif len(values) != spec.get("channels"):  # [] too: the per-channel arithmetic needs one per channel
            problems.append(f"latent_spec.{name} has {len(values)} values, latent_spec.channels is "
                            f"{spec.get('channels')}")
    if problems:
        return problems
    gain, offset = LatentSpec.from_dict(spec).affine(torch.float64)
    if not (torch.isfinite(gain).all() and torch.isfinite(offset).all()):
        problems.append(f"latent_spec normalisation ({LatentSpec.from_dict(spec).describe_normalization()}) gives "
                        "non-finite gains or offsets (a zero latents_std?)")
    elif float(torch.maximum(gain.abs(), offset.abs()).max()) > FLOAT32_MAX:
        problems.append("latent_spec normalisation gains or offsets overflow float32")
    elif bool((gain == 0).any()):
        problems.append(f"latent_spec normalisation ({LatentSpec.from_dict(spec).describe_normalization()}) has a "
                        "zero gain (a scaling_factor of 0?): every latent of that channel becomes the same number")
    return problems


def meta_problems(meta: dict[str, Any], bucket: str | None, label: str) -> list[str]:
    """Why a sample's JSON contradicts its shard; [] if it does not. `verify`, the dataset and the exports all apply
    it: a sample whose JSON names another bucket is refused by each alike."""
    said = meta.get("bucket")
    if said is not None and bucket is not None and said != bucket:
        shown = repr(said) if len(repr(said)) <= 80 else repr(said)[:77] + "..."
        return [f"{label} says bucket {shown}, its shard is in bucket {bucket}"]
    return []


def latent_problems(mean: torch.Tensor, logvar: torch.Tensor | None, spec: LatentSpec, bucket: str,
                    label: str) -> list[str]:
    """Why this stored posterior is not a latent of `bucket` that samples and normalises to finite float32; [].

    Checks dtype, shape (the bucket's latent shape under the manifest's spec), finiteness, logvar within
    [LOGVAR_MIN, LOGVAR_MAX], and that mean + NOISE_BOUND * std, normalised, stays inside float32 (so the
    dataset's fp32 posterior sample and normalisation cannot overflow). `label` starts each message
    (e.g. "SHARD: sample KEY"). One min/max pass over each tensor, in its own dtype: no copy is made.
    """
    tensors = {"mean": mean} if logvar is None else {"mean": mean, "logvar": logvar}
    bad = [f"{label} {name} is {t.dtype}, expected float16, bfloat16 or float32" for name, t in tensors.items()
           if t.dtype not in LATENT_DTYPES]
    if bad:
        return bad
    parsed = parse_bucket(bucket)
    # A name that is no bucket expects an empty shape, so any stored tensor is reported as the wrong shape.
    sizes = (parsed.frames, parsed.height, parsed.width) if parsed else (0, 0, 0)
    expected = list(spec.latent_shape(*sizes))
    for name, t in tensors.items():
        if list(t.shape) != expected:
            hint = " (3 channels: pixels, not latents)" if t.ndim == 4 and t.shape[0] == 3 else ""
            what = "latents" if name == "mean" else "logvar"
            return [f"{label} {what} are {list(t.shape)}{hint}, bucket {bucket} and the manifest's VAE give "
                    f"{expected}"]
    if not mean.numel():
        return [f"{label} latents are empty ({list(mean.shape)}): bucket {bucket} is smaller than one latent pixel"]
    ranges = {}
    for name, t in tensors.items():
        # One min/max pass over the whole tensor (a per-channel one costs 5x): a NaN anywhere makes them NaN, an Inf
        # makes them infinite. Only then is the slow element-wise count run, to say how many.
        low, high = (float(v) for v in torch.aminmax(t))
        if not (math.isfinite(low) and math.isfinite(high)):
            count = int((~torch.isfinite(t)).sum())
            return [f"{label} {name} has {count} NaN/Inf value(s); re-encode it (in fp32: --dtype fp32)"]
        ranges[name] = low, high
    if "logvar" in ranges:
        low, high = ranges["logvar"]
        if low < LOGVAR_MIN or high > LOGVAR_MAX:
            return [f"{label} logvar spans {low:g}..{high:g}, outside [{LOGVAR_MIN:g}, {LOGVAR_MAX:g}] (diffusers' "
                    "clamp, which the encoder applies): not a VAE's posterior"]
    low, high = ranges["mean"]
    reach = max(-low, high)
    if "logvar" in ranges:
        reach += NOISE_BOUND * math.exp(0.5 * ranges["logvar"][1])
    # Largest gain and offset over channels: a bound, exact for a scalar scaling factor.
    gain, offset = spec.affine(torch.float64)
    worst = reach * float(gain.abs().max()) + float(offset.abs().max())
    if worst > FLOAT32_MAX:
        return [f"{label} mean reaches {reach:.3g}: sampled and normalised ({spec.describe_normalization()}) it "
                f"overflows float32 (max {FLOAT32_MAX:.3g})"]
    return []


# Image latents are checked without the manifest's spec (in `shards.decode_sample`, which verify and the dataset
# both call), so their overflow bound assumes a normalisation gain of at most this: real ones are O(1).
IMAGE_GAIN_BOUND = 2.0**16


def image_latent_problems(image_mean: torch.Tensor, image_logvar: torch.Tensor | None, mean: torch.Tensor,
                          label: str) -> list[str]:
    """Why a sample's stored image-to-video conditioning (`--image-latents`) cannot be used; [] if it can.

    `image_mean` must be [C, 1, H, W] (CogVideoX: the first frame alone) or [C, T, H, W] (Wan: the first frame and
    zero frames encoded as one clip), with C, T, H, W those of the sample's `mean`; `image_logvar`, when stored, the
    same shape. Both finite, logvar within [LOGVAR_MIN, LOGVAR_MAX], and mean + NOISE_BOUND * std small enough that
    a normalisation gain up to IMAGE_GAIN_BOUND stays inside float32.
    """
    tensors = {"image_mean": image_mean} if image_logvar is None else {"image_mean": image_mean,
                                                                         "image_logvar": image_logvar}
    bad = [f"{label} {name} is {t.dtype}, expected float16, bfloat16 or float32" for name, t in tensors.items()
           if t.dtype not in LATENT_DTYPES]
    if bad:
        return bad
    c, t, h, w = mean.shape if mean.ndim == 4 else (None,) * 4
    allowed = [[c, 1, h, w], [c, t, h, w]]
    for name, x in tensors.items():
        if list(x.shape) not in allowed:
            return [f"{label} {name} is {list(x.shape)}, expected {allowed[0]} or {allowed[1]} (the latents are "
                    f"{list(mean.shape)})"]
    if image_logvar is not None and image_logvar.shape != image_mean.shape:
        return [f"{label} image_logvar is {list(image_logvar.shape)} but image_mean {list(image_mean.shape)}"]
    ranges = {}
    for name, x in tensors.items():
        low, high = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(low) and math.isfinite(high)):
            count = int((~torch.isfinite(x)).sum())
            return [f"{label} {name} has {count} NaN/Inf value(s); re-encode it (in fp32: --dtype fp32)"]
        ranges[name] = low, high
    reach = max(-ranges["image_mean"][0], ranges["image_mean"][1])
    if "image_logvar" in ranges:
        low, high = ranges["image_logvar"]
        if low < LOGVAR_MIN or high > LOGVAR_MAX:
            return [f"{label} image_logvar spans {low:g}..{high:g}, outside [{LOGVAR_MIN:g}, {LOGVAR_MAX:g}]: not a "
                    "VAE's posterior"]
        reach += NOISE_BOUND * math.exp(0.5 * high)
    if reach * IMAGE_GAIN_BOUND > FLOAT32_MAX:
        return [f"{label} image_mean reaches {reach:.3g}: not a VAE's latents (normalised, it could overflow "
                "float32)"]
    return []
