"""Shards written on one background thread, so the encode loop (and the accelerator) never waits on a tar, its
sha256, an fsync or a PUT.

Bounded: at most `depth` shards wait while one is written, so at most depth + 1 shards' latents are in memory.
"Done" stays the sidecar that `write_shard` writes last: a shard still queued when the run stops was never started,
and the one being written is finished (or left as a temporary that the next run redoes), never counted half-done.
A writer's error is raised in the main thread at the next `submit` or at `close`, with the same error types the
synchronous write raised (ConfigError naming the file for a full disk, for example).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class ShardWriter:
    """Runs write jobs in order on one thread; `submit` blocks while `depth` jobs already wait."""

    def __init__(self, depth: int = 1) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        # daemon: a main thread killed by an unexpected BaseException never hangs the interpreter on its writer.
        self._thread = threading.Thread(target=self._loop, name="latentcache-shard-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue  # after one failure the rest are dropped: the rerun writes them
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`; raises the error of an earlier job instead, if one failed."""
        self._raise()
        self._queue.put(job)  # the loop keeps draining even after a failure, so this never blocks forever

    def close(self) -> None:
        """Wait for every queued job; raise the first error one of them had."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop after the job being written (if any); queued jobs are dropped unwritten. For the exception path."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        if error is None:
            self.close()
        else:
            self.abort()  # the main thread's error (or KeyboardInterrupt) is the one raised
