"""The encode job: load the VAE, plan once, encode this process's share, sum up, and finalize when all is done.

One entry, `run(settings, world)`, for every launcher: `latentcache encode` (cli.py), `latentcache demo` (demo.py)
and `accelerate launch` / SLURM array tasks (jobs/encode.py). The settings are typed and built once by the caller
(`cli.settings_from_args`, or by hand); `World` says where this process runs (rank, world size, main or not, and
the two collectives), as datatrove's executors pass rank and world size to each step. Nothing here reads argparse,
environment variables or global process groups.

Like the CLI, this is the front end's half: it prints the lines a user reads, owns the progress bar and returns the
exit code (the library modules it calls only log).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentcache.encode.settings import JobSettings
from latentcache.errors import LatentcacheError
from latentcache.format.out_layout import FAILURES_FILE, MANIFEST_FILE
from latentcache.format.outcomes import Tally, tally

if TYPE_CHECKING:  # imported where used: `latentcache --help` loads neither torch nor diffusers
    from latentcache.encode.chunk_plan import ChunkPlan, PlannedShard
    from latentcache.encode.execute import RunSummary
    from latentcache.encode.job_plan import JobPlan
    from latentcache.encode.models.text import TextEncoder
    from latentcache.encode.models.vae import VideoVAE

# Exit codes: 0 all inputs done, 1 crash (a bug: traceback), 2 usage or configuration error, 3 finished but some
# inputs failed (see OUT/failures.jsonl), 4 finished but the output holds no sample at all (every input skipped or
# failed): a trainer started on it would run zero steps.
EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_NO_SAMPLES = 0, 1, 2, 3, 4


def _no_barrier() -> None:
    pass


def _alone(values: list[float]) -> list[float]:
    return values


@dataclass(frozen=True, slots=True, kw_only=True)
class World:
    """Where this process runs: its global rank among `world_size` processes that share the shards.

    `barrier` waits for the processes launched together; `reduce_sum` adds a list of numbers over them (an
    all-reduce: the planning collective and the job summary). A SLURM array spans several launches that never
    meet: `world_size` counts all their processes, while `barrier` and `reduce_sum` reach only this launch's (see
    jobs/encode.py).
    """

    rank: int = 0
    world_size: int = 1
    is_main: bool = True
    barrier: Callable[[], None] = _no_barrier
    reduce_sum: Callable[[list[float]], list[float]] = _alone
    # The device this process was given by its launcher (accelerate's `cuda:3`); None: settings.runtime.device.
    device: str | None = None
    # This process's index on its machine: its progress bar's line.
    local_rank: int = 0


def run(settings: JobSettings, world: World = World()) -> int:
    """Encode this process's share of the shards; the main process prints the job's summary and, once no planned
    shard is left anywhere, finalizes (writes the manifest). Returns an exit code.

    Any process may finalize once no planned shard is left, so SLURM array tasks need no barrier between them.
    """
    started = time.perf_counter()
    fits_checked = check_before_loading(settings)
    if settings.dry_run:
        return print_dry_run(settings, world, fits_checked) if world.is_main else EXIT_OK
    vae, texts = _load_encoders(settings, world, fits_checked)
    job_plan, failed = _job_plan(settings, world, vae)
    if failed:
        return EXIT_USAGE  # the main process prints why
    share, failed = _on_every_rank(world, lambda: _Share.make(settings, world, job_plan))
    if failed:
        return EXIT_USAGE  # the rank that refused prints why
    redo, kept = _damaged(settings, world, share) if settings.repair else (frozenset[str](), {})
    summary = _encode_share(settings, world, share, vae, texts, redo)
    clips = share.tally(summary.failures)
    _print_share_summary(settings, world, summary, clips, vae)
    return _end_of_share(settings, world, share, summary, clips, len(kept), vae, started)


def _load_vae(settings: JobSettings, world: World, fits_checked: bool) -> VideoVAE:
    """The VAE on this process's device. The clip settings are checked against it here when its config could not be
    read before it loaded (`check_before_loading`), so they are checked once either way."""
    from latentcache.encode.chunk_plan import check_fits_vae
    from latentcache.encode.models.vae import load_vae

    vae = load_vae(settings.encode.vae, world.device or settings.runtime.device)
    if not fits_checked:
        check_fits_vae(settings.encode.clip, vae.spec)
    return vae


def _load_encoders(settings: JobSettings, world: World, fits_checked: bool) -> tuple[VideoVAE, TextEncoder | None]:
    """The VAE on this process's device, tuned, and the text encoder when prompt embeddings are cached (else None)."""
    encode, runtime = settings.encode, settings.runtime
    vae = _load_vae(settings, world, fits_checked)
    if encode.image_latents:
        vae.check_image_condition()  # the family is known before loading; the VAE's own layout only now
    vae.tune(compile_encoder=runtime.compile)
    texts = None
    if encode.text is not None:
        from latentcache.encode.models.text import load_text_encoder

        texts = load_text_encoder(encode.text, encode.vae.family, vae.device)
    # A VAE with random weights is said once, by load_vae's warning (a second note here printed it twice).
    return vae, texts


