"""Object storage against local files on the same machine: decoding videos, and streaming latent shards.

    python bench/s3.py                                  # a local S3 API server (moto) on 127.0.0.1
    python bench/s3.py --videos 16 --samples 96 --workers 2
    AWS_ENDPOINT_URL=... python bench/s3.py --bucket my-bench-bucket   # a real endpoint, credentials from the env

The server runs in its own process. Two rows, each S3 against the same bytes read from local files (warm page
cache), with the same workers:
- decode: `ClipStream` (the encode stage's prefetched decoding) over clips of h264 videos, by path vs by s3:// url.
  PyAV reads the url through a seekable file object (range requests, `location.open_url`); nothing is downloaded.
- stream: `LatentShardDataset` over a dataset directory vs the same dataset uploaded to s3://. Remote shards are
  fetched `dataset.PREFETCH_SHARDS` ahead in threads while the current one is decoded.
Target: S3 >= 0.8x local. Needs `pip install 'latentcache[s3]' 'moto[server]'` (both in the test extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentcache.encode.chunk_plan import PlannedClip, clip_key  # noqa: E402
from latentcache.encode.decoding.loader import ClipStream  # noqa: E402
from latentcache.encode.settings import ClipSettings  # noqa: E402
from latentcache.tools.synthetic import write_video  # noqa: E402
from latentcache.train.dataset import LatentShardDataset  # noqa: E402


def start_local_s3() -> subprocess.Popen:
    """moto's S3 server (`moto_server`) in its own process on 127.0.0.1 and a free port, as a real endpoint would be
    (in a thread of this process it would take the GIL from the readers it serves), with dummy credentials."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start; pip install 'moto[server]'") from None
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an earlier run's instance would still talk to its old endpoint
    return server


def upload(local: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.pipe_file(f"{url.removeprefix('s3://')}/{f.relative_to(local).as_posix()}", f.read_bytes())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), 0 where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


SERVER: dict[str, int] = {}


def _server_share(run) -> tuple[float, float]:
    """(wall seconds, the local server's CPU seconds) of one run: what the server costs the shared cores."""
    pid = SERVER.get("pid")
    before = _cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    return wall, (_cpu_seconds(pid) - before) if pid else 0.0


def _best(run, repeat: int) -> float:
    """Seconds of the fastest of `repeat` runs (the first also warms caches and connections)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def bench_decode(tmp: Path, bucket: str, args: argparse.Namespace) -> tuple[float, float]:
    folder = tmp / "videos"
    folder.mkdir()
    for i in range(args.videos):
        write_video(folder / f"v{i:03d}", codec="h264", num_frames=args.video_frames, height=args.height,
                    width=args.width, fps=24)
    files = sorted(folder.iterdir())
    url = f"s3://{bucket}/videos"
    upload(folder, url)
    clip = ClipSettings(frames=args.frames, fps=24.0, height=args.height, width=args.width)
    bucket_name = f"{args.frames}x{args.height}x{args.width}"

    def clips(paths: list[str]) -> list[PlannedClip]:
        return [PlannedClip(clip_key(Path(p).name, 0), p, Path(p).name, 0, 0.0, bucket_name, None) for p in paths]

    def run(paths: list[str], workers: int) -> None:
        for _, result in ClipStream(clips(paths), clip, workers=workers):
            assert not isinstance(result, Exception), result

    local = _best(lambda: run([str(f) for f in files], args.workers), args.repeat)
    remote = _best(lambda: run([f"{url}/{f.name}" for f in files], args.s3_workers), args.repeat)
    wall, cpu = _server_share(lambda: run([f"{url}/{f.name}" for f in files], args.s3_workers))
    print(f"  (decode: the local S3 server used {cpu:.2f} CPU s in a {wall:.2f} s S3 pass)")
    return len(files) / local, len(files) / remote


def bench_stream(tmp: Path, bucket: str, args: argparse.Namespace) -> tuple[float, float]:
    spec = importlib.util.spec_from_file_location("bench_stream", Path(__file__).with_name("stream.py"))
    stream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stream)
    root = tmp / "latents"
    stream.make_dataset(root, args.samples, args.per_shard, store_logvar=True)
    url = f"s3://{bucket}/latents"
    upload(root, url)

    def run(source: str) -> None:
        n = sum(1 for _ in LatentShardDataset(source, shuffle=False, batch_size=None))
        assert n == args.samples

    local = _best(lambda: run(str(root)), args.repeat)
    remote = _best(lambda: run(url), args.repeat)
    wall, cpu = _server_share(lambda: run(url))
    print(f"  (stream: the local S3 server used {cpu:.2f} CPU s in a {wall:.2f} s S3 pass)")
    return args.samples / local, args.samples / remote


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bucket", default=None, help="an existing bucket at AWS_ENDPOINT_URL (default: a local server)")
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--video-frames", type=int, default=72)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--workers", type=int, default=2, help="decode workers, the same for local and S3")
    p.add_argument("--s3-workers", type=int, default=None, help="decode workers reading from S3 (default: --workers); "
                   "more than the cores hides request latency")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    args.s3_workers = args.workers if args.s3_workers is None else args.s3_workers
    server = start_local_s3() if args.bucket is None else None
    if server is not None:
        SERVER["pid"] = server.pid
    bucket = args.bucket or "latentcache-bench"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local, remote = bench_decode(Path(tmp), bucket, args)
            print(f"decode {args.videos} clips of {args.frames}x{args.height}x{args.width}, {args.workers} workers "
                  f"({args.s3_workers} for S3): "
                  f"local {local:.2f} clips/s, S3 {remote:.2f} clips/s   S3/local {remote / local:.2f}x")
            local, remote = bench_stream(Path(tmp), bucket, args)
            print(f"stream {args.samples} samples in shards of {args.per_shard}: local {local:.1f} samples/s, "
                  f"S3 {remote:.1f} samples/s   S3/local {remote / local:.2f}x")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
