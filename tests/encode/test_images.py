"""Images with videos (`--images`): real PNG/JPEG/WebP files become 1-frame samples in their own `1xHxW` bucket,
beside the videos of the same run, and stream out of LatentShardDataset bucket-pure with latent T=1."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP

from latentcache.cli import main
from latentcache.encode.decoding.decode import decode_clip
from latentcache.encode.decoding.image import ORIENTATIONS, exif_orientation
from latentcache.encode.decoding.probing import probe
from latentcache.encode.inputs import discover_inputs
from latentcache.encode.models.families import FAMILIES
from latentcache.encode.models.vae import load_vae
from latentcache.encode.settings import ClipSettings, VAESettings
from latentcache.errors import InputError
from latentcache.tools.synthetic import write_video
from latentcache.train.dataset import LatentShardDataset

Image = pytest.importorskip("PIL.Image")
ImageOps = pytest.importorskip("PIL.ImageOps")

CAPTION = "a red kite over a grey sea"
TINY = ["--vae", "tiny-random-cogvideox", "--device", "cpu", "--frames", "17", "--fps", "8", "--buckets",
        "64x96,96x64", "--short", "pad"]


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An asymmetric picture (a red block top-left on noise): every turn and mirror of it is distinct."""
    rgb = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    rgb[: height // 3, : width // 4] = (255, 0, 0)
    return rgb


def save(path: Path, rgb: np.ndarray, orientation: int | None = None, **kwargs) -> Path:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, exif=exif.tobytes(), **kwargs)
    return path


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two videos (landscape), a landscape PNG with a caption sidecar, a JPEG stored landscape but shown portrait
    (EXIF orientation 6, as phones save portrait shots), and a WebP."""
    d = tmp_path_factory.mktemp("mixed")
    write_video(d / "clip_a", codec="h264", num_frames=24, height=64, width=96, fps=8)
    write_video(d / "clip_b", codec="vp9", num_frames=24, height=64, width=96, fps=8)
    save(d / "kite.png", picture(120, 180))
    (d / "kite.txt").write_text(CAPTION, encoding="utf-8")
    save(d / "portrait.jpg", picture(96, 144, 1), orientation=6, quality=95)
    save(d / "wide.webp", picture(64, 96, 2), quality=90)
    return d


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_encodes_one_frame_to_one_latent_frame(family):
    vae = load_vae(VAESettings(source=f"tiny-random-{family}", family=family, subfolder=None), "cpu")
    mean, logvar = vae.encode(picture(64, 96)[None, None])
    assert mean.shape == logvar.shape == (1, *vae.spec.latent_shape(1, 64, 96))
    assert mean.shape[2] == 1 and torch.isfinite(mean).all()


def test_images_are_only_taken_when_asked_for(mixed_dir):
    names = {v.relpath for v in discover_inputs([mixed_dir])}
    assert names == {"clip_a.mp4", "clip_b.webm"}  # as before: images in a video folder are not even probed
    with_images = {v.relpath: v for v in discover_inputs([mixed_dir], images=True)}
    assert set(with_images) == names | {"kite.png", "portrait.jpg", "wide.webp"}
    assert with_images["kite.png"].caption == CAPTION  # image.txt, as for videos
    # Given explicitly, an image is probed (by content) and refused as not a video, unless --images.
    with pytest.raises(InputError, match=r"a still image \(\w+ format\), not a video"):
        probe(mixed_dir / "kite.png")
    with pytest.raises(InputError, match="a still image"):
        decode_clip(mixed_dir / "kite.png", 0.0, TINY_CLIP)
    info = probe(mixed_dir / "portrait.jpg", images=True)
    assert (info.source_kind, info.frames, info.width, info.height, info.rotation) == ("image", 1, 96, 144, 270)


def test_an_image_named_mp4_is_taken_by_content(mixed_dir, tmp_path):
    fake = tmp_path / "still.mp4"
    fake.write_bytes((mixed_dir / "kite.png").read_bytes())
    with pytest.raises(InputError, match="still image"):
        probe(fake)
    clip = decode_clip(fake, 0.0, dataclasses.replace(TINY_CLIP, frames=1, images=True))
    assert clip.frames.shape == (1, 64, 96, 3) and clip.meta["source_kind"] == "image"


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
@pytest.mark.parametrize("suffix", [".png", ".webp", ".jpg"])
def test_exif_orientation_is_shown_as_pillow_shows_it(tmp_path, orientation, suffix):
    stored = picture(24, 40, orientation)
    kwargs = {"lossless": True} if suffix == ".webp" else {"quality": 100} if suffix == ".jpg" else {}
    path = save(tmp_path / f"o{orientation}{suffix}", stored, orientation, **kwargs)
    assert exif_orientation(path) == orientation
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    h, w = want.shape[:2]
    # The displayed size as the target: no scaling, so the pixels compare directly.
    clip = decode_clip(path, 0.0, ClipSettings(frames=1, fps=8.0, height=h, width=w, images=True))
    got = clip.frames[0].astype(int)
    if suffix == ".jpg":
        # Lossy and chroma subsampled: the right transform is far nearer Pillow's picture than any other one.
        with Image.open(path) as im:
            raw = np.asarray(im.convert("RGB")).astype(int)
        errors = {o: np.abs(np.rot90(raw, turns)[:, ::-1] - want).mean() if mirror else
                  np.abs(np.rot90(raw, turns) - want).mean()
                  for o, (turns, mirror) in ORIENTATIONS.items() if np.rot90(raw, turns).shape == want.shape}
        assert errors[orientation] < 1e-9  # Pillow's transform is the table's
        wrong = min(np.abs(np.rot90(raw, t)[:, ::-1] - got).mean() if m else np.abs(np.rot90(raw, t) - got).mean()
                    for o, (t, m) in ORIENTATIONS.items() if o != orientation and np.rot90(raw, t).shape == got.shape)
        assert np.abs(got - want).mean() < wrong / 4, orientation
    else:
        np.testing.assert_array_equal(got, want)
    assert clip.meta["exif_orientation"] == orientation
    assert clip.meta["mirrored"] == (orientation in (2, 4, 5, 7))


def test_no_exif_is_upright(mixed_dir):
    assert exif_orientation(mixed_dir / "kite.png") is None
    clip = decode_clip(mixed_dir / "kite.png", 0.0, ClipSettings(frames=1, height=64, width=96, images=True))
    assert clip.meta["rotation_applied"] == 0 and clip.meta["exif_orientation"] is None
    # crop: 120x180 scaled to 64x96 exactly, red block top-left
    assert clip.meta["box"] == [0, 0, 96, 64] and clip.frames[0, 5, 5, 0] > 200 and clip.frames[0, 5, 5, 1] < 60


def test_images_and_videos_in_one_run_and_one_dataset(mixed_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["encode", str(mixed_dir), "--out", str(out), "--images", *TINY]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["settings"]["clip"]["images"] is True
    chunk_clips = [c for f in sorted((out / "chunks").rglob("*.json")) for c in json.loads(f.read_text())["clips"]]
    buckets = {c["relpath"]: c["bucket"] for c in chunk_clips}
    assert buckets == {"clip_a.mp4": "17x64x96", "clip_b.webm": "17x64x96", "kite.png": "1x64x96",
                       "wide.webp": "1x64x96", "portrait.jpg": "1x96x64"}
    seen: dict[str, tuple[str, int]] = {}
    for batch in LatentShardDataset(out, batch_size=2):
        bucket = {m["bucket"] for m in batch["meta"]}
        assert len(bucket) == 1, bucket  # one bucket per batch
        (bucket,) = bucket
        frames, _, _ = (int(x) for x in bucket.split("x"))
        assert batch["latents"].shape[2] == (1 if frames == 1 else 5)  # 17 frames -> 5 latent frames; 1 -> 1
        for meta, caption in zip(batch["meta"], batch["caption"], strict=True):
            seen[meta["source"]] = (bucket, meta["frames"])
            if frames == 1:
                assert meta["source_kind"] == "image" and meta["frame_times"] == [0.0]
            else:
                assert "source_kind" not in meta  # video samples are written exactly as before
            if meta["source"] == "kite.png":
                assert caption == CAPTION and meta["caption_source"] == "given"
            if meta["source"] == "portrait.jpg":
                assert meta["rotation_applied"] == 270 and meta["source_width"] == 96
    assert seen == {"clip_a.mp4": ("17x64x96", 17), "clip_b.webm": ("17x64x96", 17), "kite.png": ("1x64x96", 1),
                    "wide.webp": ("1x64x96", 1), "portrait.jpg": ("1x96x64", 1)}
    # The setting is part of the fingerprint: the same folder without --images is another cache.
    code = main(["encode", str(mixed_dir), "--out", str(out), *TINY])
    assert code == 2


def test_an_image_that_does_not_decode_is_a_failure_naming_it(tmp_path):
    # Animated WebP opens as webp_pipe, but FFmpeg's WebP decoder takes still pictures only.
    frames = [Image.fromarray(np.full((32, 48, 3), 40 * i, np.uint8)) for i in range(3)]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(InputError, match="the image does not decode") as err:
        decode_clip(path, 0.0, ClipSettings(frames=1, height=32, width=48, images=True))
    assert err.value.path == str(path) and err.value.stage == "decode"


def test_images_off_keeps_the_fingerprint_of_caches_made_before_the_setting():
    from conftest import tiny_settings

    off, on = tiny_settings(), tiny_settings(clip=dataclasses.replace(TINY_CLIP, images=True))
    assert "images" not in off.output_affecting()["clip"]  # as plan.json files written before --images existed
    assert on.output_affecting()["clip"]["images"] is True and on.fingerprint() != off.fingerprint()


def _mirrored_png(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A PNG stored with EXIF orientation 2 (mirrored) and the picture Pillow shows for it."""
    path = save(tmp_path / "mirrored.png", picture(24, 40, 2), orientation=2)
    with Image.open(path) as im:
        return path, np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def test_a_mirrored_image_in_a_tar_is_shown_as_the_same_file_on_disk(tmp_path):
    """The EXIF orientation of a `tar::member` input is read through the source opener: a mirrored picture is
    mirrored, exactly as the local file (a plain open() of the member path failed, and it came out rotated 180)."""
    import tarfile

    path, want = _mirrored_png(tmp_path)
    tar = tmp_path / "images.tar"
    with tarfile.open(tar, "w") as t:
        t.add(path, arcname="000001.png")
    member = f"{tar}::000001.png"
    assert exif_orientation(member) == 2
    clip = ClipSettings(frames=1, fps=8.0, height=want.shape[0], width=want.shape[1], images=True)
    local, inside = decode_clip(path, 0.0, clip), decode_clip(member, 0.0, clip)
    np.testing.assert_array_equal(local.frames[0], want)
    np.testing.assert_array_equal(inside.frames, local.frames)
    assert inside.meta["mirrored"] and inside.meta["exif_orientation"] == 2


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A real, valid 1-bit grayscale PNG of width x height, all black: a few tens of KB on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    """A 16000x16000 PNG that compresses to a few KB: refused before decoding (it would take ~1 GB), a failure
    naming the file, its size and the limit, in probe and decode, with or without --images. "Before decoding" is
    checked directly: FFmpeg never opens the file (a spy on `av.open`, which would otherwise demux and decode it)."""
    from latentcache.encode.decoding import video_file

    opened: list[object] = []
    real_open = video_file.av.open
    monkeypatch.setattr(video_file.av, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    path = _huge_png(tmp_path / "huge.png", 16000, 16000)
    assert path.stat().st_size < 1 << 20
    for call in (lambda: probe(path, images=True), lambda: probe(path),
                 lambda: decode_clip(path, 0.0, ClipSettings(frames=1, height=64, width=96, images=True))):
        with pytest.raises(InputError, match=r"16000x16000 PNG image: 256 megapixels, over the 100-megapixel") as e:
            call()
        assert e.value.path == str(path)
    assert opened == []
    from latentcache.encode.decoding.image import MAX_IMAGE_PIXELS

    assert MAX_IMAGE_PIXELS == 100_000_000
    # At the limit's edge: 10000x10000 passes the check (here 10000x100 stays cheap to decode).
    ok = _huge_png(tmp_path / "wide.png", 10000, 100)
    assert probe(ok, images=True).width == 10000


@pytest.mark.parametrize("fmt, kwargs", [("PNG", {}), ("JPEG", {"quality": 90}), ("JPEG", {"progressive": True}),
                                         ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80}), ("GIF", {}),
                                         ("BMP", {})])
