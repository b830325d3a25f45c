"""LatentShardDataset against reading the same tar bytes raw, and against a folder of per-clip `.pt` files.

    python bench/stream.py                    # 96 samples of a 49x480x720 CogVideoX latent (16x13x60x90, fp16)
    python bench/stream.py --samples 256 --workers 2

Every reader goes through the same data once from a warm page cache; the ratio to the raw tar read is the cost of
decoding safetensors, sampling the posterior and normalising (target >= 0.8x).

The "streamed" rows are the reading before issue 12, kept here to measure against in the same run: the tar was
hashed while its samples were already being handed out (a changed shard delivered its samples, then raised), and
no per-sample latent check ran. `read_shard` now reads a shard into memory once, hashes it and counts its samples
before the first one leaves, and every sample passes `checks.latent_problems`.

Before timing, one pass of each dataset row checks that it reads what its label says (`check_rows`): an "old read" row
reads every shard through `streamed_read_shard` and none through today's `read_shard`, a "no latent check" row runs
no latent check, and every other row reads today's way with the check.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import latentcache.train.dataset as dataset_module  # noqa: E402
import latentcache.train.decoder as decoder_module  # noqa: E402
from latentcache import LatentShardDataset, ShardFormatError  # noqa: E402
from latentcache.format.manifest import Manifest, ShardEntry, write_manifest
from latentcache.format.out_layout import shard_name
from latentcache.format.reader import TarStats, iter_tar
from latentcache.format.shards import EncodedClip, write_shard  # noqa: E402
from latentcache.train.decoder import SampleDecoder  # noqa: E402
from latentcache.train.shard_sources import ShardRef, open_url, read_shard  # noqa: E402

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
        relpath = shard_name("49x480x720", shard_id)
        record = write_shard(root / relpath, clips)
        shards.append(ShardEntry(relpath, "49x480x720", record["samples"], record["bytes"], record["sha256"]))
    write_manifest(root, Manifest(
        latent_spec={"family": "cogvideox", "channels": 16, "temporal_compression": 4, "spatial_compression": 8,
                     "scaling_factor": 1.15258426},
        vae={"class_name": "AutoencoderKLCogVideoX"},
        counts={"samples": samples, "shards": len(shards)},
        shards=tuple(shards),
    ))


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


def streamed_read_shard(shard: ShardRef, *, check_sha256: bool = True, buffer: bytearray | None = None,
                        data: memoryview | None = None):
    """The reading before issue 12: samples leave while the tar streams; count and sha256 are checked at the end.
    `read_shard`'s signature; `buffer` and `data` go unused, as before issue 12 (local shards only: `data` is None)."""
    stats = TarStats()
    with open_url(shard.url) as stream:
        yield from iter_tar(stream, shard.url, stats, sha256=check_sha256 and bool(shard.sha256))
    if stats.samples != shard.samples or (check_sha256 and shard.sha256 and stats.sha256 != shard.sha256):
        raise ShardFormatError(f"{shard.url}: count or sha256 mismatch")


class StreamedDataset(LatentShardDataset):
    """LatentShardDataset reading shards the old way, and (with `latent_check=False`) without the latent check."""

    def __init__(self, *args, latent_check: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.latent_check = latent_check
        self.old_reads = 0  # shards read through `_read`, in this process (check_rows)
        if not latent_check:
            d = self.decoder
            self.decoder = UncheckedDecoder(d.spec, sample_posterior=d.sample_posterior, normalize=d.normalize,
                                            layout=d.layout, dtype=d.dtype, seed=d.seed)

    def _read(self, shard: ShardRef, *, check_sha256: bool = True, buffer: bytearray | None = None,
              data: memoryview | None = None):
        self.old_reads += 1
        return streamed_read_shard(shard, check_sha256=check_sha256, buffer=buffer, data=data)

    def iter_slot(self, slot, skip: int = 0):
        # The dataset reads each shard through the module-level `read_shard` it imported (there is no read method to
        # override since train/ was split): this pass points that name at the old read, and back when it ends.
        today = dataset_module.read_shard
        dataset_module.read_shard = self._read
        try:
            yield from super().iter_slot(slot, skip)
        finally:
            dataset_module.read_shard = today


class UncheckedDecoder(SampleDecoder):
    """The decoder without the per-sample latent check (`checks.latent_problems`), as before issue 12."""

    def latents(self, sample, epoch):
        check, decoder_module.latent_problems = decoder_module.latent_problems, lambda *a: []
        try:
            return super().latents(sample, epoch)
        finally:
            decoder_module.latent_problems = check


def raw_tar_reader(urls: list[str]):
    return wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples())


