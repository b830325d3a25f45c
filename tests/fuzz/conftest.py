"""The fuzz tier's base output, encoded once per session (fuzz_targets.build_base)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_targets import build_base


@pytest.fixture(scope="session")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(tmp_path_factory.mktemp("fuzz_base"))