def _job_plan(settings: JobSettings, world: World, vae: VideoVAE) -> tuple[JobPlan, bool]:
    """The job's top-level plan, made (or read and extended) by the main process and read back by the others;
    (job plan, True) when the main process refused it (it prints why)."""
    from latentcache.encode import planning
    from latentcache.encode.input_stats import list_identity
    from latentcache.encode.inputs import iter_inputs
    from latentcache.encode.job_plan import read_job_plan

    out = settings.out

    def make_plan() -> JobPlan:
        # Streamed into the compact table load_or_make_plan builds; no video is opened for the top-level plan.
        inputs = iter_inputs(settings.inputs, exclude=[out], images=settings.encode.clip.images)
        # Taken before the lists are read: unchanged lists are not read again (`rerun_inputs.lists_unchanged`).
        lists = list_identity([str(i) for i in settings.inputs])
        return planning.load_or_make_plan(out, inputs, settings.encode, vae, overwrite=settings.overwrite,
                                          chunk_size=settings.chunk_size, lists=lists, world_size=world.world_size)

    new_out = not out.exists()
    try:
        job_plan, failed = _on_every_rank(world, make_plan if world.is_main else lambda: None)
    except LatentcacheError:
        if new_out and world.is_main:
            release_output(out)  # refused before anything was planned: no OUT holding only `.latentcache`
        raise
    if not failed and not world.is_main:
        job_plan = read_job_plan(out)
    return job_plan, failed


@dataclass(slots=True)
class _Share:
    """This rank's share of the job: its chunk plans, and which of them this run planned (probed) itself."""

    job_plan: JobPlan
    chunk_plans: list[ChunkPlan]
    # Chunks this run plans (probes) itself: their refused inputs are this run's work; read-back ones were counted
    # by the run that planned them.
    fresh: list[bool]

    @staticmethod
    def make(settings: JobSettings, world: World, job_plan: JobPlan) -> _Share:
        """Each rank probes only its own chunks' inputs (or reads their chunk plans from an earlier run, checking that
        its inputs did not change since)."""
        from latentcache.encode import planning
        from latentcache.encode.job_plan import chunks_for_rank

        out = settings.out
        fresh = [not (out / ref.plan_name).is_file() for ref in chunks_for_rank(job_plan, world.rank,
                                                                                      world.world_size)]
        chunk_plans = planning.plan_chunks(out, job_plan, settings.encode, rank=world.rank, world_size=world.world_size,
                                           strict=settings.runtime.strict, reencode_changed=settings.reencode_changed)
        return _Share(job_plan, chunk_plans, fresh)

    @property
    def shards(self) -> list[PlannedShard]:
        return [s for chunk in self.chunk_plans for s in chunk.shards]

    def tally(self, failures: list[dict[str, Any]]) -> Tally:
        """This run's work on this rank's share: inputs refused by the planning it did, clips refused at decode or
        encode."""
        return tally([*(r for chunk, new in zip(self.chunk_plans, self.fresh, strict=True) if new
                        for r in chunk.rejected), *failures])


def _label(world: World) -> str:
    return f"rank {world.rank}" if world.world_size > 1 else "encode"