def dataset_rows(root: Path) -> list[tuple[str, LatentShardDataset]]:
    """(label, dataset) of the dataset rows; "  same, ..." is the row above read another way."""
    no_sha = {"sample_posterior": False, "check_sha256": False}
    mean = {"sample_posterior": False}
    old = {"latent_check": False}
    return [(label, cls(root, **kwargs)) for label, cls, kwargs in [
        ("LatentShardDataset mean, no sha256", LatentShardDataset, no_sha),
        ("  same, old read", StreamedDataset, no_sha),
        ("  same, old read, no latent check", StreamedDataset, {**no_sha, **old}),
        ("LatentShardDataset mean", LatentShardDataset, mean),
        ("  same, old read", StreamedDataset, mean),
        ("  same, old read, no latent check", StreamedDataset, {**mean, **old}),
        ("LatentShardDataset posterior sample", LatentShardDataset, {}),
        ("  same, old read, no latent check", StreamedDataset, old),
        ("LatentShardDataset batch 8", LatentShardDataset, {"batch_size": 8})]]


def check_rows(rows: list[tuple[str, LatentShardDataset]], shards: int) -> str:
    """One untimed pass of each dataset row in this process, counting the shard reads of each kind and the latent
    checks: a row must read what its label says (an "old read" row every shard the old way and none through today's
    `read_shard`, the others the reverse; a "no latent check" row no check, the others one per sample), else this
    raises. The timed passes then run the same datasets (in workers too: the routing lives in the dataset)."""
    calls = collections.Counter()

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    saved = dataset_module.read_shard, decoder_module.latent_problems
    dataset_module.read_shard = counting("today", saved[0])
    decoder_module.latent_problems = counting("check", saved[1])
    try:
        for label, dataset in rows:
            calls.clear()
            old_before = getattr(dataset, "old_reads", 0)
            samples = sum(len(item["key"]) if dataset.batch_size else 1 for item in dataset)
            seen = {"old": getattr(dataset, "old_reads", 0) - old_before, "today": calls["today"],
                    "check": calls["check"]}
            want = {"old": shards if "old read" in label else 0, "today": 0 if "old read" in label else shards,
                    "check": 0 if "no latent check" in label else samples}
            if seen != want:
                raise AssertionError(f"row {label.strip()!r} does not read what its label says: {seen}, "
                                     f"expected {want}")
    finally:
        dataset_module.read_shard, decoder_module.latent_problems = saved
    old_rows = sum("old read" in label for label, _ in rows)
    return (f"checked: {old_rows} \"old read\" rows read each of the {shards} shards the old way, the other "
            f"{len(rows) - old_rows} rows today's way; \"no latent check\" rows run no latent check")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes per row; the best counts")
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

        raw_iterate = loader(raw_tar_reader(urls)) if args.workers else lambda: raw_tar_reader(urls)
        for _ in range(2):  # the first pass warms the page cache for everyone
            raw = timed("raw", args.samples, raw_iterate)
        pt_files = sorted((Path(tmp) / "pt").glob("*.pt"))
        shards = LatentShardDataset(root).shards
        reused = bytearray()
        readers = [
            ("per-clip .pt (torch.load)", lambda: (torch.load(p) for p in pt_files), 1),
            ("shard bytes: streamed, sha256 after (old)",
             lambda: (r for s in shards for r in streamed_read_shard(s)), 1),
            ("shard bytes: in memory, sha256 first", lambda: (r for s in shards for r in read_shard(s)), 1),
            ("  same, one buffer reused", lambda: (r for s in shards for r in read_shard(s, buffer=reused)), 1),
        ]
        rows = dataset_rows(root)
        print(check_rows(rows, len(shards)))
        readers += [(label, loader(dataset), dataset.batch_size or 1) for label, dataset in rows]
        # Rows interleaved, best of --repeats: a shared machine's load then hits every row alike.
        best = [0.0] * len(readers)
        for _ in range(args.repeats):
            raw = max(raw, timed("raw", args.samples, raw_iterate))
            for i, (label, iterate, per_item) in enumerate(readers):
                best[i] = max(best[i], timed(label, -(-args.samples // per_item), iterate) * per_item)
        for label, rate in [("raw tar bytes", raw), *zip([r[0] for r in readers], best, strict=True)]:
            print(f"{label:42s} {rate:9.1f} samples/s   {rate / raw:5.2f}x raw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
