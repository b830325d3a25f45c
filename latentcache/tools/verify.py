"""`latentcache verify` and `latentcache info`: is this dataset what its manifest says, before a GPU-week starts?

verify streams every shard once (one sequential read: the sha256 is computed from the same bytes the tar reader
sees), so its cost grows linearly with the data. It collects problems instead of stopping at the first, and
reports per-channel statistics of the latents as the trainer will see them (normalised once, from the manifest):
a standard deviation far from 1 says the scaling factor is wrong, or that the stored latents were already scaled.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentcache.encode.models.provenance import describe_software, describe_vae, software_differences
from latentcache.errors import LatentcacheError
from latentcache.format.checks import latent_problems, meta_problems
from latentcache.format.manifest import Manifest
from latentcache.format.out_layout import SHARD_SUFFIX, SHARDS_DIR
from latentcache.format.outcomes import manifest_counts
from latentcache.format.reader import decode_sample
from latentcache.format.spec import LatentSpec
from latentcache.storage import location
from latentcache.train.guard import bucket_latent_shape
from latentcache.train.shard_sources import ShardRef, read_shard, resolve_source

log = logging.getLogger(__name__)

# Scaled latents with a std outside this range are flagged: CogVideoX's factor is tuned for std ~ 1.
STD_RANGE = (0.5, 2.0)
MAX_LISTED = 20


@dataclass(slots=True)
class ChannelStats:
    """Per-channel statistics of the raw latents, summed in float64 so millions of samples add up without drift.

    Normalisation is affine per channel, so the statistics of the normalised latents follow from these at the end
    (`normalized`): no normalised copy of any sample is ever made.
    """

    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, channel_mean: torch.Tensor, channel_var: torch.Tensor, n: int) -> None:
        s = channel_mean.double() * n
        q = (channel_var.double() + channel_mean.double().square()) * n
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.count += n

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the raw (stored, unnormalised) posterior means."""
        stats = self.raw_mean_std()
        return ([], []) if stats is None else (stats[0].tolist(), stats[1].tolist())

    def raw_mean_std(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.count or self.total is None or self.squares is None:
            return None
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean.square()).clamp_min(0).sqrt()

    def normalized(self, spec: LatentSpec) -> tuple[list[float], list[float], float]:
        """Per-channel mean and std, and the overall std, of the latents as `spec.normalize` hands them over."""
        stats = self.raw_mean_std()
        if stats is None:
            return [], [], float("nan")
        mean, std = stats
        shaped = mean.view(-1, 1, 1, 1)
        norm_mean = spec.normalize(shaped).flatten()
        gain = (spec.normalize(shaped + 1.0) - spec.normalize(shaped)).flatten().abs()
        norm_std = std * gain
        overall = float((norm_std.square() + norm_mean.square()).mean() - norm_mean.mean().square()) ** 0.5
        return norm_mean.tolist(), norm_std.tolist(), overall


