"""Fixtures shared by the quantizer's quality tests: the reference model built once per recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantizer.build import build_gguf


def build_reference(tmp_path_factory: pytest.TempPathFactory, reference_model: Path, recipe: str) -> Path:
    """One build per recipe and test session, shared by the test modules that need it."""
    folder = tmp_path_factory.getbasetemp() / "reference-builds"
    folder.mkdir(exist_ok=True)
    out = folder / f"{recipe}.gguf"
    if not out.is_file():
        build_gguf(reference_model, out, recipe=recipe, threads=2)
    return out


@pytest.fixture(scope="session")
def reference_bf16(tmp_path_factory: pytest.TempPathFactory, reference_model: Path) -> Path:
    return build_reference(tmp_path_factory, reference_model, "bf16")


def write_calibration(folder: Path, chars: int) -> Path:
    """The first `chars` characters of the default calibration text, as a --text file."""
    from quantizer.imatrix_collect import default_calibration_text

    path = folder / "calibration.txt"
    path.write_text(default_calibration_text()[0][:chars], encoding="utf-8")
    return path
