"""What recording the VAE's weights costs: sha256 of a local weights file per GB, and a hub cache file (free).

A local `--vae DIR` is hashed once per load (every process that loads it); a hub id resolved from the Hugging Face
cache costs nothing, its files being links to blobs named by their sha256. Writes a file of random bytes the size
of a VAE's weights, then times `latentcache.encode.models.provenance.file_sha256` on it, and on the same file as a
cache link.

    python bench/provenance.py                 # 1 GB
    python bench/provenance.py --mb 256 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from latentcache.encode.models.provenance import file_sha256


def write_random(path: Path, mb: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mb):
            # Vary each MiB so no layer below can deduplicate or compress the file away.
            f.write(i.to_bytes(8, "little") + chunk[8:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=1024, help="size of the weights file in MiB (default 1024)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs (the first may read from disk, later from cache)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the file (default: a temporary folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        local = Path(tmp) / "diffusion_pytorch_model.safetensors"
        write_random(local, args.mb)
        gb = local.stat().st_size / 1e9
        digest = None
        for run in range(args.repeat):
            started = time.perf_counter()
            digest, hashed = file_sha256(local)
            seconds = time.perf_counter() - started
            print(f"local file, run {run + 1}: {hashed / 1e9:.3f} GB hashed in {seconds:.2f}s: {seconds / gb:.2f} s/GB "
                  f"({gb / seconds:.2f} GB/s)")
        # The HF cache layout: snapshots/<commit>/vae/<file> -> ../../../blobs/<sha256>.
        blobs = Path(tmp) / "blobs"
        blobs.mkdir()
        blob = blobs / digest
        os.replace(local, blob)
        link = Path(tmp) / "snapshots" / ("0" * 40) / "vae" / local.name
        link.parent.mkdir(parents=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        started = time.perf_counter()
        cached, hashed = file_sha256(link)
        seconds = time.perf_counter() - started
        assert cached == digest and hashed == 0
        print(f"hub cache link: {hashed} bytes hashed, {seconds * 1e6:.0f} us (sha256 read off the blob name)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
