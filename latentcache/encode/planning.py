"""Planning: the job's top-level plan (OUT/plan.json, made without opening a video) and this process's chunk plans.

Safe for processes that cannot wait for each other (SLURM array tasks): each makes the same plan from the same
inputs, and each probes only its own chunks (`job_plan.chunks_for_rank`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from latentcache.encode import chunks, rerun_inputs
from latentcache.encode.chunk_plan import ChunkPlan, InputVideo
from latentcache.encode.decoding.probing import VideoInfo
from latentcache.encode.job_plan import InputTable, JobPlan, auto_chunk_size, chunks_for_rank, make_part, read_job_plan
from latentcache.encode.models.provenance import vae_change
from latentcache.encode.models.vae import VideoVAE
from latentcache.encode.output import claim_output, clear_outputs, differences, write_naming_path
from latentcache.encode.settings import EncodeSettings, hash_json
from latentcache.errors import ConfigError
from latentcache.format.out_layout import PLAN_FILE
from latentcache.format.shards import pause_point, write_text_atomic

log = logging.getLogger(__name__)


def vae_record(vae: VideoVAE) -> dict[str, Any]:
    return {"identity": vae.identity.to_dict(), "spec": vae.spec.to_dict(), "dtype": str(vae.dtype).split(".")[-1]}


def load_or_make_plan(out: Path, inputs: Iterable[InputVideo], settings: EncodeSettings, vae: VideoVAE, *,
                      overwrite: bool = False, chunk_size: int | None = None,
                      lists: list[dict[str, Any]] | None = None, world_size: int = 1) -> JobPlan:
    """The top-level plan: OUT/plan.json reused, extended by the inputs it lacks (a new part), or made. No video is
    opened here: each chunk is probed later by the rank that owns it (`plan_chunks`).

    Safe for processes that cannot wait for each other (SLURM array tasks): each makes the same plan from the same
    inputs and renames each file into place from its own temporary name, so whichever rename lands last, the bytes
    agree. Other settings or another VAE are refused, and so are earlier inputs that are not given again.

    `lists`: the identity of the input lists (`input_stats.list_identity`, taken before `inputs` is read). When it
    is the one recorded for plan.json, `inputs` is never read: the lists hold nothing new (see docs/distributed.md
    "Changed inputs").
    `chunk_size`: None for `job_plan.auto_chunk_size` over the new inputs and `world_size` (all processes of the job).
    """
    claim_output(out)  # before any probing: a wrong --out fails in a second, not after an hour of probes
    path = out / PLAN_FILE
    record = vae_record(vae)
    wanted = JobPlan(hash_json({"settings": settings.output_affecting(), "vae": record}), settings.output_affecting(),
                     record, [])
    if path.is_file():
        existing = read_job_plan(out)
        changed = vae_change(existing.vae.get("identity"), record["identity"], str(path))
        if changed and not overwrite:
            raise ConfigError(f"{out}: {changed}")
        if existing.fingerprint != wanted.fingerprint and not overwrite:
            raise ConfigError(f"{out} was made with other settings or another VAE: {differences(existing, wanted)}. "
                              "Use a new --out directory, or --overwrite to start this one again.")
        if existing.fingerprint == wanted.fingerprint and not overwrite:
            if rerun_inputs.lists_unchanged(out, existing, lists):
                log.info("%s: the input lists are the ones plan.json was made from; not read again", out)
                return existing
            return _append_and_record(out, existing, InputTable(inputs), chunk_size, world_size, lists)
        clear_outputs(out, existing)
    return _append_and_record(out, wanted, InputTable(inputs), chunk_size, world_size, lists)


def _append_and_record(out: Path, job_plan: JobPlan, table: InputTable, chunk_size: int | None,
                       world_size: int, lists: list[dict[str, Any]] | None) -> JobPlan:
    grown = _append(out, job_plan, table, chunk_size, world_size)
    # Captions read from sidecar files can change while the lists do not: then the lists are read on every run.
    rerun_inputs.record_lists(out, grown, None if table.sidecar_captions else lists)
    return grown


def _append(out: Path, job_plan: JobPlan, table: InputTable, chunk_size: int | None,
            world_size: int = 1) -> JobPlan:
    """The plan with the inputs it lacks added as one new part; the plan itself when there are none."""
    new = rerun_inputs.new_inputs(out, job_plan, table)
    if not len(new):
        return job_plan
    if job_plan.parts:
        log.info("%d new input(s): planned as part %d, the %d earlier part(s) stay as they are", len(new),
                 len(job_plan.parts), len(job_plan.parts))
    # A function of the new inputs and the world size alone: every task of the job agrees. The part records it, so
    # an output planned under an earlier rule resumes with its own chunk size.
    size = chunk_size or auto_chunk_size(len(new), world_size)
    part = make_part(out, len(job_plan.parts), table, new, size)
    grown = JobPlan(job_plan.fingerprint, job_plan.settings, job_plan.vae, [*job_plan.parts, part])
    # plan.json last: it names the part, whose files are in place by now.
    write_naming_path(out / PLAN_FILE, write_text_atomic, out / PLAN_FILE, grown.to_json())
    pause_point("planned")  # test-only kill moment (see shards.PAUSE_ENV); nothing when unset
    return grown


def plan_chunks(out: Path, job_plan: JobPlan, settings: EncodeSettings, *, rank: int = 0, world_size: int = 1,
                probe_fn: Callable[[str], VideoInfo] | None = None, strict: bool = False,
                reencode_changed: bool = False) -> list[ChunkPlan]:
    """This rank's chunk plans, read from OUT/chunks/ or made now: it probes only its own share of the inputs.
    `strict`: the first input that cannot be probed raises (see `plan.make_plan`). An input changed since its chunk
    was planned is refused, or with `reencode_changed` its chunk is planned again (see `chunks.plan_share`)."""
    return chunks.plan_share(out, job_plan, chunks_for_rank(job_plan, rank, world_size), settings, probe_fn=probe_fn,
                             strict=strict, reencode_changed=reencode_changed)
