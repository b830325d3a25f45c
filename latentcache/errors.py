"""Exceptions shared by every stage.

Stages raise these with the offending path and a reason; one place (the pipeline) turns an `InputError` into a
`failures.jsonl` record, everything else reaches the user as a message that says what was found, what was
expected and how to fix it.
"""

from __future__ import annotations


class LatentcacheError(ValueError):
    """Base class: a problem with the user's data or settings, not a bug in latentcache."""


class ConfigError(LatentcacheError):
    """Settings that cannot work (bad frame count, invalid tile size, unknown VAE...). CLI exit code 2."""


class InputError(LatentcacheError):
    """One input video (or one clip of it) could not be used. Recorded in failures.jsonl; the run goes on."""

    def __init__(self, path: str, stage: str, reason: str, *, skipped: bool = False) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.stage = stage
        self.reason = reason
        # A skip is a policy decision (e.g. the video is shorter than one clip), not a broken file.
        self.skipped = skipped


class ShardFormatError(LatentcacheError):
    """A shard or manifest is not what latentcache writes: unknown members, checksum or count mismatch."""


class LatentMismatchError(LatentcacheError):
    """The latents do not fit the model: wrong channels, pixels instead of latents, wrong frames or size."""
