"""Fixtures of the training tests: a session-wide clean cache and small composed configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.helpers import SMALL, compose_train


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scrimp-cache")


@pytest.fixture
def small_cfg(cache_dir, tmp_path):
    """``small_cfg(*overrides)``: a small composed config writing into this test's tmp dir."""

    def make(*overrides: str, run_dir: Path | None = None):
        return compose_train([*SMALL, f"data.cache_dir={cache_dir}", f"run_dir={run_dir or tmp_path / 'run'}",
                              *overrides])

    return make