def _damaged(settings: JobSettings, world: World, share: _Share) -> tuple[frozenset[str], dict[str, str]]:
    """--repair: the damaged done shards of this share to write again, and those kept as they are (with why)."""
    from latentcache.encode import finalize, repair

    out, mine = settings.out, share.shards
    damaged = finalize.damaged_shards(out, mine)
    kept = repair.unrepairable(out, share.job_plan, share.chunk_plans, damaged)
    redo = frozenset(s.relpath for s in damaged if s.relpath not in kept)
    print(f"[{'rank ' + str(world.rank) if world.world_size > 1 else 'repair'}] {len(damaged)} of {len(mine)} "
          f"shard(s) do not match the sha256 their sidecar recorded{': writing them again' if redo else ''}")
    for relpath, why in kept.items():
        print(f"{out / relpath}: damaged, and kept as it is: {why}, so its samples cannot be made again. Put the "
              "sources back as they were and rerun with --repair (or restore the shard from a copy)")
    return redo, kept


def _encode_share(settings: JobSettings, world: World, share: _Share, vae: VideoVAE, texts: TextEncoder | None,
                  redo: frozenset[str]) -> RunSummary:
    """Encode the share's pending shards (and `redo`) under a progress bar; returns execute's RunSummary."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from latentcache.encode import execute, finalize

    out, mine, world_size = settings.out, share.shards, world.world_size
    pending = {s.relpath for s in finalize.pending_shards(out, mine)} | redo
    label = _label(world)
    if not mine:
        print(f"{out}: no clip to encode in {'the share of ' + label if world_size > 1 else 'the planned inputs'}")
    elif not pending:
        print(f"{out}: all {len(mine)} shard(s) {'of ' + label + ' ' if world_size > 1 else ''}are already done; "
              "nothing to encode")
    total = sum(len(s.keys) for s in mine)
    # One bar per rank at its own line; done shards count from the start so clips/s and the ETA stay honest.
    # Without a terminal (SLURM logs) a bar line every 30 s is a heartbeat, not noise.
    # Log lines go through tqdm.write while the bar is up, so a warning never splits a bar's line.
    with logging_redirect_tqdm(), tqdm(total=total, initial=sum(len(s.keys) for s in mine
                                                                if s.relpath not in pending),
                                       unit="clip", desc=label, position=world.local_rank, dynamic_ncols=True,
                                       leave=True, mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
        return execute.run(out, share.job_plan, vae, settings.encode, rank=world.rank, world_size=world_size,
                           on_clip=bar.update, texts=texts, chunk_plans=share.chunk_plans, runtime=settings.runtime,
                           redo=redo)


def _print_share_summary(settings: JobSettings, world: World, summary: RunSummary, clips: Tally,
                         vae: VideoVAE) -> None:
    print(f"[{_label(world)}] {summary.clips_written} clips in {summary.shards_written} shard(s) written "
          f"({summary.shards_redone} left unfinished by an earlier run"
          f"{f', {summary.shards_repaired} repaired' if settings.repair else ''}), "
          f"{summary.shards_skipped} shard(s) already done, {clips.describe()}, {summary.seconds:.1f}s "
          f"({summary.clips_per_second:.2f} clips/s on {vae.device}, {str(vae.dtype).split('.')[-1]})")


def _end_of_share(settings: JobSettings, world: World, share: _Share, summary: RunSummary, clips: Tally,
                  kept: int, vae: VideoVAE, started: float) -> int:
    """Mark this share done, sum the job's totals over the processes launched together; the main process prints
    them and finalizes once no share is left anywhere. Returns the exit code."""
    from latentcache.encode import finalize

    out, job_plan, world_size = settings.out, share.job_plan, world.world_size
    # Before the barrier: once every rank of the job has its marker, the main process of the last task runs the
    # full check; the others stop at a missing marker (a cost of their share, not of the dataset).
    finalize.mark_share_done(out, job_plan, world.rank, world_size, share.shards)
    totals = world.reduce_sum([1, summary.clips_written, clips.skipped_total, clips.failed_total,
                               summary.shards_written, summary.shards_redone, summary.seconds, kept])
    world.barrier()
    if not world.is_main:
        return EXIT_OK
    *totals, kept_total = totals
    print_job_summary(totals, time.perf_counter() - started, device_words(vae.device))
    waiting = finalize.first_share_pending(out, job_plan, world_size)
    if waiting is not None:
        print(f"{out}: the shares of other tasks are still being worked on (rank {waiting} of {world_size} has not "
              f"finished); the last task to finish writes the manifest (or run `latentcache finalize {out}` once all "
              "are done)")
        code = EXIT_OK
    else:
        code = _finish(out, job_plan)
    if kept_total:
        # The output stays damaged: a run that leaves a shard `verify` refuses never exits 0 (nor 3, "inputs failed").
        print(f"{out}: {int(kept_total)} damaged shard(s) could not be repaired (named above); kept as they are")
        return EXIT_USAGE if code in (EXIT_OK, EXIT_SOME_FAILED) else code
    return code


def _finish(out: Path, job_plan: JobPlan) -> int:
    """Finalize when nothing is left of the plan as it is on disk now: an append started while this run worked
    (docs/distributed.md allows one) adds a part that this run never saw, and the run that appended it finishes it
    and writes the manifest. So this run's own inputs being done, it exits 0 saying so, also when the append lands
    between its check and its finalize."""
    from latentcache.encode import finalize
    from latentcache.encode.job_plan import read_job_plan
    from latentcache.errors import ShardFormatError

    left, unplanned = finalize.pending_in_job(out, job_plan)
    if left or unplanned:
        # SLURM array tasks cannot wait for each other: the last one to finish finds nothing left and finalizes.
        print(f"{out}: {left} shard(s) and {unplanned} unplanned chunk(s) are still being worked on by other tasks; "
              f"the last task to finish writes the manifest (or run `latentcache finalize {out}` once all are done)")
        return EXIT_OK
    current = read_job_plan(out)
    if len(current.parts) > len(job_plan.parts):
        left, unplanned = finalize.pending_in_job(out, current)
        if left or unplanned:
            print(_appended_since(out, job_plan, current, f"{left} shard(s) and {unplanned} unplanned chunk(s)"))
            return EXIT_OK
    try:
        return report_finalize(out)
    except ShardFormatError:
        now = read_job_plan(out)
        if len(now.parts) <= len(current.parts):
            raise
        print(_appended_since(out, job_plan, now, "its new inputs"))
        return EXIT_OK


def _appended_since(out: Path, job_plan: JobPlan, current: JobPlan, left: str) -> str:
    return (f"{out}: every input of this run is done; another run appended {len(current.parts) - len(job_plan.parts)} "
            f"part(s) of inputs since this one read the plan, and {left} of them are still being worked on: the run "
            f"that appended them writes the manifest when it ends (or run `latentcache finalize {out}` once it has)")


def check_inputs(paths: tuple[str, ...], exclude: list[Any], *, images: bool = False) -> None:
    """Refuse now what `iter_inputs` would refuse when the plan reads it: each local input is read up to its first
    video only (a path that does not exist, a folder or list with nothing to encode), so a typo costs a second, not
    a VAE load. Object-storage urls are left to the plan (a listing may be slow), and so are lists that exist: a
    rerun does not read an unchanged list at all (`rerun_inputs.lists_unchanged`)."""
    from latentcache.encode.inputs import LIST_SUFFIXES, iter_inputs
    from latentcache.storage import location

    for raw in paths:
        local = location.local(raw)
        if local is None or (local.is_file() and local.suffix.lower() in LIST_SUFFIXES):
            continue
        next(iter_inputs([raw], exclude, images=images), None)


def release_output(out: Path) -> None:
    """Undo `claim_output` on an OUT this run created and planned nothing into: its marker, then the folder if
    nothing else is in it. Only that file, which this run wrote, is removed."""
    from latentcache.format.out_layout import OUTPUT_MARKER

    try:
        (out / OUTPUT_MARKER).unlink(missing_ok=True)
        if not any(out.iterdir()):
            out.rmdir()
    except OSError:  # never made (under a file), not empty after all (another process), or object storage
        pass


def check_before_loading(settings: JobSettings) -> bool:
    """What can be refused in a second is refused before a multi-GB VAE loads or any input is probed: inputs that do
    not exist or hold nothing to encode (each read up to its first video; before diffusers is imported), frame counts
    and sizes the VAE cannot encode (from its config alone), buckets, --out holding someone else's files, and an
    output made with other settings. Returns whether the clip settings were checked against the VAE (False: its
    config could not be read before loading; `_load_vae` checks them then)."""
    from latentcache.encode.chunk_plan import check_fits_vae
    from latentcache.encode.models.vae_source import peek_spec
    from latentcache.encode.output import refuse_changed_settings, refuse_foreign_output

    check_inputs(settings.inputs, exclude=[settings.out], images=settings.encode.clip.images)
    spec = peek_spec(settings.encode.vae)
    if spec is not None:
        check_fits_vae(settings.encode.clip, spec)
    refuse_foreign_output(settings.out)
    refuse_changed_settings(settings.out, settings.encode, settings.overwrite)
    return spec is not None


def print_dry_run(settings: JobSettings, world: World, fits_checked: bool = False) -> int:
    from latentcache.encode.dry_run import dry_run

    vae = _load_vae(settings, world, fits_checked)
    result = dry_run(settings, vae, estimate=settings.estimate, world_size=world.world_size)
    for line in result.lines(settings.out, str(vae.device)):
        print(line)
    return EXIT_OK


def device_words(device: Any) -> str:
    """`cpu`, or `cuda (NVIDIA H100 80GB HBM3)`: what the job summary says the processes ran on."""
    if getattr(device, "type", None) == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(getattr(device, "type", device))


def print_job_summary(totals: list[float], wall_seconds: float, where: str = "") -> None:
    """Totals over the processes that ran together (one SLURM array task's, or the whole accelerate job's); `where`:
    the main process's device kind (every process of a launch runs on the same kind)."""
    processes, clips, skipped, failed, shards, redone, busy_seconds = totals
    # Device-hours as billed: every process holds its device for the whole wall time, busy or waiting.
    print(f"[job] {int(clips)} clips encoded into {int(shards)} shard(s) ({int(redone)} redone after an "
          f"interruption) by {int(processes)} process(es){' on ' + where if where else ''}, {int(skipped)} skipped, "
          f"{int(failed)} failed; "
          f"{wall_seconds:.1f}s wall, "
          f"{clips / wall_seconds if wall_seconds else 0.0:.2f} clips/s, "
          f"{processes * wall_seconds / 3600:.4f} device-hours ({busy_seconds / 3600:.4f} encoding)")


