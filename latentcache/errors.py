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


class MissingDependency(ConfigError, ImportError):
    """An optional package a setting needs is not installed (s3fs for s3://, transformers for --text-encoder...):
    a usage error naming the extra to install (exit 2), and still an ImportError to code that tests for one."""


class InputError(LatentcacheError):
    """One input video (or one clip of it) could not be used. Recorded in failures.jsonl; the run goes on."""

    def __init__(self, path: str, stage: str, reason: str, *, skipped: bool = False) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.stage = stage
        self.reason = reason
        # A skip is a policy decision (e.g. the video is shorter than one clip), not a broken file.
        self.skipped = skipped
        self._error_type: str | None = None

    @property
    def error_type(self) -> str:
        """What went wrong, for failures.jsonl: "skipped", or the underlying exception's class name."""
        if self._error_type is not None:
            return self._error_type
        return "skipped" if self.skipped else type(self.__cause__ or self).__name__

    def __reduce__(self):
        # Decode workers send these across processes; keep what failure records need (the cause is not picklable).
        return (_rebuild_input_error, (self.path, self.stage, self.reason, self.skipped, self.error_type))


def _rebuild_input_error(path: str, stage: str, reason: str, skipped: bool, error_type: str) -> InputError:
    error = InputError(path, stage, reason, skipped=skipped)
    error._error_type = error_type
    return error


class ShardFormatError(LatentcacheError):
    """A shard or manifest is not what latentcache writes: unknown members, checksum or count mismatch."""


class LatentMismatchError(LatentcacheError):
    """The latents do not fit the model: wrong channels, pixels instead of latents, wrong frames or size."""
