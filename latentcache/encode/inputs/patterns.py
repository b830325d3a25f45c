"""Glob and brace patterns of inputs (`shards/{00000..00009}.tar`, `videos/*.mp4`) -> the paths they name."""

from __future__ import annotations

import glob
from pathlib import Path

from latentcache.errors import ConfigError


def is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[") or ("{" in text and "}" in text)


def expand(pattern: str) -> tuple[Path, list[Path]]:
    """A brace list (`{00000..00009}`, `{a,b}`) and/or glob -> (the folder before its first wildcard, the paths).

    Every name a brace list spells must exist, and every glob must match: a missing shard is a mistake to report,
    not a smaller dataset to encode silently."""
    from braceexpand import braceexpand  # installed with webdataset

    matches: list[Path] = []
    for name in braceexpand(pattern):
        if any(c in name for c in "*?["):
            hits = sorted(glob.glob(name))
            if not hits:
                raise ConfigError(f"input pattern {pattern!r}: {name!r} matches no file")
            matches.extend(Path(h) for h in hits)
        elif Path(name).exists():
            matches.append(Path(name))
        else:
            raise ConfigError(f"input pattern {pattern!r}: {name!r} does not exist")
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if is_pattern(part) or "{" in part:
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path("."), matches
