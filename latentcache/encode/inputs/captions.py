"""Caption sidecars: `NAME.txt` beside a video (a folder's, a list's or an object prefix's) is its caption.

A sidecar is a stranger's file like any input: it is read up to a bound, never whole, so a multi-GB `.txt` beside a
video is a clear error naming it rather than the run's memory. The bound is the one a list's caption cell has.
"""

from __future__ import annotations

from pathlib import Path

from latentcache.errors import ConfigError
from latentcache.storage import location

# The longest caption read, from a sidecar or a CSV cell (a detailed caption, or a span table's list of them).
MAX_CAPTION_BYTES = 16 << 20


def _caption(data: bytes, where: str) -> str | None:
    if len(data) > MAX_CAPTION_BYTES:
        raise ConfigError(f"{where}: a caption sidecar longer than {MAX_CAPTION_BYTES} bytes; a caption is text, "
                          "a few KB at most. Move the file away or shorten it")
    return data.decode("utf-8", errors="replace").strip() or None


def local_caption(video: Path) -> str | None:
    """The caption in `video`'s `.txt` sidecar, or None where there is none (or the OS cannot look its name up)."""
    sidecar = video.with_suffix(".txt")
    try:
        if not sidecar.is_file():
            return None
        with sidecar.open("rb") as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
    except (OSError, ValueError):
        return None  # a name the OS cannot even look up (too long): no sidecar; the input itself fails when probed
    return _caption(data, str(sidecar))


def object_caption(url: str) -> str | None:
    """The caption in the object `url` (a sidecar listed beside a video under an object prefix)."""
    return _caption(location.read(url, MAX_CAPTION_BYTES), url)
