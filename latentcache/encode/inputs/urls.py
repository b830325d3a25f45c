"""Object-storage urls -> `InputVideo` records: the objects under a prefix (`s3://bucket/videos/`), or one object."""

from __future__ import annotations

import os
from collections.abc import Iterator

from latentcache.encode.chunk_plan import InputVideo
from latentcache.encode.decoding.image import IMAGE_SUFFIXES
from latentcache.encode.inputs.captions import object_caption
from latentcache.encode.inputs.names import NOT_VIDEO_SUFFIXES
from latentcache.errors import ConfigError
from latentcache.format.out_layout import OUTPUT_MARKER
from latentcache.storage import store
from latentcache.storage.trust import UnsupportedUrl


def from_url(url: str, exclude: set[str], images: bool) -> Iterator[InputVideo]:
    """Inputs under an object-storage prefix (`s3://bucket/videos/`), or one object; keys come from the path
    relative to the prefix, as for a local directory, so the same videos give the same keys in S3 and on disk.
    Hidden names, latentcache outputs (a folder holding OUTPUT_MARKER) and non-videos are skipped as in `folders.walk`;
    `NAME.txt` next to a video is its caption."""
    root = url.rstrip("/")
    try:
        found = store.list_files(root)
    except FileNotFoundError:
        found = []
    except UnsupportedUrl as e:  # http://, a '::' chain: typed by the user, so a usage error (exit 2)
        raise ConfigError(str(e)) from None
    if found == [root]:  # one object, not a prefix
        yield InputVideo(root, root.rsplit("/", 1)[-1], None)
        return
    rels = [f[len(root) + 1:] for f in found]
    outputs = {r.rsplit("/", 1)[0] for r in rels if r.rsplit("/", 1)[-1] == OUTPUT_MARKER}
    outputs |= {e[len(root) + 1:] for e in exclude if e.startswith(root + "/")}
    names = set(rels)
    given = 0
    for rel in rels:
        parts = rel.split("/")
        suffix = os.path.splitext(rel)[1].lower()
        if any(p.startswith(".") for p in parts) or any("/".join(parts[:i]) in outputs for i in range(1, len(parts))):
            continue
        if suffix in NOT_VIDEO_SUFFIXES and not (images and suffix in IMAGE_SUFFIXES):
            continue
        caption_rel = os.path.splitext(rel)[0] + ".txt"
        caption = None
        if caption_rel in names:
            caption = object_caption(store.join(root, caption_rel))
        given += 1
        yield InputVideo(store.join(root, rel), rel, caption)
    if not given:
        raise ConfigError(f"input {url!r} holds no objects to encode (hidden files, captions, lists, images without "
                          "--images and latentcache outputs are not inputs); is the bucket and prefix right, and are "
                          "AWS credentials and AWS_ENDPOINT_URL set?")
