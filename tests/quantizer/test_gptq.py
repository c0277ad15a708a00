"""GPTQ rounding of routed experts: the IQ4_XS fields, the rounding itself, covariance files, the build
flag, and its effect on KLD on the reference model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from quantizer import ggml
from quantizer.build import build_gguf
from quantizer.cli import main
from quantizer.covariance import load_covariances
from quantizer.errors import QuantError
from quantizer.evaluate import evaluate
from quantizer.gptq import (
    KVALUES,
    SUB,
    factor,
    gptq_indices,
    h_error,
    iq4_xs_fields,
    iq4_xs_values,
    nearest_index,
    shrunk_covariance,
)
from quantizer.inspect import field_value
from quantizer.writer import KEY_GPTQ, KEY_GPTQ_COVARIANCE_SHA256, KEY_GPTQ_LAYERS

CTX = 512
CALIBRATION_CHUNKS = 64
EVAL_CHUNKS = 24


def _correlated(rng: np.random.Generator, n_mat: int, cols: int, tokens: int = 4096) -> np.ndarray:
    """Covariances of inputs with strongly correlated columns, as real activations have."""
    mix = rng.standard_normal((n_mat, cols, cols)) * 0.3 + np.eye(cols)
    x = rng.standard_normal((n_mat, tokens, cols)) @ mix
    return np.einsum("eti,etj->eij", x, x) / tokens


def test_fields_reproduce_ggml_dequantization() -> None:
    w = np.random.default_rng(0).standard_normal((3, 8, 512)).astype(np.float32)
    raw = ggml.quantize(w, "iq4_xs", None, 2).reshape(3, -1)
    for e in range(3):
        scales, indices = iq4_xs_fields(raw[e], 8, 512)
        assert scales.shape == (8, 512 // SUB) and indices.max() < len(KVALUES)
        want = ggml.dequantize(raw[e], "iq4_xs", (8, 512))
        assert np.array_equal(iq4_xs_values(scales, indices), want)


def test_identity_covariance_is_plain_nearest_rounding() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 4, 256))
    scales = np.abs(rng.standard_normal((2, 4, 256 // SUB))) / 50 + 0.01
    h = np.broadcast_to(np.eye(256), (2, 256, 256)).copy()
    got = gptq_indices(w, factor(h, damp=0.0, act_order=False), scales)
    assert np.array_equal(got, nearest_index(w / np.repeat(scales, SUB, axis=-1)))


def test_gptq_lowers_the_output_error_with_llama_cpp_scales() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 16, 256)).astype(np.float32)
    h = _correlated(rng, 4, 256)
    importance = np.ascontiguousarray(np.einsum("eii->ei", h), dtype=np.float32)
    raw = ggml.quantize(w, "iq4_xs", importance, 2).reshape(4, -1)
    fields = [iq4_xs_fields(raw[e], 16, 256) for e in range(4)]
    scales, plain = np.stack([f[0] for f in fields]), np.stack([f[1] for f in fields])
    rounded = gptq_indices(w, factor(h), scales)
    before = h_error(iq4_xs_values(scales, plain), w, h)
    after = h_error(iq4_xs_values(scales, rounded), w, h)
    assert (after < 0.9 * before).all(), after / before


def test_shrinking_keeps_each_diagonal_and_moves_toward_the_layer() -> None:
    rng = np.random.default_rng(3)
    means, counts = _correlated(rng, 3, 32, tokens=64), np.array([10, 1000, 0])
    assert shrunk_covariance(means, counts, 0.0) is means
    shrunk = shrunk_covariance(means, counts, 100.0)
    assert np.allclose(np.einsum("eii->ei", shrunk), np.einsum("eii->ei", means))
    change = np.abs(shrunk - means).sum(axis=(1, 2))
    assert change[0] > change[1] > 0  # an expert with fewer tokens moves further


# --- the reference model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collected(reference_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An importance matrix and covariance file from 64 chunks of the default calibration text."""
    folder = tmp_path_factory.mktemp("gptq")
    imatrix, cov = folder / "imatrix.gguf", folder / "cov.safetensors"
    assert main(["imatrix", str(reference_bf16), "-o", str(imatrix), "--covariance", str(cov),
                 "--chunks", str(CALIBRATION_CHUNKS)]) == 0
    return imatrix, cov


