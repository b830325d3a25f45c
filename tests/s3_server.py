"""A real S3 API server for tests: moto's server on 127.0.0.1, reached over HTTP by s3fs/botocore, and two helpers.

Shared by the object-storage tests of every area (tests/storage, tests/encode). The fixture `s3_endpoint` (conftest.py)
runs it once per session.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server() -> Iterator[str]:
    """A real S3 API server, with the environment a user's credentials would come from (tests/conftest.py makes it
    the session fixture `s3_endpoint`)."""
    from moto import server as moto_server

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


def make_bucket(name: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem()
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


def upload(local: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.pipe_file(f"{url.removeprefix('s3://')}/{f.relative_to(local).as_posix()}", f.read_bytes())