def report_finalize(out: Path) -> int:
    """Finalize and print the output's outcome. Skips (a policy, e.g. too short) are reported but are not failures.

    The exit status (docs/encoding.md#exit-codes): 4 while the output holds no sample; else 3 when finalizing
    records a failure that the output's failures.jsonl did not hold before (one no finished run reported yet: this
    run's, or a killed run's it resumed), else 0. So a rerun of a finished job, which adds nothing, exits 0 however
    many inputs failed earlier, and a run that finishes a job with failures exits 3 exactly once per failure."""
    from latentcache.encode.finalize import finalize_with_outcome

    reported = _reported_failures(out)
    manifest, outcome = finalize_with_outcome(out)
    lines = (out / FAILURES_FILE).read_text(encoding="utf-8").splitlines()
    new_failures = tally(json.loads(line) for line in lines if reported is None or line not in reported).failed_total
    counts, counted = manifest.counts, outcome["tally"]
    print(f"{out}: {counts['samples']} samples in {counts['shards']} shard(s); manifest at {out / MANIFEST_FILE}")
    print(f"videos: {outcome['videos']} input(s), {outcome['videos_with_clips']} with clips written; clips: "
          f"{counts['samples']} written of {counts['planned_clips']} planned; {counted.describe()}"
          + (f" (details in {out / FAILURES_FILE})" if counted.skipped or counted.failed else ""))
    if counts["samples"] == 0:
        why = nothing_written_hint(counted, outcome["clip"], outcome["videos"],
                                   temporal_compression=manifest.latent_spec.get("temporal_compression"),
                                   longest=_longest_too_short(lines))
        print(f"error: {out}: no sample was written. {why}", file=sys.stderr)
        return EXIT_NO_SAMPLES
    if counted.failed_total and not new_failures:
        print(f"{out}: its {counted.failed_total} failed input(s) or clip(s) were reported by an earlier run; this run "
              "added none (exit status 0)")
    elif new_failures:
        print(f"{out}: {new_failures} failed input(s) or clip(s) new in failures.jsonl (exit status 3)")
    return EXIT_SOME_FAILED if new_failures else EXIT_OK


