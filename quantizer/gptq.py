"""GPTQ rounding of routed experts at IQ4_XS, with the block scales llama.cpp's quantizer chose.

IQ4_XS (ggml/src/ggml-common.h, block_iq4_xs) stores 256 values per super-block as fp16 d, 8 six-bit
sub-block scales ls (4 low bits in scales_l, 2 high bits in scales_h) and 4-bit indices into IQ4_NL's
16-value grid; a value is d * (ls - 32) * KVALUES[index]. llama.cpp's quantizer picks the scales from
the importance-weighted values of each block and then rounds every value to its nearest grid point,
which minimizes the diagonal error sum_j H_jj sum_i (Q - W)_ij^2 (H_jj: the importance matrix).

Here the scales are taken from llama.cpp's own quantization of W, and the indices are chosen column by
column as GPTQ does (Frantar et al. 2022): the rounding error of column j, divided by U[j, j], is
spread over the columns not yet rounded through row j of U, the upper Cholesky factor of H^-1, with
H the (damped) covariance of the matrix's input: a greedy minimum of tr((Q - W) H (Q - W)^T), the
expected squared output error. With the scales fixed beforehand the columns may be visited in any
order; they are visited by decreasing H_jj ("act-order").

`GptqRounder` does this for the writer. Its result goes back through llama.cpp's quantizer, so the
bytes in the file are llama.cpp's: given values that already lie on a grid, it re-fits the scales and
keeps 92-97 % of the indices; a second pass with the re-fitted scales brings that to 98-100 %.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from quantizer import ggml
from quantizer.covariance import Covariances
from quantizer.equalize import Equalizer, PlannedTensor
from quantizer.errors import QuantError
from quantizer.spec import TensorSpec

log = logging.getLogger(__name__)

GPTQ_METHOD = "GPTQ over llama.cpp's IQ4_XS scales: per-expert input covariance, act-order, 2 passes"
# IQ4_NL's grid (ggml-common.h, kvalues_iq4nl); IQ4_XS shares it.
KVALUES: np.ndarray = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                               dtype=np.float32)
_MIDPOINTS = (KVALUES[1:] + KVALUES[:-1]) / 2.0
SUPER = 256  # values per super-block (QK_K)
SUB = 32  # values per sub-block: one 6-bit scale each
BLOCK_BYTES = 136  # fp16 d, u16 scales_h, u8 scales_l[4], u8 qs[128]
DAMP = 0.01  # added to H's diagonal, as a share of its mean
PASSES = 2  # llama.cpp re-fits the scales to the first pass's values; the second pass keeps them
SHRINK = 4096.0  # tokens' weight of the layer-wide covariance in each expert's (shrunk_covariance)
_EXPERT = re.compile(r"^(blk\.\d+)\.ffn_(gate|up|down)_exps\.weight$")


def iq4_xs_fields(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """IQ4_XS bytes of a (rows, cols) matrix -> (sub-block scales d*(ls-32), float32 (rows, cols//32);
    grid indices, uint8 (rows, cols)). scales[r, k] * KVALUES[indices[r, j]] (float32) is what ggml's
    dequantization writes for column j in sub-block k = j // 32."""
    if cols % SUPER:
        raise ValueError(f"IQ4_XS needs a multiple of {SUPER} columns, got {cols}")
    nb = cols // SUPER
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, nb, BLOCK_BYTES)
    d = b[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32)
    high_bits = b[..., 2:4].copy().view("<u2")[..., 0].astype(np.int32)
    low_bytes = b[..., 4:8].astype(np.int32)
    ib = np.arange(SUPER // SUB)
    low = (low_bytes[..., ib // 2] >> (4 * (ib % 2))) & 0xF
    high = (high_bits[..., None] >> (2 * ib)) & 0x3
    ls = (low | (high << 4)) - 32
    scales = (d[..., None] * ls.astype(np.float32)).astype(np.float32)
    qs = b[..., 8:].reshape(rows, nb, SUPER // SUB, 16)
    # byte j of a sub-block holds index j (low nibble) and index j + 16 (high nibble)
    indices = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
    return scales.reshape(rows, cols // SUB), indices.reshape(rows, cols).astype(np.uint8)


def iq4_xs_values(scales: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float32 values of (scales (..., cols//32), indices (..., cols)), as ggml dequantizes them."""
    return (np.repeat(scales, SUB, axis=-1) * KVALUES[indices]).astype(np.float32)


def nearest_index(x: np.ndarray) -> np.ndarray:
    """Index of the grid value nearest to x (x already divided by its scale)."""
    return np.searchsorted(_MIDPOINTS, x).astype(np.uint8)


def damped(h: np.ndarray, damp: float) -> np.ndarray:
    """H + damp * mean(diag H) * I for a stack (..., n, n); a zero diagonal mean gets I."""
    mean = np.einsum("...ii->...i", h).mean(axis=-1)
    add = np.where(mean > 0, damp * mean, 1.0)
    return h + add[..., None, None] * np.eye(h.shape[-1])


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper U with U^T U = H^-1, for a stack (..., n, n) of positive definite H."""
    lower = np.linalg.cholesky(h)
    eye = np.broadcast_to(np.eye(h.shape[-1]), h.shape)
    inv_lower = np.linalg.solve(lower, eye)  # L^-1, lower triangular
    h_inv = np.swapaxes(inv_lower, -1, -2) @ inv_lower
    h_inv = (h_inv + np.swapaxes(h_inv, -1, -2)) / 2
    return np.swapaxes(np.linalg.cholesky(h_inv), -1, -2)


@dataclass(frozen=True)
class Factored:
    """A stack of input covariances prepared for GPTQ: the column order and the upper Cholesky factor
    of the damped, reordered H^-1. Computed once per covariance, it serves every matrix and pass
    that reads that input (gate and up share one)."""

    order: np.ndarray  # (E, cols): columns in the order they are rounded
    upper: np.ndarray  # (E, cols, cols)


def factor(h: np.ndarray, *, damp: float = DAMP, act_order: bool = True) -> Factored:
    """Columns by decreasing diag(H) with `act_order` (else in order), and U with U^T U = (H + damping)^-1
    in that order."""
    n_mat, cols, _ = h.shape
    if act_order:
        order = np.argsort(-np.einsum("eii->ei", h), axis=-1, kind="stable")
    else:
        order = np.broadcast_to(np.arange(cols), (n_mat, cols))
    hp = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    return Factored(order, inverse_cholesky_upper(damped(hp, damp)))


def gptq_indices(w: np.ndarray, factored: Factored, scales: np.ndarray, *, block: int = 128) -> np.ndarray:
    """GPTQ over the columns of a stack of matrices with fixed per-sub-block scales.

    w: (E, rows, cols) weights; `factored`: their input covariance (see `factor`); scales: (E, rows,
    cols//32) as iq4_xs_fields returns them. Returns the grid indices (E, rows, cols), uint8. Each
    column's rounding error reaches the columns not yet visited through the factor, `block` at a time.
    """
    n_mat, rows, cols = w.shape
    order, upper = factored.order, factored.upper
    if upper.shape != (n_mat, cols, cols) or scales.shape != (n_mat, rows, cols // SUB):
        raise ValueError(f"shapes do not fit: w {w.shape}, H {upper.shape}, scales {scales.shape}")
    take = order[:, None, :]
    work = np.take_along_axis(w.astype(np.float64), take, axis=2)
    col_scale = np.take_along_axis(np.repeat(scales.astype(np.float64), SUB, axis=-1), take, axis=2)
    safe = np.where(col_scale != 0, col_scale, 1.0)
    out = np.empty((n_mat, rows, cols), dtype=np.uint8)
    for first in range(0, cols, block):
        last = min(first + block, cols)
        part = work[:, :, first:last]  # a view: updated in place
        u = upper[:, first:last, first:last]
        err = np.empty_like(part)
        for i in range(last - first):
            col = part[:, :, i]
            idx = nearest_index(col / safe[:, :, first + i])
            q = np.where(col_scale[:, :, first + i] != 0, col_scale[:, :, first + i] * KVALUES[idx], 0.0)
            out[:, :, first + i] = idx
            e = (col - q) / u[:, i, i][:, None]
            part[:, :, i + 1 :] -= e[:, :, None] * u[:, i, None, i + 1 :]
            err[:, :, i] = e
        work[:, :, last:] -= err @ upper[:, first:last, last:]
    unpermuted = np.empty_like(out)
    np.put_along_axis(unpermuted, take, out, axis=2)
    return unpermuted


def h_error(q: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per matrix tr((Q - W) H (Q - W)^T): the expected squared output error on inputs of covariance H."""
    diff = q.astype(np.float64) - w.astype(np.float64)
    return np.einsum("eri,eij,erj->e", diff, h, diff)


def shrunk_covariance(means: np.ndarray, counts: np.ndarray, shrink: float) -> np.ndarray:
    """Each expert's covariance blended with a layer-wide estimate: (n_e H_e + K S_e) / (n_e + K).

    S_e = D_e^1/2 R D_e^1/2 keeps the expert's own diagonal D_e (its importance matrix) and takes the
    correlation R of all tokens routed to any expert of the layer, so an expert that saw few
    calibration tokens leans on the layer instead of on its own noisy estimate. K = `shrink` tokens.
    """
    if shrink <= 0:
        return means
    n = counts.astype(np.float64)
    total = np.einsum("e,eij->ij", n, means) / max(float(n.sum()), 1.0)
    sd = np.sqrt(np.maximum(np.diag(total), 1e-30))
    corr = total / sd[:, None] / sd[None, :]
    root = np.sqrt(np.maximum(np.einsum("eii->ei", means), 0.0))
    shared = root[:, :, None] * corr[None] * root[:, None, :]
    return (n[:, None, None] * means + shrink * shared) / (n[:, None, None] + shrink)


def gptq_tensor(w: np.ndarray, h: np.ndarray, factored: Factored, seen: np.ndarray, qtype: str,
                threads: int, passes: int = PASSES) -> tuple[np.ndarray, np.ndarray]:
    """(values, importance) for llama.cpp's quantizer: grid values GPTQ chose with the scales llama.cpp
    picked for the previous pass's values. Experts no token reached (`seen` False) keep llama.cpp's
    own rounding. `h` gives the importance (its diagonal), `factored` the GPTQ updates."""
    n_mat, rows, cols = w.shape
    importance = np.ascontiguousarray(np.einsum("eii->ei", h), dtype=np.float32)
    importance[~seen] = 1.0
    target = w.astype(np.float32)
    for _ in range(passes):
        raw = ggml.quantize(target, qtype, importance, threads).reshape(n_mat, -1)
        fields = [iq4_xs_fields(raw[e], rows, cols) for e in range(n_mat)]
        scales, plain = np.stack([f[0] for f in fields]), np.stack([f[1] for f in fields])
        with threadpool_limits(limits=1, user_api="blas"):
            indices = gptq_indices(w, factored, scales)
        indices[~seen] = plain[~seen]
        target = iq4_xs_values(scales, indices)
    return target, importance


class GptqRounder:
    """Rounds routed IQ4_XS experts by GPTQ as the writer streams them (after equalization, if any)."""

    def __init__(self, entries: Sequence[PlannedTensor], covariances: Covariances,
                 equalizer: Equalizer | None = None, shrink: float = SHRINK, threads: int = 1) -> None:
        types = {e.spec.name: e.type for e in entries}
        wrong = [f"{name} ({t})" for name, t in types.items()
                 if _EXPERT.match(name) and ggml.is_quantized(t) and t != "iq4_xs"]
        if wrong:
            raise QuantError(f"--gptq rounds IQ4_XS experts only; the recipe makes {', '.join(wrong[:3])}")
        self.layers = tuple(sorted({m.group(1) for name in types if (m := _EXPERT.match(name))
                                    and types[name] == "iq4_xs" and covariances.has_layer(m.group(1))}))
        self._cov, self._equalizer, self._shrink, self._threads = covariances, equalizer, shrink, threads
        self._factored: tuple[tuple[str, str], Factored] | None = None

    def apply(self, spec: TensorSpec, values: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        if self._equalizer is not None:
            values, weights = self._equalizer.apply(spec, values, weights)
        m = _EXPERT.match(spec.name)
        if m is None or m.group(1) not in self.layers:
            return values, weights
        layer, kind = m.groups()
        h, counts = self._cov.of(f"{layer}.ffn_{'down' if kind == 'down' else 'up'}_exps.weight", values.shape)
        if kind == "down" and self._equalizer is not None and layer in self._equalizer.layers:
            s = self._equalizer.scales_of(layer).astype(np.float64)  # down's input is h / s now
            h = h / s[:, :, None] / s[:, None, :]
        key = (layer, "down" if kind == "down" else "up")  # gate and up, streamed one after the other, share it
        if self._factored is None or self._factored[0] != key:
            # One BLAS thread: the factorizations are many and small, and OpenBLAS's threads, on cores
            # that are busy anyway, made them 250x slower on a 2-core machine (16 ms -> 4.1 s for 16 of
            # 256 x 256).
            with threadpool_limits(limits=1, user_api="blas"):
                self._factored = key, factor(shrunk_covariance(h, counts, self._shrink))
        values, importance = gptq_tensor(values, h, self._factored[1], counts > 0, "iq4_xs", self._threads)
        log.info("%s: GPTQ-rounded (%d of %d experts had calibration tokens)", spec.name, int((counts > 0).sum()),
                 len(counts))
        return values, importance
