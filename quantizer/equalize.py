"""Function-preserving up/down channel equalization of routed experts (AWQ-style).

An expert computes W_down (silu(W_gate x) * (W_up x)). Dividing row j of W_up[e] by s_j and
multiplying column j of W_down[e] by s_j leaves its function unchanged (in exact arithmetic), and
both tensors are quantized anyway, so every preserved tensor stays bit for bit. Up's rows are
quantized along the hidden dimension and the block quantizers are scale-invariant per row (bar the
fp16 rounding of a block scale), so up's relative error stays as it was; down's rows run along j,
so the scales decide how precision is shared inside each block of down. As in AWQ
(Lin et al. 2023), s_j = rms(h_j)^alpha, where rms(h_j) is the importance matrix's root mean square
of down's input j, normalized to a geometric mean of 1; alpha is chosen per expert on a small grid
to minimize down's importance-weighted error
    sum_j imat_j * sum_i (deq(Q(W s))_ij / s_j - W_ij)^2,
with the quantizer given the importance of the scaled weights (imat_j / s_j^2). alpha = 0 (no
scaling) is on the grid, so the chosen scales never do worse on that measure. Experts the
importance matrix never saw keep s = 1. On the reference model the effect on KLD is small and its
sign depends on the type (docs/quality.md: -1.7 % at IQ4_XS, +1.1 % at IQ3_S).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from quantizer import ggml
from quantizer.errors import ImatrixError
from quantizer.spec import TensorSpec

log = logging.getLogger(__name__)

# alpha grid: 0 (no scaling) up to half of AWQ's full strength, where the reference model's experts
# choose 0.1 to 0.3; 6 points keep a large build practical (each is one quantization of a sample of down).
ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
# s is clipped to [1/S_LIMIT, S_LIMIT] around its geometric mean, so no row of up or column of
# down is pushed far enough to strain the fp16 block scales.
S_LIMIT = 16.0
# The search measures the error on at most this many rows of down per expert (evenly spaced):
# the scales are shared by every row, so a sample of rows ranks the candidates as all rows would.
SEARCH_ROWS = 256
# What the GGUF records (writer.KEY_EQUALIZE).
EQUALIZE_METHOD = (f"routed up/down channel scales s = rms(down input)^alpha (AWQ) from the importance matrix, "
                   f"alpha per expert from {{{', '.join(f'{a:g}' for a in ALPHAS)}}}")
_EXPERT = re.compile(r"^(blk\.\d+)\.ffn_(up|down)_exps\.weight$")


class PlannedTensor(Protocol):
    spec: TensorSpec
    type: str


@dataclass(frozen=True)
class LayerScales:
    """The scales chosen for one layer's routed experts and what they bought on the search measure."""

    layer: str  # "blk.3"
    scales: np.ndarray  # float32 (n_expert, ff); ones for experts left as they are
    alpha: np.ndarray  # float64 (n_expert,), values of the grid
    error_before: float  # importance-weighted squared error of down without scaling
    error_after: float  # the same with the chosen scales


def candidate_scales(mean_sq: np.ndarray, alpha: float) -> np.ndarray:
    """s = rms^alpha per expert, geometric mean 1, clipped to [1/S_LIMIT, S_LIMIT]."""
    rms = np.sqrt(np.maximum(mean_sq.astype(np.float64), 0.0))
    floor = np.maximum(rms.max(axis=-1, keepdims=True), 1e-30) * 1e-6  # dead units: no log(0)
    log_s = alpha * np.log(np.maximum(rms, floor))
    log_s -= log_s.mean(axis=-1, keepdims=True)
    return np.exp(np.clip(log_s, -math.log(S_LIMIT), math.log(S_LIMIT))).astype(np.float32)