def test_covariance_file_holds_each_experts_input_covariance(collected: tuple[Path, Path]) -> None:
    imatrix, cov = collected
    read = load_covariances(cov)
    assert set(read.means) == {f"blk.{i}.ffn_{k}_exps.weight" for i in range(4) for k in ("up", "down")}
    reader = GGUFReader(imatrix)
    for name, means in read.means.items():
        assert means.shape == (16, 256, 256) and read.counts[name].shape == (16,)
        assert np.allclose(means, np.swapaxes(means, 1, 2))
        # the importance matrix is its diagonal: llama-imatrix's sums over the same counts
        sums = next(t for t in reader.tensors if t.name == f"{name}.in_sum2").data.reshape(16, 256)
        counts = next(t for t in reader.tensors if t.name == f"{name}.counts").data.reshape(16)
        seen = counts > 0
        assert np.array_equal(counts.astype(np.int64), read.counts[name])
        diag = np.einsum("eii->ei", means)[seen]
        assert np.allclose(diag, (sums[seen] / counts[seen, None]), rtol=1e-4, atol=1e-9)


def test_covariance_limit_stops_collection_and_writes_nothing(
    reference_bf16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    imatrix, cov = tmp_path / "im.gguf", tmp_path / "cov.safetensors"
    code = main(["imatrix", str(reference_bf16), "-o", str(imatrix), "--covariance", str(cov), "--chunks", "1",
                 "--covariance-limit", "1MiB"])
    assert code != 0 and "--covariance-limit" in capsys.readouterr().err
    assert not imatrix.exists() and not cov.exists()


def test_gptq_build_keeps_preserved_tensors_and_lowers_kld(
    reference_model: Path, reference_bf16: Path, heldout_text: Path, collected: tuple[Path, Path], tmp_path: Path
) -> None:
    imatrix, cov = collected
    plain, rounded = tmp_path / "plain.gguf", tmp_path / "gptq.gguf"
    build_gguf(reference_model, plain, recipe="attn-bf16-iq4xs", imatrix=imatrix, threads=2)
    build_gguf(reference_model, rounded, recipe="attn-bf16-iq4xs", imatrix=imatrix, threads=2, gptq=cov)
    a, b = GGUFReader(plain), GGUFReader(rounded)
    assert field_value(b.get_field(KEY_GPTQ)).startswith("GPTQ")
    assert len(field_value(b.get_field(KEY_GPTQ_LAYERS))) == 4
    assert field_value(b.get_field(KEY_GPTQ_COVARIANCE_SHA256)) == load_covariances(cov).sha256
    changed = set()
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert (ta.name, ta.tensor_type, ta.n_bytes) == (tb.name, tb.tensor_type, tb.n_bytes)
        if not np.array_equal(ta.data, tb.data):
            changed.add(ta.name)
    assert changed == {f"blk.{i}.ffn_{k}_exps.weight" for i in range(4) for k in ("gate", "up", "down")}
    assert main(["verify", str(reference_model), str(rounded), "--quiet"]) == 0
    text = heldout_text.read_text(encoding="utf-8")
    cache = tmp_path / "base.logits"
    before = evaluate(reference_bf16, plain, text, ctx=CTX, max_chunks=EVAL_CHUNKS, base_logits=cache)
    after = evaluate(reference_bf16, rounded, text, ctx=CTX, max_chunks=EVAL_CHUNKS, base_logits=cache)
    assert after.kld_mean < before.kld_mean - 3 * before.kld_mean_unc, (after.kld_mean, before.kld_mean)


def test_gptq_refuses_other_types_and_other_models(
    reference_model: Path, collected: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, cov = collected
    out = tmp_path / "out.gguf"
    with pytest.raises(QuantError, match="IQ4_XS experts only"):
        build_gguf(reference_model, out, recipe="attn-bf16-iq3s", gptq=cov)
    read = load_covariances(cov)
    smaller = tmp_path / "smaller.safetensors"
    from safetensors.numpy import save_file

    save_file({f"{n}.cov": m[:, :128, :128].copy() for n, m in read.means.items()}
              | {f"{n}.count": c for n, c in read.counts.items()}, str(smaller))
    with pytest.raises(QuantError, match="another model"):
        build_gguf(reference_model, out, recipe="attn-bf16-iq4xs", gptq=smaller)
    assert main(["build", str(reference_model), str(out), "--gptq", str(tmp_path / "absent.safetensors")]) != 0
    assert "covariance file not found" in capsys.readouterr().err
    assert not out.exists()

