"""`coder-quant build` on broken input: one line on stderr, exit status 1, nothing written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from quantizer.cli import main
from quantizer.imatrix import write_imatrix_gguf
from quantizer.synthetic import write_checkpoint

INDEX = "model.safetensors.index.json"
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("pristine") / "tiny", preset="tiny", layers=2).path


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_header(path: Path, change: Callable[[dict], None]) -> None:
    """Replace a safetensors header, keeping the data bytes."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])


def replace_bytes(path: Path, data: bytes) -> list[str]:
    path.write_bytes(data)
    return []


def truncate(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n])


def last_tensor_past_end(header: dict) -> None:
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[name]["data_offsets"] = [offset + (1 << 20) for offset in header[name]["data_offsets"]]


def first_tensor_offsets_swapped(header: dict) -> None:
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [end, begin]


def imatrix_for_another_model(src: Path, tmp: Path, *, foreign_name: bool) -> list[str]:
    """An importance matrix of a wider model (columns do not match) or of a deeper one (names)."""
    name = "blk.7.ffn_up_exps.weight" if foreign_name else "blk.0.ffn_up_exps.weight"
    cols = 256 if foreign_name else 512
    path = tmp / "other.imatrix.gguf"
    write_imatrix_gguf(path, {name: np.ones((8, cols), np.float32)}, {name: np.full(8, 10.0, np.float32)},
                       ["other.txt"], chunk_count=10, chunk_size=512)
    return ["--recipe", "attn-bf16-iq4xs", "--imatrix", str(path)]


# name -> (breakage applied to a copy of the checkpoint, returning extra CLI args; text the error must contain)
BREAKAGES: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    "truncated shard": (lambda s, t: truncate(s / SHARD_2, 1000) or [], SHARD_2),
    "header offsets past the end": (lambda s, t: rewrite_header(s / SHARD_1, last_tensor_past_end) or [], "past the end"),
    "header offsets reversed": (lambda s, t: rewrite_header(s / SHARD_1, first_tensor_offsets_swapped) or [], SHARD_1),
    "header not json": (lambda s, t: replace_bytes(s / SHARD_2, (16).to_bytes(8, "little") + b"{not json}      "),
                        SHARD_2),
    "missing index entry": (
        lambda s, t: edit_json(s / INDEX, lambda d: d["weight_map"].pop("model.layers.1.mlp.gate.weight")) or [],
        "model.layers.1.mlp.gate.weight",
    ),
    "index names a missing shard": (lambda s, t: (s / SHARD_2).unlink() or [], SHARD_2),
    "missing tensor": (
        lambda s, t: rewrite_header(s / SHARD_2, lambda h: h.pop("model.norm.weight")) or [], "model.norm.weight"
    ),
    "unknown architecture": (
        lambda s, t: edit_json(s / "config.json", lambda d: d.update(architectures=["FooForCausalLM"],
                                                                      model_type="foo")) or [],
        "FooForCausalLM",
    ),
    "config disagrees with shapes": (
        lambda s, t: edit_json(s / "config.json", lambda d: d.update(moe_intermediate_size=128)) or [], "shape"
    ),
    "missing config": (lambda s, t: (s / "config.json").unlink() or [], "config.json"),
    "missing tokenizer": (lambda s, t: (s / "tokenizer.json").unlink() or [], "tokenizer"),
    "unknown type in --rule": (lambda s, t: ["--rule", "ffn_up_exps=q9_z"], "q9_z"),
    "rule without a type": (lambda s, t: ["--rule", "ffn_up_exps"], "ffn_up_exps"),
    "imatrix for another model (names)": (
        lambda s, t: imatrix_for_another_model(s, t, foreign_name=True), "another model"
    ),
    "imatrix for another model (columns)": (
        lambda s, t: imatrix_for_another_model(s, t, foreign_name=False), "another model"
    ),
    "--gptq-shrink nan": (lambda s, t: ["--gptq-shrink", "nan"], "--gptq-shrink"),
    "--gptq-shrink inf": (lambda s, t: ["--gptq-shrink", "inf"], "--gptq-shrink"),
    "type needs an imatrix, none given": (
        lambda s, t: ["--rule", "ffn_down_exps=iq2_xxs"], "cannot be quantized without an importance matrix"
    ),
    "imatrix not an imatrix": (
        lambda s, t: replace_bytes(t / "junk.dat", b"\x01\x00") + ["--imatrix", str(t / "junk.dat")], "junk.dat"
    ),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_bad_input_is_one_line_and_writes_nothing(case: str, pristine: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    breakage, must_mention = BREAKAGES[case]
    source = tmp_path / "src"
    shutil.copytree(pristine, source)
    extra = breakage(source, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.gguf"

    code = main(["build", str(source), str(out), "--quiet", *extra])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1, err
    assert err[0].startswith("coder-quant: error: ")
    assert must_mention in err[0]
    assert list(out_dir.iterdir()) == []  # no GGUF, no .partial, no sidecar


def test_pristine_copy_builds(pristine: Path, tmp_path: Path) -> None:
    """The breakages above are what fails: the same checkpoint unbroken builds."""
    source = tmp_path / "src"
    shutil.copytree(pristine, source)
    assert main(["build", str(source), str(tmp_path / "model.gguf"), "--quiet"]) == 0
