"""StatefulLoader against torchdata's StatefulDataLoader over the same LatentShardDataset: resume exactness with
workers, and throughput, side by side.

    python bench/loader.py                         # 256 samples of 16x5x60x90 fp16 in shards of 16, 2 workers
    python bench/loader.py --samples 1024 --workers 4

Resume: one uninterrupted epoch, then an epoch stopped after --stop batches, its state_dict through JSON (a
checkpoint), a fresh dataset and loader, load_state_dict, the rest. Exact means the same keys in the same order and
bit-equal latents (the posterior noise too). Throughput: samples/s over a full epoch, best of --repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentcache import LatentShardDataset  # noqa: E402
from latentcache.tools.synthetic import write_latent_dataset  # noqa: E402
from latentcache.train.resume import StatefulLoader  # noqa: E402

SHAPE = (16, 5, 60, 90)  # CogVideoX latents of a 17x480x720 clip


def make_dataset(root: Path, samples: int, per_shard: int) -> None:
    # Posteriors of a realistic spread (log-variance around -4), as a VAE writes them.
    write_latent_dataset(root, samples, per_shard, SHAPE, logvar_shift=-4.0)


def loaders(workers: int):
    from torchdata.stateful_dataloader import StatefulDataLoader

    return {"latentcache StatefulLoader": lambda ds: StatefulLoader(ds, num_workers=workers),
            "torchdata StatefulDataLoader": lambda ds: StatefulDataLoader(ds, batch_size=None, num_workers=workers)}


def run(make_loader, make_dataset, stop: int | None, state: dict | None = None) -> tuple[list, dict | None]:
    loader = make_loader(make_dataset())
    if state is not None:
        loader.load_state_dict(state)
    items, saved = [], None
    for batch in loader:
        items.append((batch["key"], batch["latents"]))
        if stop is not None and len(items) == stop:
            saved = json.loads(json.dumps(loader.state_dict()))
            break
    return items, saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--stop", type=int, default=7, help="batches before the simulated crash")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root, args.samples, args.per_shard)

        def dataset() -> LatentShardDataset:
            ds = LatentShardDataset(root, batch_size=args.batch_size, shuffle=True, shuffle_buffer=8, seed=5)
            ds.set_epoch(1)
            return ds

        for name, make_loader in loaders(args.workers).items():
            full, _ = run(make_loader, dataset, None)
            head, state = run(make_loader, dataset, args.stop)
            rest, _ = run(make_loader, dataset, None, state)
            resumed = head + rest
            same_keys = [k for k, _ in resumed] == [k for k, _ in full]
            same_values = same_keys and all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, full, strict=True))
            replayed = len(resumed) - len(full)
            best = 0.0
            for _ in range(args.repeat):
                started = time.perf_counter()
                n = sum(len(b["key"]) for b in make_loader(dataset()))
                best = max(best, n / (time.perf_counter() - started))
            print(f"{name:30s} resume after {args.stop} batches: keys {'exact' if same_keys else 'DIFFER'}, latents "
                  f"{'bit-equal' if same_values else 'DIFFER'} ({len(resumed)} vs {len(full)} batches, "
                  f"{replayed:+d}); {best:7.0f} samples/s ({args.workers} workers, {args.samples} samples); "
                  f"state {len(json.dumps(state))} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
