"""A VAE whose config or weights cannot give usable latents is refused before anything is encoded: exit 2, naming
the file and the field, with no OUT made. Each case is a real tiny VAE saved by `save_pretrained` into a local
directory, then damaged the way a hand-edited or half-copied model folder is."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentcache.cli import main
from latentcache.encode.models.families import FAMILIES
from latentcache.encode.models.vae_checks import config_problems
from latentcache.tools.synthetic import write_video

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _cfg(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda config: config.update(values)


def _drop_tensor(folder: Path) -> None:
    weights = load_file(folder / WEIGHTS)
    weights.pop(sorted(weights)[0])
    save_file(weights, folder / WEIGHTS)


def _nan_buffer(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        weights = load_file(folder / WEIGHTS)
        weights[name] = torch.full_like(weights[name], float("nan"))
        save_file(weights, folder / WEIGHTS)
    return damage


# (family, what is damaged, the config edit or the weights edit, what the refusal names)
CASES = [
    ("cogvideox", "scaling_factor 0", _cfg(scaling_factor=0), None, "scaling_factor is 0"),
    ("cogvideox", "scaling_factor NaN", _cfg(scaling_factor=float("nan")), None, "scaling_factor is NaN"),
    ("cogvideox", "_class_name a list", _cfg(_class_name=["AutoencoderKLCogVideoX"]), None, "_class_name is"),
    ("cogvideox", "latent_channels 2**31", _cfg(latent_channels=2**31), None, "latent_channels is 2147483648"),
    ("cogvideox", "temporal_compression_ratio 0", _cfg(temporal_compression_ratio=0), None,
     "temporal_compression_ratio is 0"),
    ("cogvideox", "a tensor missing from the weights", None, _drop_tensor, f"the weights ({WEIGHTS}) hold no value"),
    ("wan", "latents_std all 0", lambda c: c.update(latents_std=[0.0] * len(c["latents_std"])), None,
     "latents_std holds 0.0"),
    ("wan", "latents_mean of 3 values for 16 channels", _cfg(latents_mean=[0.0, 0.1, 0.2]), None,
     "latents_mean has 3 values for 16 latent channels"),
    ("ltx", "NaN latents_mean in the weights", None, _nan_buffer("latents_mean"), "latent_spec.latents_mean is"),
]


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "v", codec="h264", num_frames=24, height=64, width=96, fps=8)


def _saved(family: str, folder: Path) -> Path:
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        getattr(diffusers, FAMILIES[family].class_name)(**FAMILIES[family].tiny_config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("family", "what", "config_edit", "weights_edit", "named"), CASES,
                         ids=[c[1] for c in CASES])
def test_a_degenerate_vae_is_refused_before_out_is_made(tmp_path: Path, video: Path, family: str, what: str,
                                                        config_edit: Any, weights_edit: Any, named: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = _saved(family, tmp_path / "vae")
    if config_edit is not None:
        config = json.loads((folder / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").write_text(json.dumps(config))  # NaN as Python's json writes it
    if weights_edit is not None:
        weights_edit(folder)
    out = tmp_path / "out"
    spec = FAMILIES[family]
    frames = str(spec.tiny_frames) if hasattr(spec, "tiny_frames") else "9"
    capsys.readouterr()
    code = main(["encode", str(video), "--out", str(out), "--vae", str(folder), "--frames", frames, "--fps", "8",
                 "--height", "64", "--width", "96", "--device", "cpu", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(folder) in err and named in err, err
    assert not out.exists()


def test_every_built_in_tiny_vae_passes_the_checks(tmp_path: Path) -> None:
    """The checks refuse only what cannot work: every family's own tiny config passes, saved and loaded back."""
    for family in FAMILIES.values():
        assert config_problems(dict(family.tiny_config)) == [], family.name


def test_a_manifest_with_a_zero_scaling_factor_is_refused_by_readers_too() -> None:
    """The read side's check of a manifest's spec (verify, the dataset) refuses the zero gain the encoder refuses."""
    from latentcache.format.checks import spec_problems

    spec = {"family": "cogvideox", "channels": 4, "temporal_compression": 4, "spatial_compression": 8,
            "scaling_factor": 0.0}
    assert any("zero gain" in p for p in spec_problems(spec))
    assert spec_problems({**spec, "scaling_factor": 1.15258426}) == []