@dataclass(slots=True)
class VerifyReport:
    root: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: ChannelStats = field(default_factory=ChannelStats)
    buckets: dict[str, int] = field(default_factory=dict)
    spec: LatentSpec | None = None
    # The manifest's software records ("torch ... on cuda: ..."), one line each.
    software: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        gb = self.bytes / 1e9
        rate = f", {self.seconds / gb:.1f} s/GB" if gb > 1e-6 else ""
        out = [f"verify {self.root}: {self.samples} samples in {self.shards} shard(s), {_size(self.bytes)} read in "
               f"{self.seconds:.2f}s{rate}"]
        for bucket, n in sorted(self.buckets.items()):
            out.append(f"  bucket {bucket}: {n} samples")
        out += [f"  written by {line}" for line in self.software]
        if self.spec is not None and self.stats.count:
            means, stds, overall = self.stats.normalized(self.spec)
            out.append(f"  scaled latents (posterior mean, normalised once as the trainer sees them): std "
                       f"{overall:.3f}; per channel mean {_fmt(means)}")
            out.append(f"  per channel std {_fmt(stds, signed=False)}")
        out += [f"WARNING: {w}" for w in self.warnings]
        out += [f"PROBLEM: {p}" for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            out.append(f"... and {len(self.problems) - MAX_LISTED} more problem(s)")
        out.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return out


def _fmt(values: list[float], signed: bool = True) -> str:
    return "[" + " ".join(f"{v:+.2f}" if signed else f"{v:.2f}" for v in values) + "]"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


class _Checker:
    """Checks one sample at a time against the manifest and the samples seen before."""

    def __init__(self, spec: LatentSpec, report: VerifyReport) -> None:
        self.spec = spec
        self.report = report
        self.seen: dict[str, str] = {}

    def sample(self, raw: dict[str, Any], shard: ShardRef) -> None:
        where = shard.url
        try:
            sample = decode_sample(raw, where)
        except LatentcacheError as e:
            self.report.problems.append(str(e))
            return
        key = sample["key"]
        if key in self.seen:
            self.report.problems.append(f"{where}: key {key} also appears in {self.seen[key]}")
        self.seen[key] = where
        mean, logvar = sample["mean"], sample["logvar"]
        # The very check the dataset applies before a sample reaches the trainer: what passes here streams finite.
        problems = latent_problems(mean, logvar, self.spec, shard.bucket, f"{where}: {key}")
        if problems:
            self.report.problems += problems
            return
        self.report.problems += meta_problems(sample["meta"], shard.bucket, f"{where}: {key}")
        z = mean.float().flatten(1)
        var, channel_mean = torch.var_mean(z, dim=1, correction=0)
        self.report.stats.add(channel_mean, var, z.shape[1])
        self.report.buckets[shard.bucket] = self.report.buckets.get(shard.bucket, 0) + 1


def verify(root: str | os.PathLike, *, trainer_config: str | os.PathLike | list | None = None,
           check_sha256: bool = True) -> VerifyReport:
    """Read every shard of the dataset once and report what does not match the manifest."""
    started = time.perf_counter()
    manifest, mroot, shards = resolve_source(root)
    spec = LatentSpec.from_dict(manifest.latent_spec)
    report = VerifyReport(root=str(root), spec=spec)
    _check_software(manifest, report)
    checker = _Checker(spec, report)
    buffer = bytearray()  # one shard buffer for the whole pass, instead of fresh pages for every shard
    for shard in shards:
        report.shards += 1
        try:
            for raw in read_shard(shard, check_sha256=check_sha256, buffer=buffer):
                report.samples += 1
                checker.sample(raw, shard)
        except LatentcacheError as e:
            report.problems.append(str(e))
        except OSError as e:
            report.problems.append(f"{shard.url}: cannot read ({e}); is the dataset complete?")
        except Exception as e:  # a stranger's shard can break any parser: report it, keep verifying the rest
            report.problems.append(f"{shard.url}: does not read as a latentcache shard ({type(e).__name__}: {e})")
        else:
            report.bytes += _shard_bytes(shard)
    _check_totals(manifest, mroot, report)
    _check_stats(spec, report, bool(manifest.vae.get("random_weights")))
    if trainer_config is not None:
        from latentcache.train.trainer_config import config_problems, load_trainer_config

        paths = trainer_config if isinstance(trainer_config, list | tuple) else [trainer_config]
        report.problems += config_problems(load_trainer_config(*paths), manifest)
    report.seconds = time.perf_counter() - started
    return report


def _shard_bytes(shard: ShardRef) -> int:
    try:
        size = location.local_size(shard.url)
    except OSError:
        return 0
    # Not local: read whole and checked against the manifest's size already (asking the store would cost a request).
    return shard.bytes or 0 if size is None else size


def _check_totals(manifest: Manifest, root: Path | str, report: VerifyReport) -> None:
    if not any(s.samples for s in manifest.shards):
        report.problems.append(f"{root}: no samples in {len(manifest.shards)} shard(s): a trainer would run zero "
                               "steps on it (every input was skipped or failed: see its failures.jsonl)")
    if manifest.counts_problem(root):
        report.problems.append(manifest.counts_problem(root))
    listed = {s.path for s in manifest.shards}
    found = location.files_under(location.join(str(root), SHARDS_DIR), SHARD_SUFFIX) or []
    stray = [f"{SHARDS_DIR}/{name}" for name in found if f"{SHARDS_DIR}/{name}" not in listed]
    if stray:
        report.warnings.append(f"{len(stray)} shard(s) on disk are not in the manifest (e.g. {stray[0]}): left over "
                               "from another run? The dataset ignores them")


def _check_software(manifest: Manifest, report: VerifyReport) -> None:
    software = manifest.software or []
    report.software = [describe_software(s) for s in software]
    differences = software_differences(software)
    if differences:
        report.warnings.append(
            f"the shards were written by {sum(not s.get('unrecorded') for s in software)} different software or "
            f"device records ({differences}): "
            "latents agree byte for byte only within one (kernels round differently), so shards of one output may "
            "differ slightly in the last bits; re-encode them on one setup if that matters")


def _check_stats(spec: LatentSpec, report: VerifyReport, random_weights: bool = False) -> None:
    if not report.stats.count:
        return
    _, _, std = report.stats.normalized(spec)
    low, high = STD_RANGE
    if low <= std <= high:
        return
    suggestion = ""
    if spec.latents_std is None and spec.scaling_factor and std > 0:
        # With a scalar factor, the factor that would give std 1 is the current one divided by the std seen.
        suggestion = f" (a factor of {spec.scaling_factor / std:.4g} would give std 1)"
    report.warnings.append(
        f"scaled latents have std {std:.3f}, expected about 1: the normalisation in the manifest "
        f"({spec.describe_normalization()}) may be wrong for this VAE{suggestion}, or the stored latents were "
        "already scaled (the trainer would then scale them twice)"
        + ("; expected here: the VAE has random weights" if random_weights else ""))


# ---------------------------------------------------------------------------------------------------- info


def info_lines(root: str | os.PathLike) -> list[str]:
    """A short table of the dataset, from the manifest alone (no shard is read)."""
    manifest, mroot, shards = resolve_source(root)
    spec = LatentSpec.from_dict(manifest.latent_spec)
    vae = manifest.vae
    total = sum(s.bytes for s in manifest.shards)
    samples = sum(s.samples for s in manifest.shards)
    clip = manifest.clip
    rows = [
        ("dataset", str(mroot)),
        ("samples", f"{samples} in {len(manifest.shards)} shard(s)"),
        ("VAE", f"{vae.get('class_name')} from {vae.get('source')}"
                f"{' (random weights: demo only)' if vae.get('random_weights') else ''}, {manifest.dtype}"),
        ("VAE weights", describe_vae(vae)),
        ("latents", f"{spec.channels} channels, /{spec.temporal_compression} time, /{spec.spatial_compression} "
                    f"space, normalised as {spec.describe_normalization()}"),
        ("clips", f"{clip.get('frames')} frames at {clip.get('fps')} fps, {clip.get('resize')}"),
        ("size on disk", f"{_size(total)}, {_size(total / samples) if samples else '-'} per sample"),
    ]
    counted = manifest_counts(manifest.counts)
    for word, by_reason in (("skipped", counted.skipped), ("failed", counted.failed)):
        reasons = ", ".join(f"{k}: {n}" for k, n in by_reason.most_common())
        rows.append((word, f"{sum(by_reason.values())}" + (f" ({reasons})" if reasons else "")))
    rows += [("written by", describe_software(s)) for s in manifest.software or []]
    buckets = manifest.buckets or {}
    for bucket, n in sorted(buckets.items()):
        rows.append((f"bucket {bucket}", f"{n} samples, latents {list(bucket_latent_shape(spec, bucket))}"))
    width = max(len(k) for k, _ in rows)
    return [f"{k.ljust(width)}  {v}" for k, v in rows]
