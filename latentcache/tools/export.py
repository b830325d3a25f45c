"""`latentcache export TRAINER OUT --to DIR`: which trainers' caches latentcache writes, and why not the others.

Each trainer is one module (`export_<trainer>.py`) on export_common.py; this module only names them, so the CLI and
a user who asks for another trainer get the same list."""

from __future__ import annotations

import os
from typing import Any

from latentcache.errors import ConfigError
from latentcache.tools.export_common import ExportResult, Progress

# trainer -> (module, function, the options it takes, what it writes)
EXPORTS = {
    "musubi": ("latentcache.tools.export_musubi", "export_musubi", ("arch", "dtype", "seed"),
               "musubi-tuner's latent (and Wan T5) cache files: Wan 2.1/2.2 A14B, HunyuanVideo, HunyuanVideo 1.5, "
               "Kandinsky 5"),
    "ltx2": ("latentcache.tools.export_ltx2", "export_ltx2", (),
             "the LTX-2 trainer's .precomputed/latents/*.pt and the dataset file its process_captions.py reads"),
    "fastvideo": ("latentcache.tools.export_fastvideo", "export_fastvideo", (),
                  "FastVideo's training_dataset/ zstd Parquet rows (Wan, with cached UMT5 prompt embeddings)"),
}
# Trainers people ask for whose cache latentcache does not write, and why (docs/trainer.md "Per trainer").
NOT_EXPORTED = {
    "ai-toolkit": "its cache file is named by an md5 of its own bucketing (scale and crop) and frame settings, and "
                  "by default its frames are spread over the whole video (or start at a random frame), which a "
                  "latentcache clip does not match; docs/trainer.md has the evidence",
    "diffusion-pipe": "it caches into torch.save'd shards indexed by an SQLite table whose fingerprint hashes its own "
                      "dataset and caching function; a cache written from outside is cleared",
    "finetrainers": "its precomputed files hold whatever each model specification's processors return, per model",
}


def supported() -> str:
    return "; ".join(f"{name}: {entry[3]}" for name, entry in EXPORTS.items())


def run_export(trainer: str, source: str | os.PathLike, to: str | os.PathLike, *, dry_run: bool = False,
               progress: Progress | None = None, **options: Any) -> ExportResult:
    """Export `source` for `trainer`; options a trainer does not take (given, not None) are refused."""
    if trainer not in EXPORTS:
        why = f" ({NOT_EXPORTED[trainer]})" if trainer in NOT_EXPORTED else ""
        raise ConfigError(f"export {trainer}: not a trainer latentcache exports to{why}. Supported: {supported()}")
    module_name, function, accepted, _ = EXPORTS[trainer]
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - set(accepted))
    if extra:
        raise ConfigError(f"export {trainer}: --{extra[0].replace('_', '-')} is not an option of this export "
                          f"(it takes {', '.join('--' + a for a in accepted) or 'none'})")
    import importlib

    export = getattr(importlib.import_module(module_name), function)
    return export(source, to, dry_run=dry_run, progress=progress, **given)
