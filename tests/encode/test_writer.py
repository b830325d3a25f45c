"""The background shard writer: errors reach the main thread, a stopped run leaves queued shards unwritten."""

from __future__ import annotations

import threading

import pytest

from latentcache.encode.writer import ShardWriter
from latentcache.errors import ConfigError


def test_a_writer_error_is_raised_in_the_main_thread_and_later_jobs_are_dropped():
    ran: list[int] = []

    def bad() -> None:
        raise ConfigError("cannot write x.tar: No space left on device")

    writer = ShardWriter()
    writer.submit(bad)
    writer.submit(lambda: ran.append(1))
    with pytest.raises(ConfigError, match="x.tar"):
        writer.close()
    assert ran == []


def test_an_error_in_the_main_thread_stops_the_writer_without_writing_what_waits():
    gate, ran = threading.Event(), []
    with pytest.raises(KeyboardInterrupt), ShardWriter(depth=1) as writer:
        writer.submit(gate.wait)  # being written
        writer.submit(lambda: ran.append("queued"))
        gate.set()
        raise KeyboardInterrupt
    assert not writer._thread.is_alive()
    assert ran in ([], ["queued"])  # the queued one may have started before the interrupt; never half-counted
