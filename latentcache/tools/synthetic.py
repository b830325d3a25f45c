"""Real videos with moving content, written with PyAV's bundled encoders.

Used by `latentcache demo`, the tests and the benchmarks, so that nothing large is committed and every codec path
is exercised on real bitstreams. Each frame has a bright square moving left to right and a white marker in the
top-left corner, so a test can check order (the square moves with time) and orientation (where the marker is).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# codec -> (container suffix, pixel format, encoder options)
CODECS: dict[str, tuple[str, str, dict[str, str]]] = {
    "h264": (".mp4", "yuv420p", {"preset": "ultrafast"}),
    # ultrafast turns B-frames off; real cameras and encoders use them (decode order != presentation order).
    "h264_bframes": (".mp4", "yuv420p", {"preset": "ultrafast", "x264-params": "bframes=3:b-adapt=0"}),
    "h264_444": (".mp4", "yuv444p", {"preset": "ultrafast"}),
    "hevc": (".mp4", "yuv420p", {"preset": "ultrafast", "x265-params": "log-level=error"}),
    "hevc10": (".mp4", "yuv420p10le", {"preset": "ultrafast", "x265-params": "log-level=error"}),
    "vp9": (".webm", "yuv420p", {"deadline": "realtime", "cpu-used": "8"}),
    "av1": (".mkv", "yuv420p", {"preset": "12"}),
    "prores": (".mov", "yuv422p10le", {}),
    "mjpeg": (".avi", "yuvj420p", {}),
    "gif": (".gif", "rgb8", {}),
    "mpegts": (".ts", "yuv420p", {"preset": "ultrafast"}),
    "mpeg4": (".mp4", "yuv420p", {}),
}
_ENCODER = {
    "h264": "libx264",
    "h264_bframes": "libx264",
    "h264_444": "libx264",
    "hevc": "libx265",
    "hevc10": "libx265",
    "vp9": "libvpx-vp9",
    "av1": "libsvtav1",
    "prores": "prores_ks",
    "mjpeg": "mjpeg",
    "gif": "gif",
    "mpegts": "libx264",
    "mpeg4": "mpeg4",
}


def moving_frames(num_frames: int, height: int, width: int) -> Iterator[np.ndarray]:
    """RGB uint8 frames: a diagonal gradient, a square moving left to right, a marker in the top-left corner."""
    yy, xx = np.mgrid[0:height, 0:width]
    side = max(4, min(height, width) // 4)
    marker = max(2, min(height, width) // 8)
    for i in range(num_frames):
        frame = np.empty((height, width, 3), np.uint8)
        frame[..., 0] = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
        frame[..., 1] = ((yy + 3 * i) * 255 // max(height - 1, 1) % 256).astype(np.uint8)
        # A blue background the red square (255, 32, 32) cannot be mistaken for, whatever the codec does to colour.
        frame[..., 2] = 160
        x0, y0 = square_origin(i, num_frames, height, width)
        frame[y0 : y0 + side, x0 : x0 + side] = (255, 32, 32)
        frame[:marker, :marker] = 255
        yield frame


def square_origin(index: int, num_frames: int, height: int, width: int) -> tuple[int, int]:
    """Top-left (x, y) of the red square in frame `index`: tests compare decoded frames with where it should be."""
    side = max(4, min(height, width) // 4)
    return int((width - side) * (index / max(num_frames - 1, 1))), (height - side) // 2


def write_video(
    path: str | Path,
    *,
    codec: str = "h264",
    num_frames: int = 48,
    height: int = 96,
    width: int = 128,
    fps: int = 24,
    rotation: int = 0,
    pts: list[int] | None = None,
    audio_first: bool = False,
    gop: int | None = None,
    pixel_aspect: Fraction | None = None,
) -> Path:
    """Encode `num_frames` moving frames into `path` with a real codec; returns the path written.

    `pts`, when given, is one presentation time per frame in milliseconds, for irregular (VFR) timing.
    `rotation` is stored as display-matrix metadata (counter-clockwise degrees), as phones do.
    `pixel_aspect` stores non-square pixels (anamorphic DVD/broadcast sources): shown `width * pixel_aspect` wide.
    `gop` is the keyframe interval in frames (the encoder's default when None).
    """
    # SVT-AV1 prints a banner to stderr unless told to log errors only.
    os.environ.setdefault("SVT_LOG", "1")
    suffix, pix_fmt, options = CODECS[codec]
    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(suffix)
    fmt = "mpegts" if codec == "mpegts" else None
    with av.open(str(path), "w", format=fmt) as container:
        if audio_first:
            audio = container.add_stream("aac", rate=16000)
            audio.layout = "mono"
        stream = container.add_stream(_ENCODER[codec], rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        if pixel_aspect is not None:
            stream.codec_context.sample_aspect_ratio = pixel_aspect
        for i, rgb in enumerate(moving_frames(num_frames, height, width)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts is not None:
                frame.pts = pts[i]
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_first:
            _write_silence(container, audio, seconds=num_frames / fps)
    return path


def _write_silence(container: av.container.OutputContainer, audio, seconds: float) -> None:
    samples = int(seconds * audio.rate)
    chunk = 1024
    for start in range(0, samples, chunk):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, chunk), np.float32), format="fltp", layout="mono")
        frame.rate = audio.rate
        frame.pts = start
        for packet in audio.encode(frame):
            container.mux(packet)
    for packet in audio.encode():
        container.mux(packet)


def write_audio(path: str | Path, *, seconds: float = 2.0, cover: bool = False) -> Path:
    """An audio-only file: AAC in MP4, or with `cover` an MP3 with cover art, whose picture demuxes as a one-frame
    "video" stream (marked as an attached picture)."""
    path = Path(path)
    with av.open(str(path), "w", format="mp3" if cover else "mp4") as container:
        audio = container.add_stream("libmp3lame" if cover else "aac", rate=16000)
        audio.layout = "mono"
        if cover:
            picture = container.add_stream("mjpeg")
            picture.width, picture.height, picture.pix_fmt = 64, 64, "yuvj420p"
            picture.disposition = av.stream.Disposition.attached_pic
            rgb = next(moving_frames(1, 64, 64))
            for packet in [*picture.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")), *picture.encode()]:
                packet.pts = packet.dts = 0
                container.mux(packet)
        _write_silence(container, audio, seconds)
    return path


def corrupt_frame(src: str | Path, dst: str | Path, *, at: float, seed: int = 0) -> Path:
    """Copy a video, overwriting with random bytes the compressed frame shown at `at` seconds: what a bad download
    or a lossy broadcast does. The container structure is kept (MPEG-TS transport headers, the mp4/mkv index), so
    the demuxer does not notice; only the decoded pictures can tell.
    """
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        is_ts = container.format.name == "mpegts"
        packets = [(abs(float(p.pts * p.time_base) - t0 - at), p.pos, p.size) for p in container.demux(stream)
                   if p.pts is not None and p.pos is not None and p.pos >= 0]
    _, pos, size = min(packets)
    data = bytearray(Path(src).read_bytes())
    rng = np.random.default_rng(seed)
    if is_ts:
        # The payloads of four 188-byte transport packets, their 4-byte headers intact.
        for offset in range(pos, min(pos + 188 * 4, len(data) - 188), 188):
            data[offset + 4 : offset + 188] = rng.bytes(184)
    else:
        data[pos + size // 4 : pos + 3 * size // 4] = rng.bytes(3 * size // 4 - size // 4)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def damage_packet(src: str | Path, dst: str | Path, index: int, *, fraction: float = 0.05, seed: int = 0) -> Path:
    """Copy a video, overwriting with random bytes `fraction` of the payload of its `index`-th video packet (in file
    order): a contiguous run inside the packet, away from its first and last quarter, so the container and the
    packet's own framing (NAL length, tile sizes, frame header) stay intact and only the coded picture is damaged.
    Deterministic for a given file, index and seed.
    """
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        packets = [(p.pos, p.size) for p in container.demux(stream) if p.size]
    pos, size = packets[index]
    n = max(1, int(size * fraction))
    rng = np.random.default_rng([seed, index])
    offset = pos + int(rng.integers(size // 4, max(size // 4 + 1, 3 * size // 4 - n)))
    data = bytearray(Path(src).read_bytes())
    data[offset : offset + n] = rng.bytes(n)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def write_latent_dataset(root: Path, samples: int, per_shard: int, shape: tuple[int, ...] = (16, 5, 60, 90),
                         logvar_shift: float = 0.0) -> None:
    """A finished output of random fp16 CogVideoX posteriors (`shape` is a 17x480x720 clip's latent by default) in
    shards of `per_shard`, with its manifest: what the streaming benchmarks read, without encoding anything."""
    import torch

    from latentcache.format.manifest import Manifest, ShardEntry, write_manifest
    from latentcache.format.out_layout import shard_name
    from latentcache.format.shards import EncodedClip, write_shard

    gen = torch.Generator().manual_seed(0)
    shards = []
    for shard_id, start in enumerate(range(0, samples, per_shard)):
        clips = [EncodedClip(f"{i:016x}_0000", torch.randn(shape, generator=gen).half(),
                             (torch.randn(shape, generator=gen) + logvar_shift).half(), {"frames": 17})
                 for i in range(start, min(start + per_shard, samples))]
        path = Path(root) / shard_name("17x480x720", shard_id)
        record = write_shard(path, clips)
        shards.append(ShardEntry(path.relative_to(root).as_posix(), "17x480x720", record["samples"], record["bytes"],
                                 record["sha256"]))
    write_manifest(Path(root), Manifest(latent_spec={"family": "cogvideox", "channels": 16, "temporal_compression": 4,
                                                     "spatial_compression": 8, "scaling_factor": 1.15258426},
                                        vae={"class_name": "AutoencoderKLCogVideoX"},
                                        counts={"samples": samples, "shards": len(shards)}, shards=tuple(shards)))
