"""The fuzz tier: every reader of a stranger's file against structure-aware crafted input (fuzz_targets.py).

Fast tier: a short, derandomized run of every target (the same cases on every machine, so CI is deterministic).
Slow tier: a longer derandomized run; LATENTCACHE_FUZZ_EXAMPLES sets its number of cases per target. For hours of
fresh random cases: `python bench/fuzz.py TARGET --minutes 600`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fuzz_targets import TARGETS, run_one
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

FAST_EXAMPLES = {"manifest": 25, "sample_json": 15, "safetensors": 15, "tar": 15, "resume": 25, "check_config": 25,
                 "input_list": 40, "preview": 8, "sat": 25, "vae_dir": 15}
# The slow tier's cases per target (about 3 minutes in all on one core); LATENTCACHE_FUZZ_EXAMPLES=N runs N of each.
SLOW_EXAMPLES = {**{target: 120 for target in TARGETS}, "preview": 30, "vae_dir": 60}
if os.environ.get("LATENTCACHE_FUZZ_EXAMPLES"):
    SLOW_EXAMPLES = dict.fromkeys(TARGETS, int(os.environ["LATENTCACHE_FUZZ_EXAMPLES"]))

# No shrinking in the tiers: a failure is reported as found (with its reproduce blob); bench/fuzz.py shrinks.
settings.register_profile("latentcache-fuzz", derandomize=True, deadline=None, database=None, print_blob=True,
                          suppress_health_check=list(HealthCheck),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])


def _run(target: str, examples: int, base: Path, scratch: Path) -> None:
    @settings(settings.get_profile("latentcache-fuzz"), max_examples=examples)
    @given(st.data())
    def case(data) -> None:
        run_one(target, data, base, scratch)

    case()


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_short(target: str, fuzz_base: Path, tmp_path: Path) -> None:
    _run(target, FAST_EXAMPLES[target], fuzz_base, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_long(target: str, fuzz_base: Path, tmp_path: Path) -> None:
    _run(target, SLOW_EXAMPLES[target], fuzz_base, tmp_path)


@pytest.mark.slow
def test_bench_fuzz_runs_a_target_for_a_while(fuzz_base: Path, capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_fuzz", Path(__file__).resolve().parents[2] / "bench" /
                                                  "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["resume", "--minutes", "0.1", "--round", "5", "--base", str(fuzz_base.parent)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resume: ") and " cases in " in out
