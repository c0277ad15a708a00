"""`coder-quant imatrix`: activations collected through llama.cpp's eval callback, llama-imatrix's format."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from quantizer.build import build_gguf, checkpoint_specs
from quantizer.cli import main
from quantizer.evaluate import evaluate
from quantizer.imatrix import check_against, load_imatrix
from quantizer.imatrix_collect import (
    GgmlTensor,
    _ggml_base,
    collect_imatrix,
    default_calibration_text,
    weight_name,
)
from quantizer.source import open_checkpoint
from tests.quantizer.conftest import write_calibration

CTX = 256
CHUNKS = 4
N_EXPERT_USED = 4  # the reference model routes each token to 4 of 16 experts


def test_tensor_struct_matches_this_ggml() -> None:
    # ggml_tensor_overhead() = sizeof(struct ggml_object) (32 bytes) + sizeof(struct ggml_tensor)
    lib = _ggml_base()
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    assert lib.ggml_tensor_overhead() == 32 + ctypes.sizeof(GgmlTensor)


def test_weight_name_drops_backend_prefix_and_copy_suffix() -> None:
    assert weight_name(b"CUDA0#blk.0.attn_k.weight#0") == "blk.0.attn_k.weight"
    assert weight_name(b"blk.3.ffn_down_exps.weight") == "blk.3.ffn_down_exps.weight"


def test_default_calibration_text_is_python_source() -> None:
    text, label = default_calibration_text()
    assert len(text) > 100_000 and "def " in text and label.startswith("python")




@pytest.fixture(scope="module")
def bf16(reference_bf16: Path) -> Path:
    return reference_bf16


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_calibration(tmp_path_factory.mktemp("calibration"), 200_000)


@pytest.fixture(scope="module")
def imatrix_file(bf16: Path, calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    args = ["imatrix", str(bf16), "-o", str(out), "--text", str(calibration), "--ctx", str(CTX)]
    assert main([*args, "--chunks", "16"]) == 0
    assert main([*args, "--chunks", "1"]) == 1  # refuses to overwrite without --force
    return out


def test_statistics_follow_the_routing(bf16: Path, calibration: Path) -> None:
    stats = collect_imatrix(bf16, calibration.read_text(encoding="utf-8"), ctx=CTX, max_chunks=CHUNKS)
    tokens = CTX * CHUNKS
    assert stats.chunk_count == CHUNKS and stats.chunk_size == CTX
    for layer in range(4):
        blk = f"blk.{layer}."
        router = stats.sums[blk + "ffn_gate_inp.weight"]
        assert stats.counts[blk + "ffn_gate_inp.weight"].tolist() == [tokens]
        # the router, the shared expert and the routed experts all read the same normalized input
        np.testing.assert_allclose(stats.sums[blk + "ffn_up_shexp.weight"], router, rtol=1e-6)
        gate = stats.sums[blk + "ffn_gate_exps.weight"]
        assert gate.shape == (16, 256)
        assert stats.counts[blk + "ffn_gate_exps.weight"].sum() == N_EXPERT_USED * tokens
        np.testing.assert_allclose(gate.sum(axis=0), N_EXPERT_USED * router, rtol=1e-4)
        np.testing.assert_array_equal(stats.counts[blk + "ffn_down_exps.weight"], stats.counts[blk + "ffn_up_exps.weight"])
    assert {"blk.3.attn_q.weight", "blk.3.attn_output.weight", "blk.0.attn_qkv.weight", "blk.0.ssm_out.weight"} <= set(stats.sums)
    assert not any(name.startswith(("token_embd", "output")) for name in stats.sums)


def test_file_is_llama_imatrix_gguf(imatrix_file: Path, reference_model: Path) -> None:
    reader = GGUFReader(imatrix_file)
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.chunk_count").contents() == 16
    assert reader.get_field("imatrix.chunk_size").contents() == CTX
    assert reader.get_field("imatrix.datasets").contents()[0].endswith("calibration.txt")
    tensors = {t.name: t for t in reader.tensors}
    names = [t.name for t in reader.tensors]
    assert names == sorted(names, key=lambda n: n.rsplit(".", 1)[0])  # llama-imatrix sorts by weight name
    down = "blk.0.ffn_down_exps.weight"
    assert list(tensors[down + ".in_sum2"].shape) == [256, 16]  # GGUF ne: columns, experts
    assert list(tensors[down + ".counts"].shape) == [1, 16]
    assert list(tensors["blk.3.attn_q.weight.in_sum2"].shape) == [256]
    assert list(tensors["blk.3.attn_q.weight.counts"].shape) == [1]
    assert all(t.tensor_type.name == "F32" for t in reader.tensors)
    checkpoint = open_checkpoint(reference_model)
    try:
        specs = checkpoint_specs(checkpoint)
    finally:
        checkpoint.close()
    shaped = check_against(load_imatrix(imatrix_file), specs)  # names and shapes are this model's
    assert shaped.entries[down].shape == (16, 256)


def test_imatrix_lowers_kld(
    bf16: Path, imatrix_file: Path, reference_model: Path, heldout_text: Path, tmp_path: Path
) -> None:
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    build_gguf(reference_model, plain, recipe="attn-bf16-iq3s", threads=2)
    build_gguf(reference_model, weighted, recipe="attn-bf16-iq3s", imatrix=imatrix_file, threads=2)
    text = heldout_text.read_text(encoding="utf-8")[:40_000]
    cache = tmp_path / "base.logits"
    without = evaluate(bf16, plain, text, ctx=CTX, max_chunks=16, base_logits=cache)
    with_imatrix = evaluate(bf16, weighted, text, ctx=CTX, max_chunks=16, base_logits=cache)
    assert with_imatrix.kld_mean < without.kld_mean - 2 * without.kld_mean_unc


def test_llama_cpp_quantizes_with_it_as_build_does(
    bf16: Path, imatrix_file: Path, reference_model: Path, tmp_path: Path
) -> None:
    """llama_model_quantize, fed the file as llama-quantize feeds it (sums / counts per expert),
    writes the same routed-expert bytes as `coder-quant build --imatrix`."""
    llama_cpp = pytest.importorskip("llama_cpp")
    means = load_imatrix(imatrix_file).entries  # llama-quantize's load_imatrix normalization
    keep = [np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for v in means.values()]
    data = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
    for i, (name, values) in enumerate(zip(means, keep, strict=True)):  # the last slot stays NULL
        data[i].name, data[i].size = name.encode(), values.size
        data[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    overrides = (llama_cpp.llama_model_tensor_override * 2)()
    overrides[0].pattern, overrides[0].type = rb"attn_|ssm_|shexp|token_embd|output", 30  # BF16: keep
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 30  # LLAMA_FTYPE_MOSTLY_IQ4_XS
    params.imatrix = ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    theirs, ours = tmp_path / "llama-quantize.gguf", tmp_path / "build.gguf"
    assert llama_cpp.llama_model_quantize(str(bf16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    build_gguf(reference_model, ours, recipe="attn-bf16-iq4xs", imatrix=imatrix_file, threads=2)
    a = {t.name: t for t in GGUFReader(theirs).tensors if "_exps." in t.name}
    b = {t.name: t for t in GGUFReader(ours).tensors if "_exps." in t.name}
    assert a.keys() == b.keys() and len(a) == 12
    for name in a:
        assert a[name].tensor_type.name == b[name].tensor_type.name == "IQ4_XS"
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name
