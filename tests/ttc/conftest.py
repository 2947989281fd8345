"""Fixtures for scrimp.ttc tests: the ESC replay data from the shared folder."""

from __future__ import annotations

import pytest

from scrimp.ttc.replay import convert_esc, shared_data_dir

ESC_PATH = shared_data_dir() / "ttc" / "esc_gpt35_last_letters_t0.7.jsonl"


@pytest.fixture(scope="session")
def esc_prompts():
    if not ESC_PATH.is_file():
        raise FileNotFoundError(f"the shared ESC file is missing at {ESC_PATH} (set SCRIMP_SHARED_DIR)")
    return convert_esc(ESC_PATH)