def _reported_failures(out: Path) -> set[str] | None:
    """The records of failures.jsonl as a finished run left them, or None when no run finished (no manifest: a
    first run, a killed one, or one whose finalize died before the manifest, written after failures.jsonl)."""
    path = out / FAILURES_FILE
    if not ((out / MANIFEST_FILE).is_file() and path.is_file()):
        return None
    return set(path.read_text(encoding="utf-8").splitlines())


def _longest_too_short(lines: list[str]) -> float | None:
    """The longest duration among the inputs skipped as too short (their records' `seconds`), None if none says."""
    seconds = [r.get("seconds") for r in map(json.loads, lines) if r.get("reason") == "too short"]
    known = [x for x in seconds if isinstance(x, int | float)]
    return max(known) if known else None


def nothing_written_hint(counted: Tally, clip: dict[str, Any], inputs: int, *,
                         temporal_compression: int | None = None, longest: float | None = None) -> str:
    """Why an output holds no sample, and the flag that would change it: the most common skip or failure."""
    reasons = (counted.skipped + counted.failed).most_common(1)
    if not reasons:
        return f"{inputs} input(s) gave no clip to encode."
    reason, n = reasons[0]
    if reason == "too short" and counted.skipped[reason]:
        who = f"All {inputs} input(s) are" if n == inputs else f"{n} of {inputs} input(s) are"
        return f"{who} {too_short_hint(clip, temporal_compression, longest)}"
    word = "skipped" if counted.skipped[reason] else "failed"
    return f"Most common: {n} {word}, {reason}; see failures.jsonl in the output for each input and why."


