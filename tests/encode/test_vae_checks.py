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


# The released configs (diffusers 0.42.1's class defaults) and Wan 2.2's, which is not a class default.
WAN_2_2 = {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "in_channels": 12,
           "out_channels": 12, "is_residual": True, "patch_size": 2, "scale_factor_spatial": 16,
           "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48}


def test_every_released_and_tiny_vae_config_is_within_the_size_limits() -> None:
    """The structural caps and the parameter limit refuse none of the released VAEs, nor any built-in tiny one."""
    import diffusers

    from latentcache.encode.models.vae_checks import MAX_PARAMETERS, check_model_size
    from latentcache.encode.models.vae_source import class_defaults

    counts = {}
    for family in FAMILIES.values():
        cls = getattr(diffusers, family.class_name)
        configs = [dict(class_defaults(family.class_name) or {}), dict(family.tiny_config)]
        for config in configs + ([WAN_2_2] if family.name == "wan" else []):
            assert config_problems(config) == [], (family.name, config_problems(config))
            counts[family.name] = max(counts.get(family.name, 0), check_model_size(cls, config, family.name))
    assert max(counts.values()) == counts["minimax-h3"] > 2.5e9  # the largest release, about 4x under the limit
    assert 3.5 * counts["minimax-h3"] < MAX_PARAMETERS < 4 * counts["minimax-h3"]


@pytest.mark.parametrize(("change", "named"), [
    ({"block_out_channels": [60000, 60000, 60000, 60000]},
     "a model of 3,304,936,800,035 parameters (AutoencoderKLCogVideoX), past the 10,000,000,000"),
    ({"layers_per_block": 60000}, "layers_per_block is 60000, expected a whole number from 1 to 16"),
    ({"block_out_channels": [4] * 5000, "down_block_types": ["CogVideoXDownBlock3D"] * 5000},
     "block_out_channels has 5000 entries, expected at most 12"),
])
def test_a_config_of_a_huge_model_is_refused_by_encode_in_a_moment(tmp_path: Path, video: Path, change: dict,
                                                                   named: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A crafted config.json (60000-wide blocks: 11 trillion parameters; 60000 layers a block; 5000 blocks) made
    diffusers allocate the model before a weight was read (all the memory, or minutes building modules): now exit 2
    within a second or so, naming the directory, what is too big and the limit, with no OUT made."""
    import time

    folder = _saved("cogvideox", tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out"
    capsys.readouterr()
    start = time.monotonic()
    code = main(["encode", str(video), "--out", str(out), "--vae", str(folder), "--frames", "9", "--fps", "8",
                 "--height", "64", "--width", "96", "--device", "cpu", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and str(folder) in err and named in err, err
    assert time.monotonic() - start < 10 and not out.exists()


def test_a_model_past_the_parameter_limit_is_refused_naming_the_count_and_the_limit() -> None:
    import diffusers

    from latentcache.encode.models.vae_checks import check_model_size
    from latentcache.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^/m/vae: the config builds a model of [\d,]+ parameters "
                                          r"\(AutoencoderKLMiniMaxH3\), past the 10,000,000,000 latentcache accepts"):
        check_model_size(diffusers.AutoencoderKLMiniMaxH3, {"decoder_attention_head_dim": 60000}, "/m/vae")


def test_weights_larger_than_the_config_s_model_are_refused_before_they_are_read(tmp_path: Path) -> None:
    """A weights file holding far more than the config's model takes (another model's tensors, or padding) would be
    read whole into memory by diffusers: refused first, naming the file, its size and the bound."""
    from latentcache.encode.models.vae import load_vae
    from latentcache.encode.settings import VAESettings
    from latentcache.errors import ConfigError

    folder = _saved("wan", tmp_path / "vae")
    load_vae(VAESettings(source=str(folder), family="wan", subfolder=None), "cpu")  # as saved: loads
    with open(folder / WEIGHTS, "r+b") as f:  # sparse: no disk is used, and nothing reads past the check
        f.truncate(200_000_000)
    with pytest.raises(ConfigError, match=rf"^--vae {folder}: the weights \({WEIGHTS}\) hold 200,000,000 bytes, "
                                          r"past the [\d,]+ a model of [\d,]+ parameters can fill"):
        load_vae(VAESettings(source=str(folder), family="wan", subfolder=None), "cpu")
