"""Caption sidecars are read up to a bound (latentcache/encode/inputs/captions.py): a `.txt` beside a video that is far
longer than any caption is refused naming it, in a folder and under an object prefix, instead of being read whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3_server import make_bucket, upload  # the S3 fixture itself, `s3_endpoint`, is conftest's

from latentcache.encode.inputs import captions, iter_inputs
from latentcache.errors import ConfigError
from latentcache.tools.synthetic import write_video


def _folder(tmp_path: Path, caption: bytes) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    write_video(d / "a", codec="h264", num_frames=24)
    (d / "a.txt").write_bytes(caption)
    return d


def test_a_sidecar_caption_is_read_and_stripped(tmp_path: Path) -> None:
    d = _folder(tmp_path, b" a red square\n")
    [video] = list(iter_inputs([str(d)], []))
    assert video.caption == "a red square"


def test_a_sidecar_past_the_bound_is_refused_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(captions, "MAX_CAPTION_BYTES", 1000)  # the real bound is 16 MiB; the rule is the same
    d = _folder(tmp_path, b"x" * 1001)
    with pytest.raises(ConfigError, match=r"a\.txt: a caption sidecar longer than 1000 bytes"):
        list(iter_inputs([str(d)], []))
    (d / "a.txt").write_bytes(b"x" * 1000)
    [video] = list(iter_inputs([str(d)], []))
    assert video.caption == "x" * 1000


def test_an_object_sidecar_past_the_bound_is_refused_naming_it(s3_endpoint: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    d = _folder(tmp_path, b"y" * 5000)
    url = make_bucket("captions") + "/videos"
    upload(d, url)
    monkeypatch.setattr(captions, "MAX_CAPTION_BYTES", 1000)
    with pytest.raises(ConfigError, match=r"s3://captions/videos/a\.txt: a caption sidecar longer than 1000"):
        list(iter_inputs([url], []))
    monkeypatch.setattr(captions, "MAX_CAPTION_BYTES", 5000)
    [video] = list(iter_inputs([url], []))
    assert video.caption == "y" * 5000
