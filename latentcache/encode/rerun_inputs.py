"""A rerun's inputs held against the plan: which are new, which were planned and are missing or were changed in
place (another caption), and whether the input lists need reading at all.

OUT/inputs/lists.json  what the lists were when plan.json was last extended from them (`list_identity`)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from latentcache.encode import chunks
from latentcache.encode.chunk_plan import input_id
from latentcache.encode.input_stats import NAMED_CHANGES, compare_stat
from latentcache.encode.job_plan import InputTable, JobPlan, input_from_line, key_digest, part_digests
from latentcache.errors import ConfigError
from latentcache.format import strictjson
from latentcache.format.out_layout import INPUT_LISTS_RECORD, inputs_name
from latentcache.format.shards import write_text_atomic


def new_inputs(out: Path, job_plan: JobPlan, table: InputTable) -> np.ndarray:
    """Positions in `table` of inputs no part holds yet. Refuses, naming them, inputs planned before but not given."""
    planned = np.sort(np.concatenate([part_digests(out, p) for p in job_plan.parts] or [np.zeros(0, np.uint64)]))
    removed = planned[~np.isin(planned, table.digests, assume_unique=True)]
    if len(removed):
        examples = _relpaths_of(out, job_plan, set(removed[:5].tolist()))
        raise ConfigError(f"{out}/plan.json was made from inputs that are not given now: {len(removed)} planned "
                          f"input(s) are missing, e.g. {', '.join(examples)}. Pass every earlier input again (new "
                          "ones are added as a new part), or use a new --out directory.")
    _refuse_changed_in_place(out, job_plan, table)
    return np.nonzero(~np.isin(table.digests, planned, assume_unique=True))[0]


# What a planned input's shards hold besides its pixels: given again with other values, the shards would silently
# keep the old ones (an input's key is its relative path and spans, so a new caption is not a new input).
_HELD_FIELDS = ("caption", "extra")


def _refuse_changed_in_place(out: Path, job_plan: JobPlan, table: InputTable) -> None:
    """Refuses, naming them, planned inputs given now with another caption or extra columns than their part holds.

    Parts and the table are both in digest order, so each part is one pass over its inputs file; a line is parsed
    only when its bytes differ (the absolute path may: a dataset moved keeps its keys and stays valid)."""
    changed: list[str] = []
    count = 0
    moved = _MovedInputs(out, job_plan)
    for part in job_plan.parts:
        positions = np.searchsorted(table.digests, part_digests(out, part))
        path = out / inputs_name(part.index)
        with path.open("rb") as f:
            for n, (line, position) in enumerate(zip(f, positions, strict=False), 1):
                given = table.line(int(position))
                if line == given:
                    continue
                chunk, at = divmod(n - 1, part.chunk_size)
                before = chunks.read_input_line(line, path, at + 1, f" of chunk {chunk}")
                now = input_from_line(strictjson.loads(given))
                if now.path != before.path:
                    moved.add(part.index, chunk, at, before.path, now.path)
                fields = [name for name in _HELD_FIELDS if getattr(before, name) != getattr(now, name)]
                if fields:
                    count += 1
                    if len(changed) < 3:
                        said = "; ".join(f"{name} was {getattr(before, name)!r}, now {getattr(now, name)!r}"
                                         for name in fields)
                        changed.append(f"{now.relpath} ({said})")
    moved.check()
    if count:
        raise ConfigError(f"{count} input(s) planned in {out} are given now with another caption or extra columns, "
                          f"e.g. {', '.join(changed)}. Their shards hold the values they were planned with, and a "
                          "planned input is never changed in place (--reencode-changed redoes changed video files, "
                          "not captions): give the earlier values again, or encode into a new --out directory.")


class _MovedInputs:
    """Planned inputs that the inputs given now name at another path (a moved dataset, a repointed folder link, a
    link of git-annex or DVC given through a folder, whose listing resolves it): what each names now is held against
    what its chunk plan recorded, since the planned path may still hold the old bytes or nothing at all. Checked a
    chunk at a time (one chunk plan in memory); a changed one is refused by name, also with --reencode-changed, which
    reads the planned path."""

    def __init__(self, out: Path, job_plan: JobPlan) -> None:
        self.out, self.plan = out, job_plan
        self.refs = {(r.part, r.chunk): r for r in job_plan.chunk_refs()}
        self.pending: list[tuple[int, str, str]] = []
        self.where: tuple[int, int] | None = None
        self.changes: list[tuple[str, str, str]] = []

    def add(self, part: int, chunk: int, at: int, planned: str, now: str) -> None:
        if self.where != (part, chunk):
            self._check_chunk()
            self.where = (part, chunk)
        self.pending.append((at, planned, now))

    def _check_chunk(self) -> None:
        pending, self.pending = self.pending, []
        if not pending or self.where is None:
            return
        ref = self.refs[self.where]
        if not (self.out / ref.plan_name).is_file():
            return  # not probed yet: it is planned from the inputs file when its turn comes
        stats = chunks.read_chunk_stats(self.out, self.plan, ref)
        if stats is None:
            return
        for at, planned, now in pending:
            change, _ = compare_stat(now, stats[at])
            if change is not None:
                self.changes.append((now, planned, change.how))

    def check(self) -> None:
        self._check_chunk()
        if not self.changes:
            return
        named = "; ".join(f"{now} ({how}; planned as {planned})" for now, planned, how in self.changes[:NAMED_CHANGES])
        more = f"; and {len(self.changes) - NAMED_CHANGES} more" if len(self.changes) > NAMED_CHANGES else ""
        raise ConfigError(
            f"{self.out}: {len(self.changes)} input(s) are given now at another path than they were planned at (a "
            f"moved dataset or a repointed link) and hold other bytes than were encoded: {named}{more}. Their "
            "shards hold latents of the old bytes. Re-encoding reads the planned path, so --reencode-changed cannot "
            "take them from here: put the dataset (or the links) back as planned and run with --reencode-changed, "
            "or encode into a new --out directory.")


def _relpaths_of(out: Path, job_plan: JobPlan, digests: set[int]) -> list[str]:
    found = []
    for part in job_plan.parts:
        path = out / inputs_name(part.index)
        with path.open("rb") as f:
            for n, line in enumerate(f, 1):
                ident = input_id(chunks.read_input_line(line, path, n))
                if key_digest(ident) in digests:
                    found.append(ident)
    return sorted(found)


def _lists_record(job_plan: JobPlan, identity: list[dict[str, Any]]) -> dict[str, Any]:
    # The parts' digests tie the record to this plan.json: a record left from before --overwrite or a hand edit
    # of the plan never matches another plan.
    return {"lists": identity, "parts": [[p.count, p.sha256] for p in job_plan.parts]}


def lists_unchanged(out: Path, job_plan: JobPlan, identity: list[dict[str, Any]] | None) -> bool:
    """Whether `identity` (`input_stats.list_identity`, taken now) is what the lists were when `plan` was last
    extended from them: then they hold no input the plan lacks, and reading them again is skipped. False when
    either is unknown (folders given, no record, an unreadable or damaged record: the lists are read as before)."""
    if identity is None or not job_plan.parts:
        return False
    try:
        recorded = strictjson.loads((out / INPUT_LISTS_RECORD).read_bytes())
    except (OSError, ValueError):
        return False
    return recorded == _lists_record(job_plan, identity)


def record_lists(out: Path, job_plan: JobPlan, identity: list[dict[str, Any]] | None) -> None:
    """After plan.json holds every input of the lists: what they were (taken before they were read, so a list
    changed while it was read does not match next time). None: forget any earlier record."""
    path = out / INPUT_LISTS_RECORD
    if identity is None:
        path.unlink(missing_ok=True)
        return
    write_text_atomic(path, json.dumps(_lists_record(job_plan, identity), indent=0, sort_keys=True, allow_nan=False))
