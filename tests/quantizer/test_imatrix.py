"""Importance matrices: GGUF and legacy .dat round trips, the means llama-quantize uses, mismatches."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from quantizer.errors import ImatrixError
from quantizer.imatrix import check_against, load_imatrix, write_imatrix_gguf
from quantizer.plan import make_plan
from quantizer.recipes import get_recipe
from quantizer.spec import TensorSpec

RNG = np.random.default_rng(7)
N_EXPERT, HIDDEN, FF = 4, 64, 32

SPECS = [
    TensorSpec("blk.0.attn_qkv.weight", ("a",), (96, HIDDEN), "ssm", "bf16", "copy"),
    TensorSpec("blk.0.ffn_gate_exps.weight", ("b",), (N_EXPERT, FF, HIDDEN), "routed_expert", "bf16", "stack"),
    TensorSpec("blk.0.ffn_down_exps.weight", ("c",), (N_EXPERT, HIDDEN, FF), "routed_expert", "bf16", "stack"),
]


def _stats() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    sums = {
        "blk.0.attn_qkv.weight": RNG.uniform(0, 50, HIDDEN).astype(np.float32),
        "blk.0.ffn_gate_exps.weight": RNG.uniform(0, 50, (N_EXPERT, HIDDEN)).astype(np.float32),
        "blk.0.ffn_down_exps.weight": RNG.uniform(0, 50, (N_EXPERT, FF)).astype(np.float32),
    }
    counts = {
        "blk.0.attn_qkv.weight": np.array([512.0], dtype=np.float32),
        "blk.0.ffn_gate_exps.weight": np.array([100.0, 0.0, 37.0, 9.0], dtype=np.float32),  # expert 1 unused
        "blk.0.ffn_down_exps.weight": np.array([100.0, 3.0, 37.0, 9.0], dtype=np.float32),
    }
    return sums, counts


def test_gguf_round_trip_gives_per_expert_means(tmp_path: Path):
    sums, counts = _stats()
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, sums, counts, ["heldout-code.txt"], chunk_count=12, chunk_size=512)
    im = load_imatrix(path)
    assert not im.legacy and im.datasets == ("heldout-code.txt",) and im.chunk_count == 12 and im.chunk_size == 512
    assert len(im.sha256) == 64
    np.testing.assert_array_equal(im.entries["blk.0.attn_qkv.weight"], sums["blk.0.attn_qkv.weight"] / np.float32(512))
    gate = im.entries["blk.0.ffn_gate_exps.weight"]
    assert gate.shape == (N_EXPERT, HIDDEN) and gate.dtype == np.float32
    np.testing.assert_array_equal(gate[0], sums["blk.0.ffn_gate_exps.weight"][0] / np.float32(100))
    np.testing.assert_array_equal(gate[1], np.ones(HIDDEN, dtype=np.float32))  # no data: ones, as llama-quantize
    np.testing.assert_array_equal(gate[3], sums["blk.0.ffn_gate_exps.weight"][3] / np.float32(9))


def test_gguf_layout_matches_llama_imatrix(tmp_path: Path):
    sums, counts = _stats()
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, sums, counts, ["a.txt", "b.txt"], chunk_count=3, chunk_size=256)
    reader = gguf.GGUFReader(path)
    assert list(reader.fields) == [
        "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count",
        "general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size",
    ]  # fmt: skip
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.chunk_size"].types == [gguf.GGUFValueType.UINT32]
    layout = [(t.name, t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors]
    assert layout == [  # names sorted; a single matrix is 1-D, stacked experts (cols, n_expert)
        ("blk.0.attn_qkv.weight.in_sum2", "F32", [HIDDEN]),
        ("blk.0.attn_qkv.weight.counts", "F32", [1]),
        ("blk.0.ffn_down_exps.weight.in_sum2", "F32", [FF, N_EXPERT]),
        ("blk.0.ffn_down_exps.weight.counts", "F32", [1, N_EXPERT]),
        ("blk.0.ffn_gate_exps.weight.in_sum2", "F32", [HIDDEN, N_EXPERT]),
        ("blk.0.ffn_gate_exps.weight.counts", "F32", [1, N_EXPERT]),
    ]
    assert all(t.data_offset % 32 == 0 for t in reader.tensors)
    assert not list(tmp_path.glob("*.tmp"))


def _write_legacy(path: Path, entries: dict[str, tuple[int, np.ndarray]], chunks: int, dataset: str) -> None:
    """The .dat layout of llama-imatrix --output-format dat (tools/imatrix/imatrix.cpp)."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        encoded = name.encode()
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    out += struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()
    path.write_bytes(out)


