"""examples/train_tiny_cogvideox.py overfits a handful of encoded samples, and resumes from its checkpoint."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_tiny_cogvideox.py"


@pytest.fixture(scope="module")
def example():
    # One intra-op thread: on a shared 2-core runner, two OpenMP threads per op wait on each other for seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("train_tiny_cogvideox", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_loss_falls_well_below_its_start(example, encoded_dir: Path) -> None:
    # Posterior means (no resampling noise) so 8 samples can be memorised in a few seconds.
    result = example.train(encoded_dir, steps=150, batch_size=4, lr=3e-3, sample_posterior=False, log_every=0)
    assert len(result.losses) == 150 and all(math.isfinite(x) for x in result.losses)
    assert result.eval_after < 0.5 * result.eval_before, (result.eval_before, result.eval_after)
    assert sum(result.losses[-20:]) / 20 < sum(result.losses[:20]) / 20


def test_checkpoint_and_resume(example, encoded_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert example.main(["--data", str(encoded_dir), "--steps", "2"]) == 0
    assert not list(elsewhere.iterdir())  # no --checkpoint: nothing left in the directory it was started from
    ckpt = tmp_path / "runs" / "ckpt.pt"
    assert example.main(["--data", str(encoded_dir), "--steps", "6", "--checkpoint", str(ckpt)]) == 0
    assert "fixed-noise eval loss" in capsys.readouterr().out
    resumed = example.train(encoded_dir, steps=10, resume=ckpt, checkpoint=tmp_path / "again.pt", log_every=0)
    assert len(resumed.losses) == 4  # steps 7..10: the step counter and the data position came back
