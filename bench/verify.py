"""How long `latentcache verify` takes per GB, on a dataset of full-size CogVideoX latents.

Writes N samples of 49x480x720 clips' latents ([16, 13, 60, 90] mean + logvar, fp16 by default: 4.5 MB a sample)
with the real shard writer and manifest, then times `verify` (sha256, tar parsing, safetensors decoding, finiteness,
shape checks and per-channel statistics: everything it does on real data). Random values stand in for the VAE's
output: verify's cost does not depend on them, and encoding 300 MB of latents on a CPU would take an hour.

    python bench/verify.py --samples 80 --out /tmp/verify_bench      # ~360 MB
    python bench/verify.py --samples 80 --out /tmp/verify_bench --reuse   # time again without rewriting
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from latentcache.encode.settings import hash_json
from latentcache.format.manifest import Manifest, ShardEntry, write_manifest
from latentcache.format.out_layout import manifest_path, shard_name
from latentcache.format.shards import EncodedClip, write_shard
from latentcache.format.spec import LatentSpec
from latentcache.tools.verify import verify

BUCKET = "49x480x720"


def make_dataset(out: Path, samples: int, per_shard: int, dtype: torch.dtype) -> None:
    # THUDM/CogVideoX-2b's VAE: 16 channels, 4x time, 8x space, scaling factor from its config.json.
    spec = LatentSpec(family="cogvideox", channels=16, temporal_compression=4, spatial_compression=8,
                      scaling_factor=1.15258426)
    shape = spec.latent_shape(49, 480, 720)
    gen = torch.Generator().manual_seed(0)
    shards = []
    for shard_id, start in enumerate(range(0, samples, per_shard)):
        clips = []
        for i in range(start, min(start + per_shard, samples)):
            mean = (torch.randn(shape, generator=gen) / spec.scaling_factor).to(dtype)
            logvar = torch.full(shape, -6.0, dtype=dtype)
            clips.append(EncodedClip(f"bench{i:06d}_0000", mean, logvar, {"bucket": BUCKET, "frames": 49}))
        relpath = shard_name(BUCKET, shard_id)
        record = write_shard(out / relpath, clips)
        shards.append(ShardEntry(relpath, BUCKET, record["samples"], record["bytes"], record["sha256"]))
    identity = {"class_name": "AutoencoderKLCogVideoX", "source": "bench", "subfolder": None, "revision": None,
                "config_hash": hash_json(shape), "random_weights": True}
    write_manifest(out, Manifest(latent_spec=spec.to_dict(), vae=identity, dtype=str(dtype).split(".")[-1],
                                 settings={"clip": {"frames": 49, "height": 480, "width": 720, "fps": 8.0}},
                                 counts={"samples": samples, "shards": len(shards), "failures": 0},
                                 buckets={BUCKET: samples}, shards=tuple(shards)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/latentcache_verify_bench"))
    p.add_argument("--samples", type=int, default=80)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--reuse", action="store_true", help="time an existing --out again")
    p.add_argument("--repeat", type=int, default=2, help="timed runs (the first may read from disk, later from cache)")
    args = p.parse_args(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if not (args.reuse and manifest_path(args.out).is_file()):
        started = time.perf_counter()
        make_dataset(args.out, args.samples, args.per_shard, dtype)
        print(f"wrote {args.samples} samples to {args.out} in {time.perf_counter() - started:.1f}s")
    for run in range(args.repeat):
        report = verify(args.out)
        gb = report.bytes / 1e9
        print(f"run {run + 1}: {report.samples} samples, {gb:.3f} GB in {report.seconds:.2f}s: "
              f"{report.seconds / gb:.2f} s/GB ({gb / report.seconds:.2f} GB/s), ok={report.ok}")
        for line in report.lines()[1:]:
            if line.startswith(("PROBLEM", "FAILED")):
                print(line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