def too_short_hint(clip: dict[str, Any], k: int | None, longest: float | None) -> str:
    """'shorter than ...; try ...', with numbers that fit: the largest frame count of the VAE's frame rule (k*n+1)
    that the longest skipped input holds, and the --fps from which the clip in use fits it (a clip of F frames
    at R fps spans (F-1)/R seconds and fits a video strictly longer than that, as `plan.clip_starts` decides)."""
    frames, fps = int(clip.get("frames") or 1), float(clip.get("fps") or 1.0)
    smallest = min([frames, *(int(f) for f in clip.get("frame_buckets") or ())])
    said = f"shorter than {smallest} frames at {fps:g} fps ({(smallest - 1) / fps:.1f} s)"
    if longest is None or not k or longest <= 0:
        return f"{said}; try fewer --frames or --frame-buckets, a higher --fps or --short pad."
    n = math.ceil(longest * fps / k) - 1
    faster = math.floor((smallest - 1) / longest) + 1
    holds = (f"holds {k * n + 1} frames at {fps:g} fps ({k}k+1 for this VAE)" if n >= 1 else
             f"holds no clip of this VAE's {k}k+1 frames at {fps:g} fps")
    tries = [f"--frame-buckets {k * n + 1} (or --frames {k * n + 1})"] if n >= 1 else []
    return (f"{said}; the longest is {longest:.2f} s and {holds}: try "
            + ", ".join([*tries, f"--fps {faster}", "--short pad"]) + ".")


def _on_every_rank(world: World, step: Callable[[], Any]) -> tuple[Any, bool]:
    """Run `step` on this rank, then a collective rather than a bare barrier: every rank learns whether any rank's
    step was refused (other settings, bad inputs, a changed input in its share), so one refusal stops them all at
    once instead of leaving the others to wait or to read a stale file. This rank's own refusal is raised; (result,
    True) means another rank refused (it prints why)."""
    error: LatentcacheError | None = None
    result = None
    try:
        result = step()
    except LatentcacheError as e:
        error = e
    [failed] = world.reduce_sum([1.0 if error is not None else 0.0])
    if error is not None:
        raise error
    return result, bool(failed)
