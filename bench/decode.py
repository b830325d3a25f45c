"""Seeking and decode speed: is a clip at minute 9 as cheap as one at minute 0, and how does latentcache's decode
compare with the ffmpeg command line doing the same seek + decode + scale into raw frames?

    pip install -e '.[bench]'      # imageio-ffmpeg: a static ffmpeg binary
    python bench/decode.py         # a 10-minute 426x240 h264 file, 49-frame clips at 8 fps, 192x320 crop
    python bench/decode.py --minutes 2 --clips 10 --video my.mp4

Prints ms per clip early and late in the file and their ratio (about 1 when seeking works), then clips/s of
latentcache (PyAV in process, frame threads) and of `ffmpeg -ss START -i FILE -vf fps,scale,crop -f rawvideo`
(a process per clip, as a shell loop or a subprocess-based loader does), and their ratio.

CPU seconds per clip (issue 22: what decoding costs per GPU), side by side in one run, clip by clip:

    python bench/decode.py --cpu --minutes 1 --size 1920x1080 --codec h264_bframes --height 480 --width 720
    python bench/decode.py --cpu --minutes 1 --size 1280x720 --codec hevc --height 480 --width 720

times (user+sys, `resource.getrusage`) six decodes of each clip from the middle of the file: latentcache as it was
(every frame from the seek point: `exhaustive=True`, FFmpeg's own thread count, a new array per clip), skipping the
frames no target shows, the same with a decode worker's threads (`--threads`, 1 by default: what each worker gets
when the workers fill the cores, `loader.decoder_threads`), that written into a reused buffer as a worker writes into
its frame ring slot, that with `--decode-check off`, and the ffmpeg CLI; and checks that all of latentcache's decodes
give bit-identical frames. The generated file is cached in the temp dir
(`latentcache-bench-decode/`), so a rerun does not encode it again.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentcache.encode.decoding.decode import decode_clip  # noqa: E402
from latentcache.encode.decoding.probing import probe  # noqa: E402
from latentcache.encode.settings import ClipSettings  # noqa: E402
from latentcache.tools.synthetic import write_video  # noqa: E402


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError:
        raise SystemExit("bench/decode.py compares with the ffmpeg binary of imageio-ffmpeg, which is not installed: "
                         "pip install -e '.[bench]'") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_clip(exe: str, path: Path, start: float, clip: ClipSettings) -> np.ndarray:
    """The same clip through the CLI: keyframe seek, decode, frames by timestamp at clip.fps, fill-scale + crop."""
    vf = (f"fps={clip.fps:g},scale={clip.width}:{clip.height}:force_original_aspect_ratio=increase:flags=area,"
          f"crop={clip.width}:{clip.height}")
    cmd = [exe, "-nostdin", "-v", "error", "-ss", f"{start:.6f}", "-i", str(path), "-vf", vf,
           "-frames:v", str(clip.frames), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(cmd, check=True, capture_output=True).stdout
    expected = clip.frames * clip.height * clip.width * 3
    if len(raw) != expected:
        raise RuntimeError(f"ffmpeg returned {len(raw)} bytes for the clip at {start:.2f}s, expected {expected}")
    return np.frombuffer(raw, np.uint8).reshape(clip.frames, clip.height, clip.width, 3)


def interleaved(path: Path, exe: str, starts: list[float], clip: ClipSettings) -> tuple[list[float], list[float], list]:
    """Seconds per clip for latentcache and for the CLI, alternating clip by clip so that the load of a shared
    machine falls on both alike."""
    ours, theirs, pairs = [], [], []
    for start in starts:
        began = time.perf_counter()
        decoded = decode_clip(path, start, clip)
        ours.append(time.perf_counter() - began)
        began = time.perf_counter()
        raw = ffmpeg_clip(exe, path, start, clip)
        theirs.append(time.perf_counter() - began)
        pairs.append((decoded, raw))
    return ours, theirs, pairs


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def cpu_compare(path: Path, exe: str, starts: list[float], clip: ClipSettings, threads: int) -> int:
    """CPU-s per clip of the six decodes, interleaved clip by clip; the frames of old and new must be identical."""
    # What a decode worker writes into: its frame ring slot, the same memory clip after clip (its pages mapped).
    slot = np.zeros(clip.frames * clip.height * clip.width * 3, np.uint8)
    kinds = {
        "before (every frame, FFmpeg's threads, check auto)": lambda s: decode_clip(path, s, clip, exhaustive=True),
        "       (skipping,    FFmpeg's threads, check auto)": lambda s: decode_clip(path, s, clip),
        f"       (skipping,    {threads} thread(s),     check auto, a new array)":
            lambda s: decode_clip(path, s, clip, threads=threads),
        f"after  (skipping,    {threads} thread(s),     check auto, into a slot)":
            lambda s: decode_clip(path, s, clip, threads=threads, out=slot),
        f"after  (skipping,    {threads} thread(s),     check off,  into a slot)":
            lambda s: decode_clip(path, s, clip, check="off", threads=threads, out=slot),
    }
    cpu = {name: [] for name in kinds} | {"ffmpeg CLI": []}
    decoded = {name: [] for name in kinds}
    identical = True
    for start in starts:
        frames = []
        for name, run in kinds.items():
            began = cpu_seconds(resource.RUSAGE_SELF)
            c = run(start)
            cpu[name].append(cpu_seconds(resource.RUSAGE_SELF) - began)
            decoded[name].append(c.meta["frames_decoded"])
            frames.append(c.frames.copy() if np.shares_memory(c.frames, slot) else c.frames)
        identical &= all(np.array_equal(frames[0], f) for f in frames[1:])
        began = cpu_seconds(resource.RUSAGE_CHILDREN)
        ffmpeg_clip(exe, path, start, clip)
        cpu["ffmpeg CLI"].append(cpu_seconds(resource.RUSAGE_CHILDREN) - began)
    for name, values in cpu.items():
        frames = f", {np.mean(decoded[name]):.0f} frames decoded per clip" if name in decoded else ""
        print(f"{name}: {np.mean(values):.2f} CPU-s per clip{frames}")
    print(f"sampled frames bit-identical, before vs after: {identical}")
    return 0 if identical else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--video", type=Path, default=None, help="use this file instead of generating one")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--size", default="426x240", help="generated video WxH")
    p.add_argument("--gop", type=int, default=None, help="keyframe interval in frames (default: x264's 250)")
    p.add_argument("--clips", type=int, default=20, help="clips per measurement")
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--codec", default="h264", help="synthetic.CODECS name of the generated file (h264_bframes, hevc)")
    p.add_argument("--threads", type=int, default=1, help="--cpu: decoder threads of the 'after' decodes")
    p.add_argument("--cpu", action="store_true", help="CPU-s per clip: before/after skipping, --decode-check off, "
                   "the ffmpeg CLI, on clips from the middle of the file (see the module docstring)")
    args = p.parse_args(argv)
    exe = ffmpeg_exe()
    clip = ClipSettings(frames=args.frames, fps=args.fps, height=args.height, width=args.width)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.video
        if path is None:
            w, h = (int(x) for x in args.size.split("x"))
            # Cached across runs: a minute of 1080p takes a while to encode on a small machine.
            cache = Path(tempfile.gettempdir()) / "latentcache-bench-decode" if args.cpu else Path(tmp)
            cache.mkdir(exist_ok=True)
            name = f"long_{args.codec}_{args.minutes:g}min_{w}x{h}_gop{args.gop or 250}".replace(".", "p")
            found = sorted(cache.glob(name + ".*"))
            began = time.perf_counter()
            path = found[0] if found else write_video(cache / name, codec=args.codec,
                                                      num_frames=int(args.minutes * 60 * 24), fps=24, height=h,
                                                      width=w, gop=args.gop)
            print(f"{'reused' if found else 'wrote'} {path}: {args.minutes:g} min, {w}x{h}, {args.codec} ultrafast, "
                  f"keyframe every {args.gop or 250} frames, in {time.perf_counter() - began:.1f}s")
        info = probe(path)
        if args.cpu:
            span = (clip.frames - 1) / clip.fps
            middle = (info.duration - span) / 2
            starts = [round(middle + 0.37 * i, 3) for i in range(args.clips)]
            print(f"{info.duration:.0f}s {info.codec} {info.width}x{info.height}; {args.clips} clips of {clip.frames} "
                  f"frames at {clip.fps:g} fps, {clip.height}x{clip.width}, from {middle:.1f}s; {os.cpu_count()} "
                  f"CPUs, load average {os.getloadavg()[0]:.1f}")
            decode_clip(path, starts[0], clip)  # warm up (page cache, codec init)
            return cpu_compare(path, exe, starts, clip, args.threads)
        span = (clip.frames - 1) / clip.fps
        rng = np.random.default_rng(0)
        # The first and the last minute (or each half of a shorter file) that a whole clip fits in.
        last_start = info.duration - span - 0.5
        window = min(60.0, last_start / 2)
        early = sorted(rng.uniform(0, window, args.clips).round(3).tolist())
        late = sorted(rng.uniform(last_start - window, last_start, args.clips).round(3).tolist())
        print(f"{info.duration:.0f}s {info.codec} {info.width}x{info.height} at {info.fps:g} fps; clips of "
              f"{clip.frames} frames at {clip.fps:g} fps, {clip.height}x{clip.width} crop; {args.clips} per timing; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

        decode_clip(path, early[0], clip)  # warm up (page cache, codec init)
        ffmpeg_clip(exe, path, early[0], clip)
        ours_early, cli_early, pairs = interleaved(path, exe, early, clip)
        ours_late, cli_late, late_pairs = interleaved(path, exe, late, clip)
        for name, e, la in (("latentcache", ours_early, ours_late), ("ffmpeg CLI ", cli_early, cli_late)):
            print(f"{name}: early (first minute) {1000 * np.mean(e):.1f} ms/clip, late (last minute) "
                  f"{1000 * np.mean(la):.1f} ms/clip; late/early = {np.mean(la) / np.mean(e):.2f}")
        work = [np.mean([c.meta["frames_decoded"] for c, _ in p]) for p in (pairs, late_pairs)]
        print(f"latentcache decoded {work[0]:.0f} source frames per early clip, {work[1]:.0f} per late clip (from the "
              "keyframe before the clip to its end, never from the start of the file)")
        ours = 1 / np.mean(ours_early + ours_late)
        theirs = 1 / np.mean(cli_early + cli_late)
        diff = np.mean([np.abs(c.frames.astype(int) - raw.astype(int)).mean() for c, raw in pairs])
        print(f"clips/s: latentcache {ours:.1f}, ffmpeg CLI {theirs:.1f}; latentcache/ffmpeg = {ours / theirs:.2f}x "
              f"(same clips: mean abs pixel difference {diff:.1f}/255)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
