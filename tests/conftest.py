"""Shared fixtures: the ../shared folder beside the project, skipped cleanly when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
REFERENCE_MODEL = SHARED / "reference-model"
HELDOUT_TEXT = SHARED / "eval" / "heldout-code.txt"
QWEN3_CODER_TEMPLATE = SHARED / "fixtures" / "qwen3-coder.jinja"


@pytest.fixture(scope="session")
def reference_model() -> Path:
    if not (REFERENCE_MODEL / "config.json").is_file():
        pytest.skip("../shared/reference-model is absent (a plain clone has no shared folder)")
    return REFERENCE_MODEL


@pytest.fixture(scope="session")
def heldout_text() -> Path:
    if not HELDOUT_TEXT.is_file():
        pytest.skip("../shared/eval/heldout-code.txt is absent")
    return HELDOUT_TEXT


@pytest.fixture(scope="session")
def qwen3_coder_template() -> str:
    if not QWEN3_CODER_TEMPLATE.is_file():
        pytest.skip("../shared/fixtures/qwen3-coder.jinja is absent")
    return QWEN3_CODER_TEMPLATE.read_text()
