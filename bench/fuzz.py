"""Run fuzz targets (tests/fuzz/fuzz_targets.py) for as long as you like, with fresh random cases.

The test tiers run a fixed, derandomized set of cases; this runs new ones until the time is up, in rounds of
`--round` cases each (every round a new random seed), shrinks a failure to a small case, and prints it with the
line that reproduces it. Per target it prints the number of cases run and how each reader answered.

    python bench/fuzz.py --list
    python bench/fuzz.py manifest --minutes 60
    python bench/fuzz.py all --minutes 600                  # every target in turn, 600 minutes in all
    python bench/fuzz.py safetensors --minutes 5 --base /tmp/fuzz_base   # keep the base output between runs
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fuzz"))

from fuzz_targets import TARGETS, build_base, run_one  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from latentcache.format.out_layout import manifest_path  # noqa: E402


def run_target(target: str, base: Path, seconds: float, per_round: int) -> tuple[Counter, str | None]:
    """(outcomes, the failure's report or None) of `target` run for `seconds`."""
    outcomes: Counter = Counter()
    end = time.monotonic() + seconds
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as scratch:
        while time.monotonic() < end:
            round_seed = random.SystemRandom().randrange(2**64)

            @seed(round_seed)
            @settings(max_examples=per_round, deadline=None, database=None, print_blob=True,
                      suppress_health_check=list(HealthCheck))
            @given(st.data())
            def case(data) -> None:
                run_one(target, data, base, Path(scratch), outcomes)
                outcomes["cases"] += 1

            try:
                case()
            except Exception as e:  # the shrunk failure(s), with hypothesis' reproduce line in their notes
                found = list(getattr(e, "exceptions", None) or [e])  # several distinct ones come as a group
                return outcomes, f"seed {round_seed}:\n" + "\n".join(
                    f"{type(x).__name__}: {str(x)[:2000]}\n" + "\n".join(getattr(x, "__notes__", [])) for x in found)
    return outcomes, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", help=f"one of {', '.join(sorted(TARGETS))}, or all")
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to run (all: in all)")
    parser.add_argument("--round", type=int, default=200, help="cases per hypothesis run (each a new seed)")
    parser.add_argument("--base", type=Path, default=None, help="a folder for the base output (built once)")
    parser.add_argument("--list", action="store_true", help="list the targets")
    args = parser.parse_args(argv)
    if args.list or not args.target:
        for name, fn in sorted(TARGETS.items()):
            print(f"{name}: {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    targets = sorted(TARGETS) if args.target == "all" else [args.target]
    if any(t not in TARGETS for t in targets):
        parser.error(f"unknown target {args.target!r}: {', '.join(sorted(TARGETS))} or all")
    with tempfile.TemporaryDirectory(prefix="fuzz-base-") as tmp:
        folder = args.base or Path(tmp)
        base = folder / "out" if manifest_path(folder / "out").is_file() else build_base(folder)
        failed = False
        for target in targets:
            started = time.monotonic()
            outcomes, failure = run_target(target, base, args.minutes * 60 / len(targets), args.round)
            took = time.monotonic() - started
            answers = ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items()) if k != "cases")
            print(f"{target}: {outcomes['cases']} cases in {took:.0f} s; {answers}")
            if failure:
                failed = True
                print(f"{target}: FAILED\n{failure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
