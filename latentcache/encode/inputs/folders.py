"""Folders -> `InputVideo` records: every file under a folder, recursively, without hidden files, caption sidecars,
lists, thumbnails (images without --images) and latentcache output directories; a tar inside is read as a tar of
videos (`tars`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from latentcache.encode.chunk_plan import InputVideo
from latentcache.encode.decoding.image import IMAGE_SUFFIXES
from latentcache.encode.inputs.captions import local_caption
from latentcache.encode.inputs.names import NOT_VIDEO_SUFFIXES, is_text, warn_not_utf8
from latentcache.encode.inputs.tars import tar_inputs
from latentcache.format.out_layout import OUTPUT_MARKER

log = logging.getLogger(__name__)


def folder_inputs(folder: Path, rel: str | None, skip: frozenset[Path], images: bool) -> Iterator[InputVideo]:
    """The inputs under `folder`, keyed by their path relative to it (prefixed by `rel`, its own path relative to a
    pattern's root; None: given by itself)."""
    prefix = f"{rel}/" if rel else ""
    for f in walk(folder, skip, images):
        name = prefix + f.relative_to(folder).as_posix()
        if not is_text(name):
            warn_not_utf8(str(f))
            continue
        if f.suffix.lower() == ".tar":
            yield from tar_inputs(f, name)
        else:
            yield InputVideo(str(f.resolve()), name, local_caption(f))


def walk(root: Path, exclude: frozenset[Path] = frozenset(), images: bool = False) -> Iterator[Path]:
    """Files under `root`, sorted, without hidden files and folders (.git, .cache, editors' temporaries) and without
    latentcache output directories (holding OUTPUT_MARKER, or in `exclude`): an --out inside the input directory
    must not have its own shards discovered as new inputs on the rerun. Image files only with `images` (--images)."""
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not _is_output(here / d, exclude)]
        found.extend(here / f for f in files if not f.startswith("."))
    left_images = 0
    for f in sorted(found):
        if not f.is_file():
            continue
        if f.suffix.lower() in NOT_VIDEO_SUFFIXES and not (images and f.suffix.lower() in IMAGE_SUFFIXES):
            # Caption sidecars, lists, thumbnails: never videos. Anything else is probed, whatever its extension.
            log.debug("not a video by its extension, not probed: %s", f)
            left_images += f.suffix.lower() in IMAGE_SUFFIXES
            continue
        yield f
    if left_images:  # said, not silent: the dry run's input count would otherwise just be smaller than the folder's
        log.warning("%s: %d image file(s) not taken (pass --images to encode still images as 1-frame samples)",
                    root, left_images)


def _is_output(folder: Path, exclude: frozenset[Path]) -> bool:
    if (folder / OUTPUT_MARKER).is_file() or folder.resolve() in exclude:
        log.info("%s is a latentcache output directory: not searched for inputs", folder)
        return True
    return False
