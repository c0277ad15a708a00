"""Input that used to crash llama.cpp or end in a traceback: one line on stderr, a clean exit status.

Builds run in a subprocess: without the guards ggml aborts the process (GGML_ASSERT), which would
take pytest down with it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantizer.cli import main
from quantizer.commands.plan import specs_for_source
from quantizer.imatrix import write_imatrix_gguf
from quantizer.source import open_checkpoint
from quantizer.synthetic import write_checkpoint

EXPERT_SOURCE = "model.layers.0.mlp.experts.3.down_proj.weight"  # -> blk.0.ffn_down_exps.weight, expert 3


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("guards") / "tiny", preset="tiny", layers=2).path


def _coder_quant(*args: str | Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from quantizer.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("coder-quant: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in last


def test_negative_imatrix_is_refused_not_a_crash(pristine: Path, tmp_path: Path) -> None:
    # one expert's importance negative: IQ3_S aborted on it (GGML_ASSERT(grid_index >= 0))
    sums = {s.name: np.ones((s.shape[0] if len(s.shape) == 3 else 1, s.shape[-1]), dtype=np.float32)
            for s in specs_for_source(pristine) if len(s.shape) >= 2}  # fmt: skip
    sums["blk.0.ffn_down_exps.weight"][2] = -1.0
    imatrix = tmp_path / "negative.gguf"
    write_imatrix_gguf(imatrix, sums, {n: np.ones(len(s)) for n, s in sums.items()}, ["test"], 1, 8)
    out = tmp_path / "out.gguf"
    result = _coder_quant("build", pristine, out, "--recipe", "attn-bf16-iq3s", "--imatrix", imatrix)
    _assert_one_line_error(result, "negative", "blk.0.ffn_down_exps.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["negative.gguf"]


@pytest.mark.parametrize("bits", [0x7F80, 0x7FC0], ids=["inf", "nan"])
def test_non_finite_expert_weight_is_refused_not_a_crash(pristine: Path, tmp_path: Path, bits: int) -> None:
    source = tmp_path / "src"
    shutil.copytree(pristine, source)
    entry = open_checkpoint(source).entry(EXPERT_SOURCE)
    assert entry.dtype == "BF16"
    with entry.file.open("r+b") as f:
        f.seek(entry.start + 2 * 5)  # row 0, column 5
        f.write(bits.to_bytes(2, "little"))
    out = tmp_path / "out.gguf"
    result = _coder_quant("build", source, out, "--recipe", "attn-bf16-iq3s")
    _assert_one_line_error(result, "non-finite", "row 0, column 5 of expert 3", "_exps.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_imatrix_output_folder_is_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # the model does not exist either: the output is checked first, so that is never reached
    out = tmp_path / "missing" / "im.gguf"
    assert main(["imatrix", str(tmp_path / "model.gguf"), "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"coder-quant: error: {out}: folder {out.parent} does not exist\n"
    covariance = tmp_path / "missing" / "cov.safetensors"
    assert main(["imatrix", str(tmp_path / "model.gguf"), "-o", str(tmp_path / "im.gguf"),
                 "--covariance", str(covariance)]) == 1  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


def test_ctrl_c_while_building_the_parser_exits_quietly() -> None:
    code = (
        "import sys, quantizer.cli as cli\n"
        "def interrupted():\n"
        "    raise KeyboardInterrupt\n"
        "cli.build_parser = interrupted\n"
        "sys.exit(cli.main(['plan', '.']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (130, "coder-quant: interrupted\n")
