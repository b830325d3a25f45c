"""Shared fixtures: real videos written once per session with PyAV's encoders, and the tiny random VAE."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentcache.settings import ClipSettings, EncodeSettings, VAESettings
from latentcache.synthetic import write_video

# Small enough for a 2-core CI machine, real enough to exercise codecs, seeking and the VAE's shape rules.
TINY_CLIP = ClipSettings(frames=17, fps=8.0, height=64, width=96)
TINY_VAE = VAESettings(source="tiny-random-cogvideox", subfolder=None)


def tiny_settings(**overrides) -> EncodeSettings:
    return EncodeSettings(clip=overrides.pop("clip", TINY_CLIP), vae=overrides.pop("vae", TINY_VAE), **overrides)


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixed mp4/webm folder: 3 s at 24 fps, 96x128 and bigger, one with a caption sidecar."""
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "a_h264", codec="h264", num_frames=72, height=96, width=128)
    write_video(d / "b_vp9", codec="vp9", num_frames=72, height=96, width=128)
    write_video(d / "c_h264", codec="h264", num_frames=90, height=120, width=160, fps=30)
    (d / "sub").mkdir()
    write_video(d / "sub" / "d_vp9", codec="vp9", num_frames=60, height=96, width=128, fps=20)
    (d / "a_h264.txt").write_text("a red square crosses the frame", encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tiny_vae():
    from latentcache.vae import load_vae

    return load_vae(TINY_VAE, "cpu")