def weighted_error(down: np.ndarray, qtype: str, mean_sq: np.ndarray, scales: np.ndarray, threads: int) -> np.ndarray:
    """Per expert: sum_j mean_sq_j * sum_i (deq(Q(W s))_ij / s_j - W_ij)^2, quantized with imat / s^2."""
    out = np.empty(down.shape[0], dtype=np.float64)
    step = max(1, (1 << 24) // (down.shape[1] * down.shape[2]))  # bounded temporaries: ~64 MiB each
    for first in range(0, down.shape[0], step):
        part, m, s = (a[first : first + step] for a in (down, mean_sq, scales))
        raw = ggml.quantize(part * s[:, None, :], qtype, (m / s**2).astype(np.float32), threads)
        back = ggml.dequantize(raw, qtype, part.shape) / s[:, None, :]
        out[first : first + step] = ((back - part) ** 2 * m[:, None, :]).sum(axis=(1, 2), dtype=np.float64)
    return out


def search_scales(layer: str, down: np.ndarray, qtype: str, mean_sq: np.ndarray, present: np.ndarray,
                  threads: int = 1, alphas: Sequence[float] = ALPHAS) -> LayerScales:  # fmt: skip
    """Per expert, the alpha on the grid whose scales give down the least weighted error."""
    n_expert, rows, ff = down.shape
    if mean_sq.shape != (n_expert, ff):
        raise ImatrixError(f"{layer}: importance of shape {mean_sq.shape} for down_exps of shape {down.shape}")
    step = -(-rows // SEARCH_ROWS)
    sample = np.ascontiguousarray(down[:, ::step, :], dtype=np.float32)
    weight = np.where(present[:, None], mean_sq, 1.0).astype(np.float32)
    errors = np.stack([weighted_error(sample, qtype, weight, candidate_scales(weight, a), threads) for a in alphas])
    best = np.where(present, errors.argmin(axis=0), 0)  # grid index 0 must be alpha 0
    alpha = np.asarray(alphas, dtype=np.float64)[best]
    scales = np.ones((n_expert, ff), dtype=np.float32)
    for a in np.unique(alpha):
        chosen = alpha == a
        scales[chosen] = candidate_scales(weight[chosen], float(a))
    before = float(errors[0][present].sum())
    after = float(errors[best, np.arange(n_expert)][present].sum())
    return LayerScales(layer, scales, alpha, before, after)


def eligible_layers(entries: Sequence[PlannedTensor], imatrix: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """Layers whose up_exps and down_exps are both quantized and down_exps has importance data."""
    kinds: dict[str, dict[str, str]] = {}
    for e in entries:
        m = _EXPERT.match(e.spec.name)
        if m:
            kinds.setdefault(m.group(1), {})[m.group(2)] = e.type
    return tuple(layer for layer, types in kinds.items()
                 if set(types) == {"up", "down"} and all(ggml.is_quantized(t) for t in types.values())
                 and f"{layer}.ffn_down_exps.weight" in imatrix)  # fmt: skip


class Equalizer:
    """Scales routed up/down tensors as the writer streams them; one search per layer, on down."""

    def __init__(self, entries: Sequence[PlannedTensor], imatrix: Mapping[str, np.ndarray],
                 present: Mapping[str, np.ndarray], load: Callable[[TensorSpec], np.ndarray],
                 threads: int = 1, alphas: Sequence[float] = ALPHAS) -> None:  # fmt: skip
        self.layers = eligible_layers(entries, imatrix)
        self._entries = {e.spec.name: e for e in entries}
        self._imatrix, self._present, self._load = imatrix, present, load
        self._threads, self._alphas = threads, tuple(alphas)
        self._scales: dict[str, LayerScales] = {}
        self.results: list[LayerScales] = []

    def _layer_scales(self, layer: str, down: np.ndarray | None) -> LayerScales:
        if layer not in self._scales:
            name = f"{layer}.ffn_down_exps.weight"
            entry = self._entries[name]
            values = down if down is not None else self._load(entry.spec)
            mean_sq = np.asarray(self._imatrix[name], dtype=np.float32).reshape(values.shape[0], -1)
            present = self._present.get(name, np.ones(values.shape[0], dtype=bool))
            result = search_scales(layer, values, entry.type, mean_sq, present, self._threads, self._alphas)
            log.info("%s: up/down equalized, alpha %s, weighted error of down %.4g -> %.4g (%+.1f%%)", layer,
                     np.array2string(result.alpha, precision=1, separator=","), result.error_before,
                     result.error_after, 100.0 * (result.error_after / max(result.error_before, 1e-30) - 1.0))  # fmt: skip
            self._scales[layer] = result
            self.results.append(result)
        return self._scales[layer]

    def scales_of(self, layer: str) -> np.ndarray:
        """The channel scales s (n_expert, n_ff) of an equalized layer."""
        return self._layer_scales(layer, None).scales

    def apply(self, spec: TensorSpec, values: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, importance) to quantize for `spec`: scaled where its layer is equalized."""
        m = _EXPERT.match(spec.name)
        if m is None or m.group(1) not in self.layers:
            return values, weights
        layer, kind = m.groups()
        s = self._layer_scales(layer, values if kind == "down" else None).scales
        if kind == "up":  # row j of each expert divided by s_j; its input x is unchanged
            return values / s[:, :, None], weights
        scaled_weights = None if weights is None else (weights / s**2).astype(np.float32)
        return values * s[:, None, :], scaled_weights