def test_image_size_reads_each_header_as_pillow_does(tmp_path, fmt, kwargs):
    from latentcache.encode.decoding.image import image_size

    path = tmp_path / f"x.{fmt.lower()}"
    if fmt == "JPEG":  # behind an EXIF APP1 segment, as phones write them
        save(path, picture(37, 53), orientation=6, format=fmt, **kwargs)
    else:
        Image.fromarray(picture(37, 53)).save(path, format=fmt, **kwargs)
    with open(path, "rb") as f:
        kind, width, height = image_size(f)
    assert (kind.upper(), width, height) == (fmt, 53, 37)


def test_images_left_out_without_images_are_said_and_a_named_one_hints_images(tmp_path: Path, caplog) -> None:
    """A folder's pictures are not taken without --images: a warning says how many and the flag (the dry run's
    count was silently smaller than the folder's); a picture named on its own fails with the flag in its reason."""
    import logging

    from PIL import Image

    d = tmp_path / "mixed"
    d.mkdir()
    Image.new("RGB", (96, 64)).save(d / "a.jpg")
    Image.new("RGB", (96, 64)).save(d / "b.png")
    (d / "notes.txt").write_text("not an image", encoding="utf-8")
    write_video(d / "v", codec="h264", num_frames=24, height=64, width=96, fps=8)
    with caplog.at_level(logging.WARNING, logger="latentcache"):
        assert len(discover_inputs([d])) == 1
    assert f"{d}: 2 image file(s) not taken (pass --images to encode still images" in caplog.text
    with pytest.raises(InputError, match="a still image .*; pass --images to encode still images as 1-frame"):
        probe(str(d / "a.jpg"))
