"""Every benchmark runs end to end on tiny inputs, so none of them can rot unnoticed (bench/ is not imported
anywhere else). The figures they print are not checked, only that each measured something and said so."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO_ROOT


def bench(name: str) -> ModuleType:
    """bench/NAME.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def ratio(text: str, label: str) -> float:
    match = re.search(re.escape(label) + r"[^\n]*?([0-9.]+)x", text)
    assert match, f"no {label!r} ratio in:\n{text}"
    return float(match.group(1))


@pytest.mark.slow
def test_encode_bench_compares_the_pipeline_with_the_naive_loop(capsys):
    assert bench("encode").main(["--clips", "2", "--batch-size", "2", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert ratio(out, "ratio latentcache / naive") > 0
    assert "batch 2" in out


@pytest.mark.slow
def test_encode_bench_full_path_runs_with_the_tiny_config(capsys):
    """`--full` is the GPU benchmark; `--tiny` takes the same path (random AutoencoderKLCogVideoX built from a
    config, FLOP count, tiled encode) with the tiny config, so a CPU runs it."""
    assert bench("encode").main(["--full", "--tiny", "--clips", "2", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "VAE: random-tiny" in out and re.search(r"batch \d+;", out)  # auto, resolved on this machine
    assert ratio(out, "ratio latentcache / naive") > 0
    assert re.search(r"VAE: [0-9.]+ TFLOP per clip", out)
    assert "tiled 32x48" in out


@pytest.mark.slow
def test_encode_bench_whole_process_times_the_cli_against_a_naive_script(capsys):
    assert bench("encode").main(["--whole-process", "--videos", "1", "--clips-per-video", "1", "--repeat", "1",
                                 "--source-size", "96x128"]) == 0
    out = capsys.readouterr().out
    assert ratio(out, "ratio latentcache / naive, whole process") > 0
    assert "1 clips of 17x64x96" in out


def test_full_tiny_needs_full():
    with pytest.raises(SystemExit):
        bench("encode").main(["--tiny"])


@pytest.mark.slow
def test_stream_bench(capsys):
    assert bench("stream").main(["--samples", "4", "--per-shard", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("per-clip .pt", "LatentShardDataset mean, no sha256", "LatentShardDataset batch 8",
                  "  same, old read, no latent check"):
        assert ratio(out, label) > 0
    # Every row was checked to read what its label says before it was timed.
    assert 'checked: 5 "old read" rows read each of the 2 shards the old way, the other 4 rows today\'s way' in out


def test_stream_bench_old_read_rows_read_the_old_way(tmp_path: Path, monkeypatch):
    """StreamedDataset (the "old read" rows) reads every shard through the bench's streamed_read_shard and none
    through the read_shard the dataset uses today; without latent_check, no sample is checked."""
    import latentcache.format.checks as checks_module
    import latentcache.train.dataset as dataset_module
    import latentcache.train.decoder as decoder_module

    stream = bench("stream")
    stream.make_dataset(tmp_path, 3, 2, store_logvar=True)
    calls = {"old": 0, "today": 0, "check": 0}

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(stream, "streamed_read_shard", counting("old", stream.streamed_read_shard))
    monkeypatch.setattr(dataset_module, "read_shard", counting("today", dataset_module.read_shard))
    monkeypatch.setattr(decoder_module, "latent_problems", counting("check", checks_module.latent_problems))
    keys = [s["key"] for s in stream.StreamedDataset(tmp_path, sample_posterior=False)]
    assert (sorted(keys), calls) == (["clip000000", "clip000001", "clip000002"], {"old": 2, "today": 0, "check": 3})
    calls.update(old=0, check=0)
    assert len(list(stream.StreamedDataset(tmp_path, latent_check=False))) == 3
    assert calls == {"old": 2, "today": 0, "check": 0}
    assert len(list(stream.LatentShardDataset(tmp_path))) == 3  # the old read ends with the pass
    assert calls == {"old": 2, "today": 2, "check": 3}


@pytest.mark.parametrize("undo", ["old read", "no latent check"])
def test_stream_bench_refuses_a_row_that_does_not_read_what_its_label_says(tmp_path: Path, monkeypatch, undo):
    """If an "old read" row reads today's way (as it did while the dataset no longer called the bench's read hook),
    or a "no latent check" row checks, the bench stops before timing anything, naming the row."""
    stream = bench("stream")
    stream.make_dataset(tmp_path, 2, 1, store_logvar=True)
    if undo == "old read":
        monkeypatch.setattr(stream.StreamedDataset, "iter_slot", stream.LatentShardDataset.iter_slot)
        seen = "row 'same, old read' does not read what its label says: {'old': 0, 'today': 2, 'check': 2}"
    else:
        monkeypatch.setattr(stream.UncheckedDecoder, "latents", stream.SampleDecoder.latents)
        seen = "row 'same, old read, no latent check' does not read what its label says: {'old': 2, 'today': 0, " \
               "'check': 2}"
    with pytest.raises(AssertionError, match=re.escape(seen)):
        stream.check_rows(stream.dataset_rows(tmp_path), 2)


def test_verify_bench(tmp_path: Path, capsys):
    assert bench("verify").main(["--samples", "2", "--per-shard", "1", "--repeat", "1", "--out",
                                 str(tmp_path / "v")]) == 0
    assert re.search(r"run 1: 2 samples, .* s/GB .* ok=True", capsys.readouterr().out)


@pytest.mark.slow
def test_decode_bench(capsys):
    pytest.importorskip("imageio_ffmpeg", reason="bench/decode.py compares with imageio-ffmpeg's ffmpeg (.[bench])")
    assert bench("decode").main(["--minutes", "0.25", "--clips", "2", "--frames", "9", "--height", "64",
                                 "--width", "96", "--gop", "48"]) == 0
    out = capsys.readouterr().out
    assert ratio(out, "latentcache/ffmpeg =") > 0
    assert re.search(r"late/early = [0-9.]+", out)


@pytest.mark.slow
def test_decode_bench_cpu_seconds(capsys):
    pytest.importorskip("imageio_ffmpeg", reason="bench/decode.py compares with imageio-ffmpeg's ffmpeg (.[bench])")
    assert bench("decode").main(["--cpu", "--minutes", "0.1", "--codec", "h264_bframes", "--clips", "2",
                                 "--frames", "9", "--height", "64", "--width", "96", "--gop", "48"]) == 0
    out = capsys.readouterr().out
    assert "sampled frames bit-identical, before vs after: True" in out
    assert re.search(r"ffmpeg CLI: [0-9.]+ CPU-s per clip", out)


@pytest.mark.slow
def test_loader_bench_resumes_exactly_with_both_loaders(capsys):
    """bench/loader.py: our StatefulLoader and torchdata's StatefulDataLoader, stopped and resumed (with workers)."""
    pytest.importorskip("torchdata")
    assert bench("loader").main(["--samples", "32", "--per-shard", "8", "--workers", "2", "--batch-size", "2",
                                 "--stop", "3", "--repeat", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "resume after 3 batches" in line]
    assert len(lines) == 2 and all("keys exact, latents bit-equal" in line for line in lines), lines


@pytest.mark.slow
def test_s3_bench(capsys):
    pytest.importorskip("s3fs", reason="bench/s3.py needs s3fs and moto[server] (test extra)")
    pytest.importorskip("moto.server", reason="bench/s3.py needs s3fs and moto[server] (test extra)")
    assert bench("s3").main(["--videos", "2", "--video-frames", "24", "--frames", "9", "--height", "64", "--width",
                             "96", "--workers", "0", "--samples", "4", "--per-shard", "2", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert ratio(out, "decode 2 clips") > 0
    assert ratio(out, "stream 4 samples") > 0


def test_encode_bench_null_vae_reports_the_time_outside_the_vae(capsys):
    assert bench("encode").main(["--null-vae", "--tiny", "--clips", "4", "--batch-size", "2", "--workers", "1",
                                 "--vae-seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "ms outside the VAE call" in out and "clips/s per decode worker" in out
    assert "the stand-in takes 0.05 s a clip" in out
    assert re.search(r"steady state .*?: [\d.]+ ms per clip outside the VAE call", out), out


@pytest.mark.slow
def test_gpu_bench_measures_each_setting_within_its_budget(tmp_path, capsys):
    """bench/gpu.py's matrix through the same code as on a GPU (tiny config): a row per dtype, tiling and batch with
    its seconds a clip and TFLOP/s, FLOPs counted for both tilings, the JSON written; compile is skipped on a CPU
    with the reason; with no budget left every setting is skipped, said so, and it exits 1."""
    import json

    figures = tmp_path / "matrix.json"
    assert bench("gpu").main(["--tiny", "--dtypes", "bf16,fp32", "--batches", "1,2", "--calls", "1",
                              "--json", str(figures)]) == 0
    report = json.loads(figures.read_text())
    settings = {(r["dtype"], r["tiling"], r["batch"]) for r in report["rows"]}
    assert settings == {(d, t, b) for d in ("bf16", "fp32") for t in (False, True) for b in (1, 2)}
    assert all(r["s_per_clip"] > 0 and r["tflops"] > 0 and r["error"] is None for r in report["rows"])
    assert report["flops_per_clip"]["tiled"] > report["flops_per_clip"]["untiled"] > 0  # tiles overlap
    assert report["skipped"] == ["compile (CPU: --compile applies on a GPU only)"]
    assert "matrix: bf16 tiling on  batch 2:" in capsys.readouterr().out

    assert bench("gpu").main(["--tiny", "--dtypes", "bf16", "--batches", "1", "--budget-s", "0.001",
                              "--json", str(figures)]) == 1
    report = json.loads(figures.read_text())
    assert report["rows"] == [] and "bf16 tiling off batch 1" in report["skipped"]


@pytest.mark.slow
def test_gpu_script_runs_every_step_into_its_folder(tmp_path):
    """bench/gpu.sh, as a GPU session runs it, with TINY=1: each step's log (and the matrix JSON) in OUT."""
    import os
    import subprocess

    out = tmp_path / "figures"
    done = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu.sh"), str(out)], capture_output=True, text=True,
                          env={**os.environ, "TINY": "1", "PYTHON": sys.executable}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["device.log", "full.log", "matrix.json", "matrix.log",
                                                     "null_vae.log"]
    assert "setting(s) measured" in (out / "matrix.log").read_text()
    assert "ms outside the VAE call" in (out / "null_vae.log").read_text()
    assert "ratio latentcache / naive" in (out / "full.log").read_text()
