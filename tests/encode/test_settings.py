"""The settings tree: the fingerprint of existing outputs never moves, runtime knobs stay outside it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from latentcache.encode.settings import (
    ClipSettings,
    EncodeSettings,
    JobSettings,
    RuntimeSettings,
    TextSettings,
    TilingSettings,
    VAESettings,
)

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
