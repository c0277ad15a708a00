"""`coder-quant verify`: preserved tensors bit-identical, conversions exact, quantized ones measured."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from quantizer.cli import main
from quantizer.errors import VerifyError
from quantizer.synthetic import write_checkpoint
from quantizer.verify import verify_gguf
from quantizer.writer import sidecar_path

PRESERVED = "blk.1.attn_gate.weight"  # Gated DeltaNet z projection: reordered from in_proj_qkvz
CONVERTED = "blk.0.attn_qkv.weight"  # stored as F32 by the extra rule below
QUANTIZED = "blk.2.ffn_down_exps.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("src") / "tiny", preset="tiny").path


@pytest.fixture(scope="module")
def built(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "tiny-q4k.gguf"
    argv = ["build", str(source), str(out), "--recipe", "attn-bf16-q4k", "--rule", "attn_qkv=f32", "--quiet"]
    assert main(argv) == 0
    return out


def corrupted_copy(gguf: Path, dest: Path, tensor: str, fill: int | None = None) -> Path:
    """A copy without its sidecar, with one byte of `tensor` flipped (or all its bytes set to `fill`)."""
    copy = dest / gguf.name
    shutil.copy(gguf, copy)
    info = next(t for t in GGUFReader(copy).tensors if t.name == tensor)
    start, size = int(info.data_offset), int(info.n_bytes)
    with copy.open("r+b") as f:
        if fill is None:
            f.seek(start + size // 2)
            byte = f.read(1)[0]
            f.seek(start + size // 2)
            f.write(bytes([byte ^ 0x01]))
        else:
            f.seek(start)
            f.write(bytes([fill]) * size)
    return copy


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("coder-quant: error:")]
    assert len(err) == 1
    return err[0]


def test_good_build_passes(source: Path, built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(source), str(built), "--quiet"]) == 0
    assert "sha256 sidecar ok" in capsys.readouterr().out
    report = verify_gguf(source, built)
    assert report.ok and report.sidecar == "ok"
    status = {c.name: c for c in report.checks}
    assert status[PRESERVED].status == "identical" and status[PRESERVED].type == "bf16"
    assert status[CONVERTED].status == "converted" and status[CONVERTED].type == "f32"
    assert status[QUANTIZED].status == "quantized" and status[QUANTIZED].type == "q4_k"
    quantized = [c for c in report.checks if c.status == "quantized"]
    assert {c.tclass for c in quantized} == {"routed_expert"}
    assert all(0.01 < c.relative_rms < 0.15 for c in quantized)
    assert sum(c.status == "identical" for c in report.checks) == len(report.checks) - len(quantized) - 3


def test_table_lists_every_tensor(source: Path, built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(source), str(built)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(QUANTIZED))
    assert row.split()[2:4] == ["q4_k", "quantized"]
    assert float(row.split()[4]) > 0
    assert len([line for line in out.splitlines() if line.startswith(("blk.", "output", "token_embd"))]) == 73


@pytest.mark.parametrize("tensor", [PRESERVED, CONVERTED, "blk.3.attn_q_norm.weight"])
def test_one_flipped_byte_is_named(source: Path, built: Path, tmp_path: Path, tensor: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    copy = corrupted_copy(built, tmp_path, tensor)
    assert main(["verify", str(source), str(copy), "--quiet"]) == 1
    assert f"tensor {tensor}:" in error_line(capsys)
    report = verify_gguf(source, copy)
    assert [c.name for c in report.failures] == [tensor]
    assert report.sidecar == "absent"


def test_garbage_quantized_tensor_is_named(source: Path, built: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    copy = corrupted_copy(built, tmp_path, QUANTIZED, fill=0xFF)  # f16 block scales become NaN
    assert main(["verify", str(source), str(copy), "--quiet"]) == 1
    assert f"tensor {QUANTIZED}:" in error_line(capsys)


def test_quantized_error_bound_is_enforced(source: Path, built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(source), str(built), "--quiet", "--max-rms", "0.01"]) == 1
    assert "relative RMS error" in error_line(capsys)


def test_sidecar_mismatch(source: Path, built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / built.name
    shutil.copy(built, copy)
    side = sidecar_path(copy)
    side.write_text("0" * 64 + f"  {copy.name}\n")
    assert main(["verify", str(source), str(copy), "--quiet"]) == 1
    assert side.name in error_line(capsys)
    with pytest.raises(VerifyError, match="sha256"):
        verify_gguf(source, copy)
    # the right digest beside a modified file fails the same way
    shutil.copy(sidecar_path(built), side)
    with copy.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))
    with pytest.raises(VerifyError, match="does not match"):
        verify_gguf(source, copy)


def test_other_source_fails(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = write_checkpoint(tmp_path / "other", preset="tiny", seed=1).path
    assert main(["verify", str(other), str(built), "--quiet"]) == 1
    assert "tensor output.weight:" in error_line(capsys)  # the first tensor of the file
    smaller = write_checkpoint(tmp_path / "smaller", preset="tiny", layers=2).path
    with pytest.raises(VerifyError, match="no counterpart"):
        verify_gguf(smaller, built)
    report = verify_gguf(write_checkpoint(tmp_path / "more", preset="tiny", layers=8).path, built)
    missing = [c for c in report.failures if c.detail == "missing from the GGUF"]
    assert missing and all(int(c.name.split(".")[1]) >= 4 for c in missing)


def test_not_a_gguf(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    assert main(["verify", str(source), str(bogus)]) == 1
    assert "bogus.gguf" in error_line(capsys)


def test_reference_model_bf16_verifies(reference_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "reference-bf16.gguf"
    assert main(["build", str(reference_model), str(out), "--recipe", "bf16", "--quiet"]) == 0
    report = verify_gguf(reference_model, out)
    assert report.ok and {c.status for c in report.checks} == {"identical"} and len(report.checks) == 73
