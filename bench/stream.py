"""LatentShardDataset against reading the same tar bytes raw, and against a folder of per-clip `.pt` files.

    python bench/stream.py                    # 96 samples of a 49x480x720 CogVideoX latent (16x13x60x90, fp16)
    python bench/stream.py --samples 256 --workers 2

Every reader goes through the same data once from a warm page cache; the ratio to the raw tar read is the cost of
decoding safetensors, sampling the posterior and normalising (target >= 0.8x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentcache import LatentShardDataset  # noqa: E402
from latentcache.shards import EncodedClip, write_manifest, write_shard  # noqa: E402

SHAPE = (16, 13, 60, 90)  # CogVideoX latent of a 49x480x720 clip


def make_dataset(root: Path, samples: int, per_shard: int, store_logvar: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    shards = []
    for shard_id, start in enumerate(range(0, samples, per_shard)):
        clips = []
        for i in range(start, min(start + per_shard, samples)):
            mean = torch.randn(SHAPE, generator=gen).half()
            logvar = (torch.randn(SHAPE, generator=gen) - 4).half() if store_logvar else None
            clips.append(EncodedClip(f"clip{i:06d}", mean, logvar, {"frames": 49}))
        path = root / "shards" / "49x480x720" / f"{shard_id:06d}.tar"
        record = write_shard(path, clips)
        shards.append({"path": str(path.relative_to(root)), "bucket": "49x480x720", "samples": record["samples"],
                       "bytes": record["bytes"], "sha256": record["sha256"]})
    write_manifest(root, {
        "latent_spec": {"family": "cogvideox", "channels": 16, "temporal_compression": 4, "spatial_compression": 8,
                        "scaling_factor": 1.15258426},
        "vae": {"class_name": "AutoencoderKLCogVideoX"},
        "counts": {"samples": samples, "shards": len(shards)},
        "shards": shards,
    })


def make_pt_folder(root: Path, folder: Path) -> None:
    """The format peers write: one torch.save per clip."""
    folder.mkdir()
    for s in LatentShardDataset(root, sample_posterior=False, normalize=False, dtype=torch.float16):
        torch.save({"latents": s["latents"]}, folder / f"{s['key']}.pt")


def timed(label: str, n_expected: int, iterate) -> float:
    started = time.perf_counter()
    n = sum(1 for _ in iterate())
    seconds = time.perf_counter() - started
    assert n == n_expected, (label, n, n_expected)
    return n / seconds


def raw_tar_reader(urls: list[str]):
    return wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "latents"
        make_dataset(root, args.samples, args.per_shard, store_logvar=True)
        make_pt_folder(root, Path(tmp) / "pt")
        urls = sorted(str(p) for p in (root / "shards").rglob("*.tar"))
        size = sum(Path(u).stat().st_size for u in urls)
        print(f"{args.samples} samples of {SHAPE} fp16 posterior, {size / args.samples / 1e6:.2f} MB/sample, "
              f"{len(urls)} shards, workers {args.workers}")

        def loader(dataset):
            return lambda: DataLoader(dataset, batch_size=None, num_workers=args.workers)

        for _ in range(2):  # the first pass warms the page cache for everyone
            raw = timed("raw", args.samples, loader(raw_tar_reader(urls)) if args.workers else
                        lambda: raw_tar_reader(urls))
        pt_files = sorted((Path(tmp) / "pt").glob("*.pt"))
        pt = timed("pt", args.samples, lambda: (torch.load(p) for p in pt_files))
        results = {"raw tar bytes": raw, "per-clip .pt (torch.load)": pt}
        no_sha = {"sample_posterior": False, "check_sha256": False}
        for label, kwargs in [("LatentShardDataset mean, no sha256", no_sha),
                              ("LatentShardDataset mean", {"sample_posterior": False}),
                              ("LatentShardDataset posterior sample", {}),
                              ("LatentShardDataset batch 8", {"batch_size": 8})]:
            dataset = LatentShardDataset(root, **kwargs)
            per_item = kwargs.get("batch_size", 1)
            rate = timed(label, -(-args.samples // per_item), loader(dataset)) * per_item
            results[label] = rate
        for label, rate in results.items():
            print(f"{label:38s} {rate:9.1f} samples/s   {rate / raw:5.2f}x raw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
