"""`latentcache export ltx2 OUT --to DIR`: the LTX-2 trainer's precomputed latents from a latentcache output.

The format is the LTX-2 trainer's (Lightricks/LTX-2, packages/ltx-trainer), read at commit
400fd31054597515f47125691032c04b1c3ee24e; its code is under the LTX-2 Community License, so none is copied here
(tests/tools/test_export_ltx2.py cites the lines):
- scripts/process_videos.py compute_latents: one `torch.save` dict per clip at `<output_dir>/<media path relative to
  the dataset file's folder, suffix .pt>`: `latents` [128, F', H', W'] (unpatchified), `num_frames`, `height`,
  `width` (the latent sizes, ints) and `fps` (the clip's frame rate, a float); the VAE runs in bfloat16.
- ltx-core model/video_vae/video_vae.py VideoEncoder.forward: the latents are the posterior *means*, normalised by
  the VAE's per-channel statistics, `(mean - mean_of_means) / std_of_means` (no scaling factor).
- src/ltx_trainer/datasets.py PrecomputedDataset: globs `latents/**/*.pt` under the `.precomputed` folder and keeps
  a latents file only where `conditions/<the same relative path>` exists (a name starting with `latent_` is paired
  with `condition_...` instead), silently dropping the others.
- scripts/process_captions.py: reads a dataset file (`caption`, `media_path` columns) and writes each caption's
  Gemma features to `<output_dir>/<media_path relative to the dataset file's folder, suffix .pt>`.
So the export writes the latents and a `dataset.json` whose `media_path` names each clip as its latents file is
named; process_captions.py over it writes conditions files with exactly those names.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import PurePosixPath

import torch

from latentcache.errors import ConfigError
from latentcache.tools.export_common import (
    ExportResult,
    ExportSample,
    ExportTarget,
    Progress,
    meta_number,
    open_source,
    refused,
)

LATENTS_DIR = ".precomputed/latents"
CONDITIONS_DIR = ".precomputed/conditions"
DATASET_FILE = "dataset.json"
MAX_FPS = 1000.0


def _pt_bytes(data: dict) -> bytes:
    """torch.save's zip of the dict, in memory: the same dict gives the same bytes (checked by the tests). The
    trainer's format is a pickle; latentcache writes it and never loads one."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return buffer.getvalue()


def clip_name(sample: ExportSample) -> str:
    """The clip's name under latents/ and conditions/: its latentcache key (unique, deterministic, no dots)."""
    return sample.key


def check_pairing(sample: ExportSample, name: str, media_path: str) -> None:
    """The trainer's discovery rule: latents/NAME.pt is globbed (`**/*.pt`) and kept only when conditions/NAME.pt
    exists, where process_captions.py writes `media_path` with its suffix replaced by .pt; `latent_X.pt` is paired
    with `condition_X.pt` instead, which process_captions.py never writes."""
    rel = PurePosixPath(f"{name}.pt")
    from_captions = PurePosixPath(media_path).with_suffix(".pt")
    if rel != from_captions or rel.name.startswith("latent_") or media_path != media_path.strip():
        raise refused(sample.where, f"its LTX-2 latents file {rel} would not be paired with the conditions file "
                                    f"process_captions.py writes for it ({from_captions}), and the trainer drops it")


def ltx2_latents(sample: ExportSample, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """What the trainer's process_videos.py stores for this clip's pixels."""
    fps = meta_number(sample, "fps", most=MAX_FPS)
    if not fps:
        raise refused(sample.where, "its JSON has no frame rate (fps); the LTX-2 trainer needs the clip's rate")
    latents = ((sample.mean.float() - mean) / std).to(torch.bfloat16).contiguous()
    _, frames, height, width = latents.shape
    return {"latents": latents, "num_frames": frames, "height": height, "width": width, "fps": float(fps)}


def export_ltx2(source: str | os.PathLike, to: str | os.PathLike, *, dry_run: bool = False,
                progress: Progress | None = None) -> ExportResult:
    """Write the LTX-2 trainer's `.precomputed/latents/*.pt` and the dataset file for its caption script into `to`."""
    src = open_source(source)
    spec = src.spec
    if spec.family != "ltx2" or spec.latents_mean is None or spec.latents_std is None:
        raise ConfigError(f"{source}: a {spec.family} output; the LTX-2 trainer trains on the LTX-2 video VAE's "
                          "128-channel latents, normalised by its per-channel statistics: encode with an ltx2 VAE "
                          "(--family ltx2)")
    mean = torch.tensor(spec.latents_mean, dtype=torch.float32).view(-1, 1, 1, 1)
    std = torch.tensor(spec.latents_std, dtype=torch.float32).view(-1, 1, 1, 1)
    target = ExportTarget(to, "ltx2", str(source), dry_run=dry_run)
    entries = []
    uncaptioned = 0
    for sample in src.samples():
        if sample.image_mean is not None:
            raise refused(sample.where, "has image-to-video latents; the LTX-2 export writes video latents only")
        name = clip_name(sample)
        media_path = f"{name}.mp4"
        check_pairing(sample, name, media_path)
        target.write(f"{LATENTS_DIR}/{name}.pt", _pt_bytes(ltx2_latents(sample, mean, std)), sample.where)
        uncaptioned += not sample.caption
        entries.append({"caption": sample.caption or "", "media_path": media_path})
        if progress is not None:
            progress(1, src.total)
    dataset = json.dumps(entries, indent=1, ensure_ascii=False) + "\n"
    target.write(DATASET_FILE, dataset.encode("utf-8"), f"{target.root / DATASET_FILE}")
    result = target.finish()
    root = target.root
    if uncaptioned:
        result.notes.append(f"{uncaptioned} clip(s) have no caption: {DATASET_FILE} gives them an empty one")
    result.notes.append(
        f"python scripts/process_captions.py {root / DATASET_FILE} --output-dir {root / CONDITIONS_DIR} "
        "--model-path LTX2_CHECKPOINT.safetensors --text-encoder-path GEMMA_ROOT   (in packages/ltx-trainer)")
    result.notes.append(f"then train with data.preprocessed_data_root: {root / '.precomputed'} and a video-only "
                        "training_strategy (flexible, video: {is_generated: true, latents_dir: latents}, no audio "
                        "block): docs/trainer.md")
    return result
