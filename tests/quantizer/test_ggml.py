"""ggml bindings: type table, round trips, threading, and byte equality with llama-quantize."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from quantizer import ggml
from quantizer.errors import ImatrixError, QuantError, RecipeError
from quantizer.source import open_checkpoint

RNG = np.random.default_rng(1234)


def _experts(n_expert: int, rows: int, cols: int) -> np.ndarray:
    return RNG.standard_normal((n_expert, rows, cols)).astype(np.float32)


def test_type_table_follows_gguf_py():
    assert ggml.ggml_type("iq4_xs") == gguf.GGMLQuantizationType.IQ4_XS
    assert ggml.ggml_type("BF16") == gguf.GGMLQuantizationType.BF16
    assert ggml.row_size("iq4_xs", 512) == 2 * 136
    assert ggml.row_size("q8_0", 64) == 2 * 34
    assert ggml.row_size("bf16", 3) == 6
    with pytest.raises(RecipeError, match="unknown tensor type 'iq5_xs'"):
        ggml.ggml_type("iq5_xs")
    with pytest.raises(RecipeError, match="multiple of 256"):
        ggml.row_size("iq4_xs", 72)


def test_requires_imatrix():
    assert ggml.requires_imatrix("iq2_xxs")
    assert not ggml.requires_imatrix("iq4_xs")
    with pytest.raises(ImatrixError, match="iq2_xxs cannot be quantized without"):
        ggml.quantize(_experts(1, 4, 256)[0], "iq2_xxs")
    imat = np.ones(256, dtype=np.float32)
    assert ggml.quantize(_experts(1, 4, 256)[0], "iq2_xxs", imat).nbytes == 4 * ggml.row_size("iq2_xxs", 256)


@pytest.mark.parametrize(
    ("qtype", "max_rel_rmse"),
    [("iq4_xs", 0.12), ("iq3_s", 0.25), ("q4_k", 0.12), ("q5_k", 0.06), ("q8_0", 0.01), ("bf16", 0.005), ("f16", 0.001)],
)
def test_round_trip_error_is_bounded(qtype: str, max_rel_rmse: float):
    x = _experts(4, 32, 512)
    raw = ggml.quantize(x, qtype, threads=2)
    assert raw.dtype == np.uint8 and raw.nbytes == 4 * 32 * ggml.row_size(qtype, 512)
    y = ggml.dequantize(raw, qtype, x.shape)
    rel = float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x**2)))
    assert 0 < rel < max_rel_rmse


def test_f32_round_trip_is_exact():
    x = _experts(2, 3, 64)
    assert np.array_equal(ggml.dequantize(ggml.quantize(x, "f32"), "f32", x.shape), x)


def test_bf16_rounds_to_nearest_even():
    # 1 + 2^-8 is halfway between two bf16 values: ties go to the even mantissa (down);
    # 1 + 3*2^-8 is halfway as well and rounds up to the even neighbour.
    x = np.array([[1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, 0.0, 3.0e38]], dtype=np.float32)
    got = ggml.quantize(x, "bf16").view(np.uint16)
    bits = x.view(np.uint32).astype(np.uint64)
    want = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    assert np.array_equal(got, want.reshape(-1))
    assert got[0] == 0x3F80 and got[1] == 0x3F82 and got[2] == 0x3F81


def test_threads_do_not_change_bytes():
    x = _experts(5, 48, 512)  # 48 rows of 512: several llama.cpp-sized chunks per expert
    imat = RNG.uniform(0.1, 2.0, (5, 512)).astype(np.float32)
    one = ggml.quantize(x, "iq4_xs", imat, threads=1)
    four = ggml.quantize(x, "iq4_xs", imat, threads=4)
    assert np.array_equal(one, four)
    # the imatrix matters, and each expert uses its own slice
    assert not np.array_equal(one, ggml.quantize(x, "iq4_xs", threads=4))
    assert not np.array_equal(one, ggml.quantize(x, "iq4_xs", imat[::-1].copy(), threads=4))


def test_bad_inputs_raise():
    x = _experts(2, 4, 256)
    with pytest.raises(ImatrixError, match=r"needs \(2, 256\)"):
        ggml.quantize(x, "iq4_xs", np.ones(256, dtype=np.float32))
    with pytest.raises(ImatrixError, match="non-finite"):
        ggml.quantize(x, "iq4_xs", np.full((2, 256), np.nan, dtype=np.float32))
    with pytest.raises(QuantError, match="2-D or 3-D"):
        ggml.quantize(x.reshape(-1), "q8_0")
    with pytest.raises(QuantError, match="needs 272 bytes"):
        ggml.dequantize(np.zeros(10, dtype=np.uint8), "iq4_xs", (2, 256))


def _quantize_isolated(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` (x: experts (2, 8, 256), ggml imported) in a subprocess: ggml aborts on bad input."""
    prelude = "import numpy as np\nfrom quantizer import ggml\nx = np.ones((2, 8, 256), dtype=np.float32)\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("qtype", ["iq3_s", "iq2_xxs"])
def test_negative_importance_is_refused_before_ggml(qtype: str):
    imat = "imat = np.ones((2, 256), dtype=np.float32); imat[1, 3] = -1.0\n"
    result = _quantize_isolated(imat + f"ggml.quantize(x, {qtype!r}, imat, tensor='blk.0.ffn_down_exps.weight')")
    assert result.returncode == 1, result.stderr[-2000:]  # an uncaught exception, not SIGABRT (134)
    assert "ImatrixError: blk.0.ffn_down_exps.weight (2, 8, 256) -> " + qtype in result.stderr
    assert "importance matrix contains negative values" in result.stderr
    # IQ4_XS does not abort but zeroes the blocks: refused as well
    with pytest.raises(ImatrixError, match="negative"):
        ggml.quantize(_experts(2, 8, 256), "iq4_xs", -np.ones((2, 256), dtype=np.float32))


