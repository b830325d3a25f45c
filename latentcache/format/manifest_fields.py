"""The types of a manifest's informational fields (`vae`, `settings`, `counts`, `buckets`, `software`, `dtype`).

A manifest may come from a stranger: `info`, `verify`, `check-config`, SAT's reader and the exports all print or
compare these fields, so a `software` that is a string or a `counts.skipped_by_reason` that is a list must be named as
the manifest's problem when it is read, not met later as an AttributeError. `field_problems` checks every field those
readers use; `normalized` turns the ones a manifest may leave out (or null) into empty objects, so that every reader
gets the same shape.
"""

from __future__ import annotations

import math
from typing import Any

# Top-level objects a reader may look into; null or absent means "not recorded".
OBJECTS = ("vae", "counts", "settings", "buckets")
# The VAE identity's text fields, and settings.clip's.
VAE_TEXT = ("class_name", "source", "revision", "config_hash", "subfolder", "family", "dtype")
# The largest count a manifest may hold: int64, what every reader's arithmetic on it fits in.
MAX_COUNT = 2**63 - 1


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _positive_number(value: Any) -> bool:
    try:
        return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                and 0 < value <= 1e9)
    except OverflowError:  # an int past a float's range
        return False


def _counts_by_name(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _count(v) for k, v in value.items())


def _text_or_null(value: Any) -> bool:
    return value is None or isinstance(value, str)


def field_problems(manifest: dict[str, Any]) -> list[str]:
    """What in the manifest's informational fields is not of the type latentcache writes; [] if all are."""
    problems = [f"{name} is a {type(manifest[name]).__name__}, expected an object" for name in OBJECTS
                if manifest.get(name) is not None and not isinstance(manifest[name], dict)]
    if problems:
        return problems
    problems += _vae_problems(manifest.get("vae") or {})
    counts = manifest.get("counts") or {}
    problems += [f"counts.{name} is {_shown(counts[name])}, expected a count" for name in ("samples", "failures")
                 if counts.get(name) is not None and not _count(counts[name])]
    problems += [f"counts.{name} is {_shown(counts[name])}, expected an object of reason -> count"
                 for name in ("skipped_by_reason", "failed_by_reason")
                 if counts.get(name) is not None and not _counts_by_name(counts[name])]
    if not _counts_by_name(manifest.get("buckets") or {}):
        problems.append(f"buckets is {_shown(manifest['buckets'])}, expected an object of bucket -> samples")
    settings = manifest.get("settings") or {}
    clip = settings.get("clip")
    if clip is not None and not isinstance(clip, dict):
        problems.append(f"settings.clip is {_shown(clip)}, expected an object")
    elif clip:
        if clip.get("fps") is not None and not _positive_number(clip["fps"]):
            problems.append(f"settings.clip.fps is {_shown(clip['fps'])}, expected a positive number")
        if clip.get("frames") is not None and not _count(clip["frames"]):
            problems.append(f"settings.clip.frames is {_shown(clip['frames'])}, expected a count")
        if not _text_or_null(clip.get("resize")):
            problems.append(f"settings.clip.resize is {_shown(clip['resize'])}, expected a name")
    if settings.get("image_latents") is not None and not isinstance(settings["image_latents"], bool):
        problems.append(f"settings.image_latents is {_shown(settings['image_latents'])}, expected true or false")
    if not _text_or_null(manifest.get("dtype")):
        problems.append(f"dtype is {_shown(manifest['dtype'])}, expected a name such as 'bfloat16'")
    return problems + _software_problems(manifest.get("software"))


def _vae_problems(vae: dict[str, Any]) -> list[str]:
    problems = [f"vae.{name} is {_shown(vae[name])}, expected text" for name in VAE_TEXT
                if not _text_or_null(vae.get(name))]
    weights = vae.get("weights")
    if weights is not None and not (isinstance(weights, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in weights.items())):
        problems.append(f"vae.weights is {_shown(weights)}, expected an object of file name -> sha256")
    if vae.get("random_weights") is not None and not isinstance(vae["random_weights"], bool):
        problems.append(f"vae.random_weights is {_shown(vae['random_weights'])}, expected true or false")
    return problems


def _software_problems(software: Any) -> list[str]:
    if software is None:
        return []
    if not isinstance(software, list):
        return [f"software is {_shown(software)}, expected a list of records"]
    for i, record in enumerate(software):
        if not isinstance(record, dict):
            return [f"software[{i}] is {_shown(record)}, expected an object"]
        if record.get("shards") is not None and not _count(record["shards"]):
            return [f"software[{i}].shards is {_shown(record['shards'])}, expected a count"]
        odd = next((k for k, v in record.items() if isinstance(v, dict | list)), None)
        if odd is not None:
            return [f"software[{i}].{odd} is {_shown(record[odd])}, expected a version or a name"]
    return []


def normalized(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its informational objects present: null or absent ones become {} (`software` []), as
    every reader expects an object it can look into."""
    for name in OBJECTS:
        if manifest.get(name) is None:
            manifest[name] = {}
    if manifest.get("settings", {}).get("clip") is None:
        manifest["settings"]["clip"] = {}
    if manifest.get("software") is None:
        manifest["software"] = []
    return manifest
