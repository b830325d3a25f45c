"""Provenance: the weights that made the latents (hub commit, sha256 per weights file) and the software that wrote
each shard. Real encodes of a real video with tiny random CogVideoX VAEs saved by `save_pretrained`: from a local
directory and from a Hugging Face cache laid out on disk as huggingface_hub lays it out, used offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_settings, tree_bytes

from latentcache.cli import main
from latentcache.encode.execute import cpu_threads, run
from latentcache.encode.inputs import discover_inputs
from latentcache.encode.models.families import FAMILIES
from latentcache.encode.models.provenance import (
    file_sha256,
    merge_software,
    software_differences,
    software_record,
    vae_change,
    weight_files,
)
from latentcache.encode.models.vae import load_vae
from latentcache.encode.planning import load_or_make_plan
from latentcache.encode.settings import VAESettings
from latentcache.errors import ConfigError
from latentcache.format.manifest import read_manifest
from latentcache.format.out_layout import sidecar_of
from latentcache.tools.synthetic import write_video
from latentcache.tools.verify import info_lines, verify
from latentcache.train.dataset import LatentShardDataset

WEIGHTS = "diffusion_pytorch_model.safetensors"
ENCODE = ["--device", "cpu", "--frames", "17", "--fps", "8", "--height", "64", "--width", "96", "--workers", "0"]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_tiny_cogvideox(folder: Path, seed: int) -> Path:
    """A tiny AutoencoderKLCogVideoX with random weights drawn from `seed`, saved as diffusers saves any VAE."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    AutoencoderKLCogVideoX(**FAMILIES["cogvideox"].tiny_config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("provenance_videos")
    write_video(d / "v0", codec="h264", num_frames=24, height=64, width=96, fps=8)
    return d


# ------------------------------------------------------------------------------------------ local directory


def test_local_weights_that_change_between_runs_are_refused_naming_both_hashes(one_video: Path, tmp_path: Path,
                                                                                capsys) -> None:
    vae_dir = save_tiny_cogvideox(tmp_path / "vae", seed=0)
    old = sha256_of(vae_dir / WEIGHTS)
    out = tmp_path / "out"
    args = ["encode", str(one_video), "--out", str(out), "--vae", str(vae_dir), *ENCODE]
    assert main(args) == 0
    manifest = read_manifest(out)
    assert manifest["vae"]["weights"] == {WEIGHTS: old}
    assert manifest["vae"]["revision"] is None

    # Unchanged weights: a rerun encodes nothing and the tree stays byte-identical.
    before = tree_bytes(out)
    assert main(args) == 0
    assert tree_bytes(out) == before

    # A VAE fix release lands in the same directory: the rerun is refused, naming the old and the new hash.
    save_tiny_cogvideox(vae_dir, seed=1)
    new = sha256_of(vae_dir / WEIGHTS)
    assert new != old
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{WEIGHTS} sha256 {old} then, {new} now" in err
    assert "--overwrite" in err
    assert tree_bytes(out) == before  # nothing written, nothing removed

    # Re-encoding on purpose.
    assert main([*args, "--overwrite"]) == 0
    assert read_manifest(out)["vae"]["weights"] == {WEIGHTS: new}


def test_every_process_checks_its_own_weights_against_the_plan(one_video: Path, tmp_path: Path) -> None:
    """A rank that loads a different local copy (another node's disk) refuses before writing anything."""
    settings = tiny_settings(vae=VAESettings(source=str(save_tiny_cogvideox(tmp_path / "a", seed=0)), subfolder=None))
    plan = load_or_make_plan(tmp_path / "out", discover_inputs([one_video]), settings, load_vae(settings.vae, "cpu"))
    other = load_vae(VAESettings(source=str(save_tiny_cogvideox(tmp_path / "b", seed=1)), subfolder=None), "cpu")
    with pytest.raises(ConfigError, match=f"sha256 {plan.vae['identity']['weights'][WEIGHTS]} then, "
                                          f"{other.identity.weights[WEIGHTS]} now"):
        run(tmp_path / "out", plan, other, settings)
    assert not (tmp_path / "out" / "shards").exists()


