"""`coder-quant build` guards around the output: a short write is an error, the output is never a
file of the source, and a type that needs an importance matrix is refused before any work."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quantizer.build import build_gguf
from quantizer.cli import main
from quantizer.errors import ImatrixError, QuantError
from quantizer.synthetic import write_checkpoint
from quantizer.writer import partial_paths

ROOT = Path(__file__).resolve().parents[2]
SOURCE_FILES = (
    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", preset="tiny", layers=2).path


def _build_with_file_size_limit(source: Path, out: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """`coder-quant build` in a child whose files may not grow past `limit` bytes, as `ulimit -f` does."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "quantizer.cli", "build", str(source), str(out),
               "--quiet", "--threads", "1"]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit_file_size,
                          check=False)  # fmt: skip


@pytest.mark.parametrize("short_by", [1, 480, 70_000])
def test_short_write_is_an_error(tiny: Path, tmp_path: Path, short_by: int) -> None:
    full = tmp_path / "full.gguf"
    assert main(["build", str(tiny), str(full), "--quiet", "--threads", "1"]) == 0
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    done = _build_with_file_size_limit(tiny, out_dir / "model.gguf", full.stat().st_size - short_by)

    err = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(err) == 1 and err[0].startswith("coder-quant: error: ") and "model.gguf" in err[0], err
    assert list(out_dir.iterdir()) == []  # no GGUF, no .partial, no sidecar


@pytest.mark.parametrize("target", [*SOURCE_FILES, "."])
def test_output_cannot_be_the_source(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     target: str) -> None:
    source = tmp_path / "src"
    shutil.copytree(tiny, source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    out = source / target

    code = main(["build", str(source), str(out), "--force", "--quiet"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("coder-quant: error: ") and "source" in err[0], err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_output_through_a_link_to_a_shard_is_refused(tiny: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(tiny, source)
    out = tmp_path / "model.gguf"
    out.symlink_to(source / SOURCE_FILES[0])
    with pytest.raises(QuantError, match="source checkpoint"):
        build_gguf(source, out, force=True)
    assert out.is_symlink() and not partial_paths(out)


def test_missing_importance_matrix_is_refused_before_any_work(tiny: Path, tmp_path: Path) -> None:
    phases: list[str] = []
    out = tmp_path / "model.gguf"
    with pytest.raises(ImatrixError, match="without an importance matrix"):
        build_gguf(tiny, out, rules=["ffn_down_exps=iq2_xxs"],
                   progress=lambda phase, done, total: phases.append(phase))  # fmt: skip
    assert phases == []  # not even the source was hashed
    assert list(tmp_path.iterdir()) == []
