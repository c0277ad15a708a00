"""`coder-quant imatrix` outputs: never the model or each other, both written or neither, usual permissions."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from quantizer.cli import main
from quantizer.covariance import CovarianceCollector, load_covariances, write_covariances
from quantizer.errors import ImatrixError
from quantizer.imatrix import load_imatrix
from tests.quantizer.conftest import write_calibration

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--ctx", "128", "--chunks", "2"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_calibration(tmp_path_factory.mktemp("calibration"), 20_000)


@pytest.fixture(scope="module")
def written(reference_bf16: Path, calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(imatrix, covariances) of one complete run under umask 022."""
    folder = tmp_path_factory.mktemp("complete")
    imatrix, cov = folder / "im.gguf", folder / "cov.safetensors"
    umask = os.umask(0o022)
    try:
        code = main(["imatrix", str(reference_bf16), "-o", str(imatrix), "--covariance", str(cov),
                     "--text", str(calibration), *RUN])  # fmt: skip
    finally:
        os.umask(umask)
    assert code == 0
    return imatrix, cov


@pytest.mark.parametrize(
    ("outputs", "problem"),
    [
        (["-o", "im.gguf", "--covariance", "im.gguf"], "are the same file"),
        (["-o", "im.gguf", "--covariance", "sub/../im.gguf"], "are the same file"),
        (["-o", "im.gguf", "--covariance", "hardlink.gguf"], "are the same file"),
        (["-o", "model.gguf"], "is the model file"),
        (["-o", "sub/../model.gguf"], "is the model file"),
        (["-o", "im.gguf", "--covariance", "model.gguf"], "is the model file"),
        (["-o", "symlink.gguf"], "is the model file"),
    ],
)
def test_outputs_may_not_replace_the_model_or_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    outputs: list[str], problem: str,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not run: the paths are refused before the model is opened")
    (tmp_path / "im.gguf").write_bytes(b"an older imatrix")
    os.link(tmp_path / "im.gguf", tmp_path / "hardlink.gguf")
    (tmp_path / "symlink.gguf").symlink_to(model)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    code = main(["imatrix", "model.gguf", *outputs, "--force", *RUN])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("coder-quant: error: ") and problem in err[0], err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def _imatrix_with_file_size_limit(model: Path, text: Path, out_dir: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """`coder-quant imatrix --covariance` in a child whose files may not grow past `limit` bytes, as `ulimit -f`."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "quantizer.cli", "imatrix", str(model), "-o", str(out_dir / "im.gguf"),
               "--covariance", str(out_dir / "cov.safetensors"), "--text", str(text), *RUN]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit_file_size,
                          check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("failed", "limit"),
    [
        ("im.gguf", lambda imatrix, cov: imatrix - 1),
        ("cov.safetensors", lambda imatrix, cov: cov // 2),
        ("cov.safetensors", lambda imatrix, cov: cov - 1),  # all but the last byte
    ],
    ids=["imatrix-short", "covariance-half", "covariance-short-by-1"],
)
def test_a_failed_write_publishes_neither_output(
    reference_bf16: Path, calibration: Path, written: tuple[Path, Path], tmp_path: Path,
    failed: str, limit: Callable[[int, int], int],
) -> None:  # fmt: skip
    imatrix_size, cov_size = (p.stat().st_size for p in written)
    max_bytes = limit(imatrix_size, cov_size)
    assert failed == "im.gguf" or max_bytes > imatrix_size  # the imatrix itself fits

    done = _imatrix_with_file_size_limit(reference_bf16, calibration, tmp_path, max_bytes)

    err = [line for line in done.stderr.splitlines() if line.startswith("coder-quant")]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert err == [f"coder-quant: error: cannot write {tmp_path / failed}: File too large"], done.stderr
    assert list(tmp_path.iterdir()) == []  # no imatrix, no covariances, no temporary file


def test_both_outputs_are_complete_and_have_the_users_usual_permissions(written: tuple[Path, Path]) -> None:
    imatrix, cov = written
    assert load_imatrix(imatrix).chunk_count == 2
    assert load_covariances(cov).means
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o644, path  # umask 022, not a temporary file's private 0600
    assert sorted(p.name for p in imatrix.parent.iterdir()) == ["cov.safetensors", "im.gguf"]


def test_covariances_into_a_missing_folder_raise_one_error(tmp_path: Path) -> None:
    collector = CovarianceCollector(chunk_size=8)
    collector.covariances = {"blk.0.ffn_up_exps.weight": np.eye(4)[None].repeat(2, axis=0)}
    collector.cov_counts = {"blk.0.ffn_up_exps.weight": np.array([3, 5], dtype=np.int64)}
    with pytest.raises(ImatrixError, match="cannot write .*missing/cov.safetensors: No such file or directory"):
        write_covariances(tmp_path / "missing" / "cov.safetensors", collector, "test", 1)
