"""The CogVideoX-finetune layout of a dataset, as diffusers' CogVideoX training scripts and cogvideox-factory read
it: ROOT/videos.txt lists video paths relative to ROOT, and line i of ROOT/prompts.txt beside it is the caption of
line i. `lists._list_rows` reads such a `videos.txt` through `paired_rows`."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentcache.errors import ConfigError

log = logging.getLogger(__name__)

PAIRED_LISTS = ("videos.txt", "prompts.txt")


def prompts_beside(list_file: Path) -> Path | None:
    """`prompts.txt` beside a list named `videos.txt`: its captions, line by line."""
    videos, prompts = PAIRED_LISTS
    return list_file.parent / prompts if list_file.name == videos and (list_file.parent / prompts).is_file() else None


def paired_rows(videos: Path, prompts: Path) -> Iterator[dict[str, Any]]:
    """Rows of the CogVideoX-finetune layout, read as its training scripts read them: the non-empty lines of each
    file, stripped, paired in order; files of unequal line counts are refused (those scripts refuse them too)."""
    log.info("%s: captions from %s beside it, line i for line i (the CogVideoX-finetune layout)", videos, prompts)
    with open(videos, encoding="utf-8-sig", newline="") as vf, open(prompts, encoding="utf-8-sig", newline="") as pf:
        paths = (line.strip() for line in vf if line.strip())
        captions = (line.strip() for line in pf if line.strip())
        for n, (path, caption) in enumerate(itertools.zip_longest(paths, captions), 1):
            if path is None or caption is None:
                more, fewer = (prompts, videos) if path is None else (videos, prompts)
                raise ConfigError(f"{videos}: {more} has more non-empty lines than {fewer} ({n - 1} in the shorter); "
                                  f"line i of {prompts.name} is the caption of line i of {videos.name}: make them "
                                  "match line for line")
            yield {"path": path, "caption": caption}
