"""What happened to the inputs and clips that were not written: one vocabulary for the run summary, `info`,
manifest.json and failures.jsonl.

Each record in failures.jsonl (and in a shard sidecar's or chunk plan's failure list) has an `outcome`:
- `skipped`: a policy decision, the input is fine (`too short` for one clip at these settings);
- `failed`: the input or clip could not be used (a damaged file, a decode error).
Its `reason` groups records for counting: a skip's reason is its message's first words (`too short`), a failure's
is `stage/ErrorType` (`decode/TruncatedVideo`). Records written before `outcome` existed said `"error": "skipped"`
for a skip; they are read the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SKIPPED, FAILED = "skipped", "failed"


def make_record(path: str, stage: str, message: str, *, skipped: bool, error_type: str) -> dict[str, Any]:
    """A failure record: `error` (the exception's class) only for a failure; a skip is not an error."""
    record: dict[str, Any] = {"path": path, "stage": stage, "outcome": SKIPPED if skipped else FAILED,
                              "message": message}
    if not skipped:
        record["error"] = error_type
    record["reason"] = reason_of(record)
    return record


def outcome_of(record: dict[str, Any]) -> str:
    if record.get("outcome") in (SKIPPED, FAILED):
        return record["outcome"]
    return SKIPPED if record.get("error") == "skipped" else FAILED  # a record from before `outcome`


def reason_of(record: dict[str, Any]) -> str:
    if isinstance(record.get("reason"), str):
        return record["reason"]
    if outcome_of(record) == SKIPPED:
        return str(record.get("message", "")).split(":")[0] or "skipped"
    return f"{record.get('stage')}/{record.get('error')}"


@dataclass(slots=True)
class Tally:
    """Records counted by outcome, then by reason."""

    skipped: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def describe(self) -> str:
        """`2 skipped (too short: 2), 1 failed (decode/TruncatedVideo: 1)`."""
        def part(n: int, word: str, by_reason: Counter[str]) -> str:
            reasons = ", ".join(f"{k}: {v}" for k, v in by_reason.most_common())
            return f"{n} {word}" + (f" ({reasons})" if reasons else "")

        return part(self.skipped_total, SKIPPED, self.skipped) + ", " + part(self.failed_total, FAILED, self.failed)


def tally(records: Iterable[dict[str, Any]]) -> Tally:
    counted = Tally()
    for r in records:
        (counted.skipped if outcome_of(r) == SKIPPED else counted.failed)[reason_of(r)] += 1
    return counted


def manifest_counts(counts: dict[str, Any]) -> Tally:
    """The tally a manifest's `counts` records; a manifest from before `skipped`/`failed` gives its `failures` total
    as failures of an unknown reason."""
    if "skipped_by_reason" in counts or "failed_by_reason" in counts:
        return Tally(Counter(counts.get("skipped_by_reason") or {}), Counter(counts.get("failed_by_reason") or {}))
    old = counts.get("failures") or 0
    return Tally(Counter(), Counter({"not recorded by reason": old} if old else {}))
