"""The settings tree: the fingerprint of existing outputs never moves, runtime knobs stay outside it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from latentcache.encode.settings import (
    ClipSettings,
    EncodeSettings,
    JobSettings,
    RuntimeSettings,
    TextSettings,
    TilingSettings,
    VAESettings,
)
from latentcache.errors import ConfigError

# Computed with the settings code before the runtime knobs left EncodeSettings (device, batch_size, workers, compile,
# nvdec and strict then lived in it, set to non-defaults for FULL): plan.json files and manifests written then carry
# these, and a rerun must find the same fingerprint to resume them.
DEFAULT_FINGERPRINT = "85ae811b74fec402"
FULL_FINGERPRINT = "d6d64bb3713fcded"
FULL = EncodeSettings(
    clip=ClipSettings(frames=17, fps=8.0, height=64, width=96, strategy="uniform:3", resize="fit", short="pad", seed=3,
                      buckets=("64x96", "96x64"), frame_buckets=(9, 5), images=True),
    vae=VAESettings(source="tiny-random-wan", family="wan", subfolder=None, revision="abc", dtype="fp32",
                    tiling=TilingSettings(tile_height=64, tile_width=64, overlap=0.25), frame_chunk=8),
    samples_per_shard=2, text=TextSettings(source="x/y", max_length=77), store="mean", store_dtype="bf16",
)


def test_fingerprints_of_existing_outputs_are_unchanged():
    assert EncodeSettings().fingerprint() == DEFAULT_FINGERPRINT
    assert FULL.fingerprint() == FULL_FINGERPRINT
    # What plan.json and the manifest record: no runtime knob in it, keys in the same order as before.
    assert list(FULL.output_affecting()) == ["clip", "vae", "samples_per_shard", "text", "store", "store_dtype"]


def test_runtime_knobs_live_apart_from_what_is_fingerprinted():
    runtime = {f.name for f in dataclasses.fields(RuntimeSettings)}
    assert runtime == {"device", "batch_size", "workers", "compile", "nvdec", "strict", "decode_check", "cpu_threads"}
    assert not runtime & {f.name for f in dataclasses.fields(EncodeSettings)}
    fast = JobSettings(inputs=("v",), out=Path("o"), encode=FULL,
                       runtime=RuntimeSettings(device="cuda", batch_size=None, workers=0, compile=True, nvdec=True,
                                               strict=True, decode_check="off", cpu_threads=3))
    assert fast.encode.fingerprint() == FULL_FINGERPRINT


# Each value the CLI refuses, with its message: a settings record built by hand (a script, a test, the demo) is
# refused the same way, when it is made.
REFUSED: list[tuple[list[str], Callable[[], object], str]] = [
    (["--frames", "0"], lambda: ClipSettings(frames=0), "--frames must be at least 1, got 0"),
    (["--fps", "0"], lambda: ClipSettings(fps=0.0), "--fps must be positive, got 0.0"),
    (["--clips", "uniform:0"], lambda: ClipSettings(strategy="uniform:0"), "--clips 'uniform:0' is not one of"),
    (["--buckets", "wide"], lambda: ClipSettings(buckets=("wide",)), "--buckets 'wide': expected HEIGHTxWIDTH"),
    (["--frames", "17", "--frame-buckets", "21"], lambda: ClipSettings(frames=17, frame_buckets=(21,)),
     "--frame-buckets 21 is not between 1 and --frames 17"),
    (["--samples-per-shard", "0"], lambda: EncodeSettings(samples_per_shard=0),
     "--samples-per-shard must be at least 1, got 0"),
    (["--vae", "tiny-random-ltx", "--image-latents"],
     lambda: EncodeSettings(vae=VAESettings(source="tiny-random-ltx", family="ltx"), image_latents=True),
     "the ltx family's image-to-video conditioning is not cached"),
    (["--estimate", "2"], lambda: JobSettings(inputs=("in",), out=Path("out"), estimate=2),
     "--estimate goes with --dry-run"),
    (["--dry-run", "--estimate", "-1"], lambda: JobSettings(inputs=("in",), out=Path("out"), dry_run=True, estimate=-1),
     "--estimate must be 0 or more clips, got -1"),
    (["--workers", "-1"], lambda: RuntimeSettings(workers=-1), "--workers must be at least 0, got -1"),
    (["--chunk-size", "0"], lambda: JobSettings(inputs=("in",), out=Path("out"), chunk_size=0),
     "--chunk-size must be at least 1, got 0"),
]


@pytest.mark.parametrize(("argv", "build", "message"), REFUSED, ids=[" ".join(a) for a, _, _ in REFUSED])
def test_a_settings_record_refuses_what_the_cli_refuses_with_the_same_message(argv, build, message, tmp_path, capsys):
    from latentcache.cli import EXIT_USAGE, main

    with pytest.raises(ConfigError) as refused:
        build()
    assert message in str(refused.value)
    videos = tmp_path / "videos"
    videos.mkdir()
    vae = [] if "--vae" in argv else ["--vae", "tiny-random-cogvideox"]
    assert main(["encode", str(videos), "--out", str(tmp_path / "out"), *vae, "--device", "cpu", *argv]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_settings_made_from_valid_values_and_their_copies_for_each_bucket_are_accepted():
    from latentcache.encode.chunk_plan import clip_settings_for, plan_video
    from latentcache.encode.decoding.probing import VideoInfo

    clip = FULL.clip  # frames 17, frame buckets 9 and 5
    assert clip_settings_for("5x64x96", clip).frames == 5  # a bucket's decode settings, shorter than its fallbacks
    info = VideoInfo("v.mp4", duration=0.75, fps=8.0, width=96, height=64, rotation=0, codec="h264", size_bytes=1,
                     frames=6)
    assert plan_video(info, dataclasses.replace(clip, strategy="first", short="skip"))[0] == "5x64x96"
