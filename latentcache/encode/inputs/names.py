"""Which names are inputs: suffixes that are never videos, and names that are not UTF-8 text (a warning, not an
input, in a folder or a tar; an error when given by itself)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


NOT_VIDEO_SUFFIXES = {".txt", ".json", ".jsonl", ".csv", ".md", ".srt", ".vtt", ".jpg", ".jpeg", ".png", ".webp",
                      ".parquet"}


def is_text(name: str) -> bool:
    """Whether a name is UTF-8 text: the OS hands names holding other bytes over as surrogate escapes, which no
    JSON file (plan, inputs, sample JSON) can hold."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_name(name: str) -> str:
    """A name as text, its bytes that are not UTF-8 shown as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def warn_not_utf8(path: str) -> None:
    # One file of a folder or tar: a warning, not the run (like a hidden file, it is not an input).
    log.warning("%s: the file name is not UTF-8 (bytes shown as \\xNN); not an input: rename it to encode it",
                shown_name(path))
