"""The output directory's ownership: a directory is latentcache's once `.latentcache` is in it (written first); a
foreign non-empty one is refused, and `--overwrite` removes only the files the plan names, never a user's. Every
write into it goes through `write_naming_path`, which names the file when it fails."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentcache.encode import chunks
from latentcache.encode.job_plan import JobPlan, read_job_plan
from latentcache.encode.settings import EncodeSettings
from latentcache.errors import ConfigError, ShardFormatError
from latentcache.format.layout import FORMAT_VERSION
from latentcache.format.out_layout import (
    FAILURES_FILE,
    INPUT_LISTS_RECORD,
    MANIFEST_FILE,
    OUTPUT_MARKER,
    OUTPUTS,
    PLAN_FILE,
    carry_name,
    inputs_name,
    keys_name,
    marker_path,
    plan_path,
    sidecar_of,
)
from latentcache.format.shards import remove_temporaries, write_text_atomic

log = logging.getLogger(__name__)


def claim_output(out: Path) -> None:
    """Make sure OUT is latentcache's, marking it so, and writable; refuse a directory of someone else's files.

    Ours: it holds its OUTPUT_MARKER, or it is empty or new (the marker is written first), or it was made before the
    marker existed (it holds a plan.json latentcache can read). Anything else could hold a user's manifest.json or
    shards/ that the run, or --overwrite, would replace.
    """
    refuse_foreign_output(out)
    # Rewritten on every run (same bytes): also the check that OUT is writable, before anything is probed.
    write_naming_path(out, out.mkdir, parents=True, exist_ok=True)
    marker = marker_path(out)
    write_naming_path(marker, write_text_atomic, marker, json.dumps({"format_version": FORMAT_VERSION}) + "\n")


def refuse_foreign_output(out: Path) -> None:
    """`claim_output`'s check alone, writing nothing (--dry-run, and the checks made before the VAE loads)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; pass a new or latentcache-made directory")
    marker = marker_path(out)
    # Another process's marker being written (SLURM array tasks start together) does not make OUT someone else's.
    others = [f for f in out.iterdir() if not f.name.startswith(OUTPUT_MARKER + ".")] if out.is_dir() else []
    if others and not marker.is_file():
        try:
            read_job_plan(out)
        except (OSError, UnicodeDecodeError, ValueError, ConfigError, ShardFormatError):
            raise ConfigError(f"--out {out} is not empty and was not made by latentcache (no {OUTPUT_MARKER}, no "
                              f"readable {PLAN_FILE}); its files could be overwritten: pass a new or empty "
                              "directory") from None


def refuse_changed_settings(out: Path, settings: EncodeSettings, overwrite: bool) -> None:
    """An output planned with other settings is refused before any model loads (the VAE itself is compared once it
    is loaded, in `planning.load_or_make_plan`)."""
    if overwrite or not plan_path(out).is_file():
        return
    existing = read_job_plan(out)
    wanted = JobPlan(existing.fingerprint, settings.output_affecting(), existing.vae, [])
    # Through JSON, as plan.json holds them (a tuple now is the list it became there).
    if json.loads(json.dumps(wanted.settings, default=str)) != existing.settings:
        raise ConfigError(f"{out} was made with other settings: {differences(existing, wanted)}. Use a new --out "
                          "directory, or --overwrite to start this one again.")


def differences(old: JobPlan, new: JobPlan) -> str:
    """What differs between an output's plan and the one these settings make: `a.b: old then, new now; ...`."""
    diffs = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        elif a != b:
            diffs.append(f"{where}: {a!r} then, {b!r} now")

    # Through JSON both ways, so a tuple now and the list it became in plan.json compare equal.
    now = json.loads(json.dumps({"settings": new.settings, "vae": new.vae}, default=str))
    walk({"settings": old.settings, "vae": old.vae}, now, "")
    return "; ".join(diffs[:6]) or "the input clips differ"


def write_naming_path(path: Path, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run `write(*args, **kwargs)`; an OSError (read-only, full disk, --out under a file) becomes a message
    naming `path`."""
    try:
        write(*args, **kwargs)
    except OSError as e:
        with contextlib.suppress(OSError):
            remove_temporaries(path)  # free the space a half-written temporary holds
        raise ConfigError(f"cannot write {path}: {e.strerror or e}. Fix it (free space, permissions, another "
                          "--out) and run the same command again: finished shards are kept") from e


def clear_outputs(out: Path, job_plan: JobPlan) -> None:
    """What `--overwrite` removes: the files latentcache wrote under `plan` (shard tars, their sidecars and
    temporaries, --reencode-changed's carry tars, chunk plans, inputs files, the input lists' record), manifest,
    failures and plan; never another file, even under shards/ (only emptied folders go)."""
    folders: set[Path] = set()
    removed: list[Path] = []

    def remove(path: Path) -> bool:
        remove_temporaries(path)
        if path.is_file():
            path.unlink()
            removed.append(path)
            return True
        return False

    shard_tars = carry_tars = 0
    for ref in job_plan.chunk_refs():
        chunk_file = out / ref.plan_name
        if chunk_file.is_file():
            for shard in chunks.read_chunk_plan(out, job_plan, ref).shards:
                path = out / shard.relpath
                shard_tars += remove(path)
                remove(sidecar_of(path))
                folders.add(path.parent)
            carry = out / carry_name(ref.part, ref.chunk)  # --reencode-changed's (reencode.py)
            remove(sidecar_of(carry))
            carry_tars += remove(carry)
        remove(chunk_file)
        folders.add(chunk_file.parent)
    for part in job_plan.parts:
        for name in (inputs_name(part.index), keys_name(part.index)):
            remove(out / name)
            folders.add((out / name).parent)
    # The input lists' record (rerun_inputs.py) is latentcache's own file at its own name: a later run's inputs must
    # not be compared with the lists of a run that --overwrite started again from nothing.
    for name in (INPUT_LISTS_RECORD, MANIFEST_FILE, FAILURES_FILE, PLAN_FILE):
        remove(out / name)
    carried = f" and {carry_tars} carry tar(s) of --reencode-changed" if carry_tars else ""
    # Said, not only done: the user sees what --overwrite took (and that nothing else went).
    log.warning("--overwrite: removed %d file(s) that latentcache wrote in %s (%d shard tar(s)%s with their sidecars, "
                "the plan, chunk plans, inputs files, manifest, failures), e.g. %s; nothing else was touched",
                len(removed), out, shard_tars, carried,
                ", ".join(str(p)[len(str(out)):].lstrip("/") for p in removed[:3]) or "-")
    for folder in sorted(folders, reverse=True) + [out / name for name in OUTPUTS[:3]]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