def test_a_plan_without_weight_hashes_is_refused_as_unverifiable(one_video: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["encode", str(one_video), "--out", str(out), "--vae", str(save_tiny_cogvideox(tmp_path / "vae", 0)),
            *ENCODE]
    assert main(args) == 0
    plan = json.loads((out / "plan.json").read_text())
    del plan["vae"]["identity"]["weights"]  # as an older latentcache wrote it
    (out / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    assert main(args) == 2
    assert "records no hash of the VAE's weights" in capsys.readouterr().err


def test_sharded_safetensors_are_all_hashed(tmp_path: Path) -> None:
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    AutoencoderKLCogVideoX(**FAMILIES["cogvideox"].tiny_config).save_pretrained(tmp_path, max_shard_size="100KB")
    files = weight_files(tmp_path)
    assert len(files) > 1 and all(f.name.endswith(".safetensors") for f in files)
    vae = load_vae(VAESettings(source=str(tmp_path), subfolder=None), "cpu")
    assert vae.identity.weights == {f.name: sha256_of(f) for f in files}


# ------------------------------------------------------------------------------------- hub id, offline cache


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(cache: Path, repo: str, commit: str, vae_dir: Path, *, main_ref: bool) -> None:
    """snapshots/<commit>/vae/<file> -> ../../../blobs/<hash>, as huggingface_hub lays out a download: LFS files
    (the weights) under their sha256, small git files (config.json) under their git blob sha1."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    snap = root / "snapshots" / commit / "vae"
    snap.mkdir(parents=True)
    for f in sorted(vae_dir.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / (sha256_of(f) if f.suffix == ".safetensors" else _git_blob_sha1(data))
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    if main_ref:
        (root / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_cache(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An offline HF cache of acme/tiny-cog with two commits of different weights; refs/main -> the newer one.
    Returns (HF_HOME, {commit: sha256 of its weights})."""
    home = tmp_path / "hf"
    cache = home / "hub"
    commits = {}
    for seed, commit in ((0, "a" * 40), (1, "b" * 40)):
        vae = save_tiny_cogvideox(tmp_path / f"src{seed}", seed)
        add_snapshot(cache, "acme/tiny-cog", commit, vae, main_ref=commit == "b" * 40)
        commits[commit] = sha256_of(vae / WEIGHTS)
    return home, commits


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "latentcache.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_hub_id_from_an_offline_cache_records_its_commit_and_weights(one_video: Path, tmp_path: Path, hub_cache,
                                                                      monkeypatch, capsys) -> None:
    home, commits = hub_cache
    old, new = "b" * 40, "a" * 40
    out = tmp_path / "out"
    encode = ["encode", str(one_video), "--out", str(out), "--vae", "acme/tiny-cog", *ENCODE]
    done = _cli(*encode, home=home)
    assert done.returncode == 0, done.stderr
    vae = read_manifest(out)["vae"]
    # refs/main was resolved to its commit, and the weights' sha256 read off the blob the snapshot links to.
    assert vae["revision"] == old and vae["subfolder"] == "vae"
    assert vae["weights"] == {WEIGHTS: commits[old]}
    assert LatentShardDataset(out).vae_identity == vae
    info = "\n".join(info_lines(out))
    assert f"hub commit {old}" in info and commits[old] in info
    assert f"torch {torch.__version__}" in info and "diffusers" in info and "ffmpeg" in info

    # The same cache in this process (huggingface_hub read the variables when it was imported: set its constants).
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    capsys.readouterr()
    assert main([*encode, "--revision", new]) == 2  # pins the other commit: other weights, refused
    err = capsys.readouterr().err
    assert f"sha256 {commits[old]} then, {commits[new]} now" in err
    assert f"hub commit {old} then, {new} now" in err and f"pass --revision {old}" in err
    # Pinning the commit the output was made with resumes it (the revision asked for is not in the fingerprint).
    before = tree_bytes(out)
    assert main([*encode, "--revision", old]) == 0
    assert tree_bytes(out) == before


def test_hub_cache_files_are_not_read_to_be_hashed(tmp_path: Path) -> None:
    blob = tmp_path / "blobs" / ("0" * 64)
    blob.parent.mkdir()
    blob.write_bytes(b"not the content that hash names")  # the name is trusted: the hub checked it on download
    link = tmp_path / "snapshots" / "c" / WEIGHTS
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    assert file_sha256(link) == ("0" * 64, 0)
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(b"abc")
    assert file_sha256(plain) == (hashlib.sha256(b"abc").hexdigest(), 3)


# ----------------------------------------------------------------------------------------------- software


def test_software_is_in_sidecars_and_manifest_not_in_the_tars(one_video: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["encode", str(one_video), "--out", str(out), "--vae", "tiny-random-cogvideox", *ENCODE,
                 "--batch-size", "2", "--cpu-threads", "1"]) == 0
    threads = torch.get_num_threads()
    with cpu_threads(torch.device("cpu"), 1):
        expected = software_record("cpu", batch_size=2)
    assert torch.get_num_threads() == threads  # the run gave the caller's thread count back
    assert set(expected) >= {"torch", "diffusers", "av", "ffmpeg", "cuda", "cudnn", "device", "batch_size",
                             "cpu_threads"}
    assert (expected["batch_size"], expected["cpu_threads"]) == (2, 1)
    manifest = read_manifest(out)
    assert manifest["software"] == [{**expected, "shards": 1}]
    tar = next(out.rglob("*.tar"))
    assert json.loads(sidecar_of(tar).read_text())["software"] == expected
    assert b"diffusers" not in tar.read_bytes()  # tar bytes do not depend on the software record
    for key in ("hostname", "pid", "time"):
        assert not any(key in k for k in expected)


def test_a_shard_redone_with_another_thread_count_is_named_by_verify(video_dir: Path, tmp_path: Path) -> None:
    """Byte identity is promised within one software record; the thread count is in it, so a resume on CPU with
    another --cpu-threads is told apart shard by shard (the other bits it may write are not silent)."""
    out = tmp_path / "out"
    encode = ["encode", str(video_dir), "--out", str(out), "--samples-per-shard", "2", "--batch-size", "2",
              "--vae", "tiny-random-cogvideox", *ENCODE]
    assert main([*encode, "--cpu-threads", "1"]) == 0
    tars = sorted(out.rglob("*.tar"))
    assert len(tars) >= 2
    tars[-1].unlink()
    sidecar_of(tars[-1]).unlink()
    assert main([*encode, "--cpu-threads", "2"]) == 0
    assert json.loads(sidecar_of(tars[-1]).read_text())["software"]["cpu_threads"] == 2
    assert {json.loads(sidecar_of(t).read_text())["software"]["cpu_threads"] for t in tars[:-1]} == {1}
    report = verify(out)
    warning = next(w for w in report.warnings if "different software" in w)
    assert f"cpu_threads 1 ({len(tars) - 1} shard{'s' if len(tars) > 2 else ''}) / 2 (1 shard)" in warning
    assert "batch_size" not in warning  # the same batch size both times
    assert any("on cpu" in line and "(2 threads), batch 2 (1 shard)" in line for line in report.lines())


def test_verify_shows_software_and_warns_when_shards_were_written_by_different_setups(encoded_dir: Path,
                                                                                     tmp_path: Path) -> None:
    import shutil

    report = verify(encoded_dir)
    assert report.ok
    assert any(f"written by torch {torch.__version__}" in line for line in report.lines())
    assert not any("different software" in w for w in report.warnings)

    # One shard rewritten by another process with another torch on a GPU: merged into the manifest, then warned.
    out = tmp_path / "out"
    shutil.copytree(encoded_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    mine = {k: v for k, v in manifest["software"][0].items() if k != "shards"}
    theirs = {**mine, "torch": "2.5.0+cu124", "cuda": "12.4", "device": "cuda: NVIDIA H100 80GB HBM3"}
    manifest["software"] = merge_software([mine, mine, mine, theirs])
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = verify(out)
    warning = next(w for w in report.warnings if "different software" in w)
    assert f"torch {torch.__version__} (3 shards) / 2.5.0+cu124 (1 shard)" in warning
    assert f"device {mine['device']} (3 shards) / cuda: NVIDIA H100 80GB HBM3 (1 shard)" in warning
    assert "cuda none (3 shards) / 12.4 (1 shard)" in warning
    assert report.ok  # a warning, not a problem: the data is still what the manifest says
    assert any("on cuda: NVIDIA H100" in line for line in info_lines(out))


def test_merge_and_differences_are_deterministic() -> None:
    a = {"torch": "2.4.1", "device": "cpu: x86_64 AVX2"}
    b = {"torch": "2.5.0", "device": "cpu: x86_64 AVX2"}
    assert merge_software([b, a, None, a]) == merge_software([a, None, a, b]) == [
        {**a, "shards": 2}, {**b, "shards": 1}, {"unrecorded": True, "shards": 1}]
    assert software_differences(merge_software([b, a, a])) == "torch 2.4.1 (2 shards) / 2.5.0 (1 shard)"
    assert software_differences(merge_software([a, None])) is None


def test_vae_change_names_what_changed() -> None:
    old = {"source": "x", "revision": "c1", "weights": {WEIGHTS: "1" * 64}, "config_hash": "h"}
    assert vae_change(old, dict(old), "p") is None
    message = vae_change(old, {**old, "revision": "c2"}, "p")
    assert "hub commit c1 then, c2 now" in message and "--revision c1" in message


def test_bench_provenance_smoke(capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_provenance", REPO_ROOT / "bench" / "provenance.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--mb", "4", "--repeat", "1"]) == 0
    printed = capsys.readouterr().out
    assert "s/GB" in printed and "hub cache link: 0 bytes hashed" in printed