@pytest.mark.parametrize("value", ["np.inf", "-np.inf", "np.nan"])
def test_non_finite_weights_are_refused_before_ggml(value: str):
    result = _quantize_isolated(f"x[1, 4, 7] = {value}\nggml.quantize(x, 'iq3_s', np.ones((2, 256), np.float32))")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "QuantError: tensor (2, 8, 256) -> iq3_s: non-finite value" in result.stderr
    assert "at row 4, column 7 of expert 1; llama.cpp cannot quantize it" in result.stderr


# ---- byte equality with llama_model_quantize (the C++ behind llama-quantize) ----


def _write_moe_gguf(path: Path, tensors: dict[str, np.ndarray], n_expert: int, raw_dtype=None) -> None:
    """A minimal llama-architecture GGUF: llama_model_quantize loads hyperparameters, not a graph."""
    cols = next(iter(tensors.values())).shape[-1]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(cols)
    writer.add_block_count(max(int(n.split(".")[1]) for n in tensors) + 1)
    writer.add_feed_forward_length(cols)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(n_expert)
    writer.add_expert_used_count(2)
    for name, data in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_quantize(src: Path, dst: Path, overrides: list[tuple[str, str]], imatrix: dict[str, np.ndarray]) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    # overrides apply only under a quantized file type; "." -> bf16 keeps everything else as is
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS
    table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for slot, (pattern, qtype) in zip(table, overrides, strict=False):
        slot.pattern, slot.type = pattern.encode(), ggml.ggml_type(qtype)
    params.tt_overrides = table
    if imatrix:
        data = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for slot, (name, values) in zip(data, imatrix.items(), strict=False):
            slot.name, slot.size = name.encode(), values.size
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = data
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def _assert_same_bytes(out: Path, f32: dict[str, np.ndarray], imatrix: dict[str, np.ndarray], want: dict[str, str]):
    reader = gguf.GGUFReader(out)
    seen = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name.lower()
        seen[t.name] = qtype
        ours = ggml.quantize(f32[t.name], qtype, imatrix.get(t.name), threads=2)
        theirs = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert np.array_equal(ours, theirs), f"{t.name} ({qtype}) differs from llama_model_quantize"
    assert seen == want


def test_matches_llama_model_quantize_with_per_expert_imatrix(tmp_path: Path):
    n_expert = 6
    f32 = {f"blk.0.ffn_{k}_exps.weight": _experts(n_expert, 40, 512) for k in ("gate", "up", "down")}
    f32["blk.0.attn_q.weight"] = _experts(1, 64, 512)[0]
    imatrix = {n: RNG.uniform(0.05, 4.0, (n_expert, 512)).astype(np.float32) for n in f32 if "_exps" in n}
    del imatrix["blk.0.ffn_up_exps.weight"]  # one tensor without: ggml's plain path
    src, dst = tmp_path / "f32.gguf", tmp_path / "quant.gguf"
    _write_moe_gguf(src, f32, n_expert)
    _llama_quantize(src, dst, [(r"ffn_down_exps", "q5_k"), (r"ffn_.*_exps", "iq3_s"), (".", "bf16")], imatrix)
    want = {n: "iq3_s" for n in f32 if "_exps" in n} | {"blk.0.ffn_down_exps.weight": "q5_k", "blk.0.attn_q.weight": "bf16"}
    _assert_same_bytes(dst, f32, imatrix, want)


def test_matches_llama_model_quantize_on_reference_model_experts(reference_model: Path, tmp_path: Path):
    """Real trained expert weights, BF16 in the GGUF as the reference converter writes them."""
    config = json.loads((reference_model / "config.json").read_text())
    n_layer, n_expert = 2, config["num_experts"]  # two layers are enough and keep the test quick
    proj = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    names = {
        f"blk.{i}.ffn_{k}_exps.weight": [f"model.layers.{i}.mlp.experts.{e}.{p}.weight" for e in range(n_expert)]
        for i in range(n_layer)
        for k, p in proj.items()
    }
    checkpoint = open_checkpoint(reference_model)
    bf16 = {n: np.stack([checkpoint.raw(s) for s in srcs]) for n, srcs in names.items()}  # uint16 words
    f32 = {n: (words.astype(np.uint32) << 16).view(np.float32) for n, words in bf16.items()}
    # layer 0 gets an importance matrix, layer 1 none, so both ggml paths are compared
    imatrix = {n: RNG.uniform(0.05, 4.0, (n_expert, a.shape[-1])).astype(np.float32) for n, a in f32.items() if ".0." in n}
    src, dst = tmp_path / "bf16.gguf", tmp_path / "quant.gguf"
    _write_moe_gguf(src, bf16, n_expert, raw_dtype=gguf.GGMLQuantizationType.BF16)
    _llama_quantize(src, dst, [(r"ffn_down_exps", "iq4_xs"), (r"ffn_.*_exps", "iq3_s")], imatrix)
    want = {n: "iq4_xs" if "down" in n else "iq3_s" for n in f32}
    _assert_same_bytes(dst, f32, imatrix, want)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_one_copy_of_ggml_shared_with_llama_cpp() -> None:
    """The quantizer opens the libggml-base that libllama links, not a second copy of it: two copies of
    ggml in one process would each keep their own global state (backends, quantization tables)."""
    import llama_cpp

    llama_cpp.llama_supports_gpu_offload()
    ggml._lib()
    maps = Path("/proc/self/maps").read_text().splitlines()
    files = {line.split()[-1] for line in maps if "libggml-base" in line}
    assert len(files) == 1, files