def test_legacy_round_trip_divides_by_calls(tmp_path: Path):
    qkv = RNG.uniform(0, 9, HIDDEN).astype(np.float32)
    down = RNG.uniform(0, 9, N_EXPERT * FF).astype(np.float32)  # flat: .dat does not record experts
    path = tmp_path / "imatrix.dat"
    _write_legacy(path, {"blk.0.attn_qkv.weight": (7, qkv), "blk.0.ffn_down_exps.weight": (7, down)}, 7, "code.txt")
    im = load_imatrix(path)
    assert im.legacy and im.chunk_count == 7 and im.datasets == ("code.txt",)
    np.testing.assert_array_equal(im.entries["blk.0.attn_qkv.weight"], qkv / np.float32(7))
    shaped = check_against(im, SPECS)
    assert shaped.entries["blk.0.ffn_down_exps.weight"].shape == (N_EXPERT, FF)
    np.testing.assert_array_equal(shaped.entries["blk.0.ffn_down_exps.weight"][2], down[2 * FF : 3 * FF] / np.float32(7))


def test_check_against_accepts_matching_model(tmp_path: Path):
    sums, counts = _stats()
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, sums, counts, [], chunk_count=1, chunk_size=512)
    checked = check_against(load_imatrix(path), SPECS)
    assert checked.entries["blk.0.attn_qkv.weight"].shape == (HIDDEN,)
    from_plan = check_against(load_imatrix(path), make_plan(SPECS, get_recipe("attn-bf16-iq4xs")))
    assert from_plan.entries.keys() == checked.entries.keys()


def test_imatrix_for_another_model_is_rejected(tmp_path: Path):
    sums, counts = _stats()
    sums["blk.47.attn_q.weight"], counts["blk.47.attn_q.weight"] = np.ones(HIDDEN, np.float32), np.ones(1, np.float32)
    path = tmp_path / "other.gguf"
    write_imatrix_gguf(path, sums, counts, [], chunk_count=1, chunk_size=512)
    with pytest.raises(ImatrixError, match=r"another model: 1 of 4 entries name no tensor .*blk\.47\.attn_q\.weight"):
        check_against(load_imatrix(path), SPECS)


def test_imatrix_with_wrong_columns_is_rejected(tmp_path: Path):
    path = tmp_path / "wide.dat"
    _write_legacy(path, {"blk.0.attn_qkv.weight": (1, np.ones(2 * HIDDEN, np.float32))}, 1, "x")
    with pytest.raises(ImatrixError, match=r"blk\.0\.attn_qkv\.weight has 128 values, the tensor needs 64 columns"):
        check_against(load_imatrix(path), SPECS)


def test_unreadable_files_raise(tmp_path: Path):
    with pytest.raises(ImatrixError, match="cannot read"):
        load_imatrix(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(struct.pack("<i", 3) + b"\x05\x00")
    with pytest.raises(ImatrixError, match="not a readable importance matrix"):
        load_imatrix(junk)


@pytest.mark.parametrize(("value", "problem"), [(-1.0, "negative"), (np.inf, "non-finite"), (np.nan, "non-finite")])
def test_negative_or_non_finite_importance_is_rejected_on_load(tmp_path: Path, value: float, problem: str):
    # a negative importance aborts llama.cpp's IQ3/IQ2 quantizers (GGML_ASSERT) and zeroes IQ4_XS
    sums, counts = _stats()
    sums["blk.0.ffn_down_exps.weight"][2, 5] = value  # expert 2 has data, so its mean keeps the value
    gguf_path = tmp_path / "bad.gguf"
    write_imatrix_gguf(gguf_path, sums, counts, [], chunk_count=1, chunk_size=512)
    dat_path = tmp_path / "bad.dat"
    _write_legacy(dat_path, {"blk.0.ffn_down_exps.weight": (1, sums["blk.0.ffn_down_exps.weight"].reshape(-1))}, 1, "x")
    for path in (gguf_path, dat_path):
        with pytest.raises(ImatrixError, match=rf"{path}: entry blk\.0\.ffn_down_exps\.weight has {problem} values"):
            load_imatrix(path)


def test_write_into_a_missing_folder_raises(tmp_path: Path):
    sums, counts = _stats()
    with pytest.raises(ImatrixError, match="cannot write .*missing/imatrix.gguf: No such file or directory"):
        write_imatrix_gguf(tmp_path / "missing" / "imatrix.gguf", sums, counts, [], chunk_count=1, chunk_size=512)


def test_written_file_has_the_users_usual_permissions(tmp_path: Path):
    sums, counts = _stats()
    out = tmp_path / "imatrix.gguf"
    umask = os.umask(0o022)
    try:
        write_imatrix_gguf(out, sums, counts, [], chunk_count=1, chunk_size=512)
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644  # not the temporary file's private 0600
