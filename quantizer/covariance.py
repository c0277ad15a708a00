"""Per-expert input covariances of routed experts, for `coder-quant build --gptq`.

`coder-quant imatrix MODEL -o IMATRIX.gguf --covariance COV.safetensors` collects them in the same run
as the importance matrix: for every layer, the mean of x x^T over the tokens routed to each expert,
for the input of `ffn_up_exps` (which `ffn_gate_exps` shares) and of `ffn_down_exps`. The importance
matrix is the diagonal of these.

The file is safetensors: `<tensor name>.cov` (n_expert, n, n) float32 means and `<tensor name>.count`
(n_expert,) int64 token counts, and metadata naming the format, the calibration text, the chunk count
and the chunk size. The size is n_layer x n_expert x (n_embd^2 + n_ff^2) x 4 bytes: 33.6 MB for the
reference model, about 440 GB for Qwen3-Coder-Next (2048^2 per expert for gate/up), so collection
stops with an error once the sums would pass `limit` bytes (they are held in float64 while running).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from threadpoolctl import threadpool_limits

from quantizer.errors import ImatrixError, QuantError
from quantizer.evaluate import sha256_file
from quantizer.imatrix import publish, temporary_beside
from quantizer.imatrix_collect import ActivationCollector, GgmlTensor
from quantizer.writer import usual_mode

FORMAT = "coder-quant expert input covariance v1"
DEFAULT_LIMIT = 8 << 30  # bytes of float64 sums held while collecting


@dataclass
class CovarianceCollector(ActivationCollector):
    """The importance matrix's collector that also sums x x^T per expert of every routed tensor."""

    limit: int = DEFAULT_LIMIT
    covariances: dict[str, np.ndarray] | None = None
    cov_counts: dict[str, np.ndarray] | None = None

    def _collect_experts(self, name: str, src0: GgmlTensor, x: np.ndarray, ids: np.ndarray) -> None:
        super()._collect_experts(name, src0, x, ids)  # checks the shapes and ids on the way
        if "ffn_gate_exps" in name:  # gate reads the same input as up
            return
        n_as, cols = src0.ne[2], x.shape[-1]
        sums, counts = self._cov_entry(name, n_as, cols)
        x, ids = x[0], ids[0, 0]
        with threadpool_limits(limits=1, user_api="blas"):  # small products: threads only get in the way
            for slot in range(ids.shape[1]):
                experts = ids[:, slot]
                rows = x[:, slot % x.shape[1], :].astype(np.float64)
                for e in np.unique(experts):
                    chosen = rows[experts == e]
                    sums[e] += chosen.T @ chosen
                counts += np.bincount(experts, minlength=n_as)

    def _cov_entry(self, name: str, n_mat: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        if self.covariances is None or self.cov_counts is None:
            self.covariances, self.cov_counts = {}, {}
        if name not in self.covariances:
            held = sum(a.nbytes for a in self.covariances.values()) + n_mat * cols * cols * 8
            if held > self.limit:
                raise ImatrixError(f"covariances would need more than {held / 2**30:.1f} GiB at {name}, over "
                                   f"the limit of {self.limit / 2**30:.1f} GiB (--covariance-limit)")
            self.covariances[name] = np.zeros((n_mat, cols, cols), dtype=np.float64)
            self.cov_counts[name] = np.zeros(n_mat, dtype=np.int64)
        return self.covariances[name], self.cov_counts[name]


def write_covariances(path: Path, collector: CovarianceCollector, dataset: str, chunk_count: int) -> None:
    """Means and counts of what `collector` summed, written whole or not at all."""
    tmp = stage_covariances(path, collector, dataset, chunk_count)
    try:
        publish([(tmp, path)])
    finally:
        tmp.unlink(missing_ok=True)


def stage_covariances(path: Path, collector: CovarianceCollector, dataset: str, chunk_count: int) -> Path:
    """Means and counts of what `collector` summed, written to a temporary file beside `path` and
    returned for `quantizer.imatrix.publish`; nothing is left behind if the write fails."""
    if not collector.covariances or collector.cov_counts is None:
        raise ImatrixError("no routed-expert inputs were seen: the model has no MoE layers to write covariances for")
    tensors: dict[str, np.ndarray] = {}
    for name, sums in collector.covariances.items():
        counts = collector.cov_counts[name]
        tensors[f"{name}.cov"] = (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)
        tensors[f"{name}.count"] = counts.copy()
    metadata = {"format": FORMAT, "dataset": dataset, "chunk_count": str(chunk_count),
                "chunk_size": str(collector.chunk_size)}
    tmp = temporary_beside(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        # safetensors writes through a private (0600) file of its own and renames it over ours
        os.chmod(tmp, usual_mode())
        _check_complete(tmp, path, sum(a.nbytes for a in tensors.values()))
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, file too large, permissions...: one line, not a traceback
            raise ImatrixError(f"cannot write {path}: {exc.strerror or exc}") from exc
        if isinstance(exc, SafetensorError):  # how safetensors reports the same I/O errors
            raise ImatrixError(f"cannot write {path}: {_io_reason(exc)}") from exc
        raise
    return tmp


def _io_reason(exc: SafetensorError) -> str:
    """'File too large' from safetensors' 'Error while serializing: I/O error: File too large (os error 27)'."""
    match = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(exc))
    return match.group(1) if match else str(exc)


def _check_complete(written: Path, path: Path, data_bytes: int) -> None:
    """A safetensors file is an 8-byte header length, the header, then the data: a short write is shorter."""
    with written.open("rb") as f:
        prefix = f.read(8)
    size = written.stat().st_size
    expected = 8 + int.from_bytes(prefix, "little") + data_bytes if len(prefix) == 8 else 8 + data_bytes
    if size != expected:
        raise ImatrixError(f"cannot write {path}: short write ({size:,} of {expected:,} bytes)")


@dataclass(frozen=True)
class Covariances:
    """A covariance file, read: per routed tensor name, means (n_expert, n, n) and counts (n_expert,)."""

    path: Path
    sha256: str
    means: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]

    def has_layer(self, layer: str) -> bool:
        return all(f"{layer}.ffn_{kind}_exps.weight" in self.means for kind in ("up", "down"))

    def of(self, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(means as float64, counts) for the input of a routed tensor of numpy shape (n_expert, rows, n)."""
        means = self.means[name]
        if means.shape != (shape[0], shape[-1], shape[-1]):
            raise QuantError(f"{self.path.name}: {name} covariance is {means.shape}, the tensor needs "
                             f"{(shape[0], shape[-1], shape[-1])}: collected on another model?")
        return means.astype(np.float64), self.counts[name]


def load_covariances(path: str | Path) -> Covariances:
    path = Path(path)
    if not path.is_file():
        raise QuantError(f"covariance file not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise QuantError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from exc
    means = {k[: -len(".cov")]: v for k, v in tensors.items() if k.endswith(".cov")}
    counts = {k[: -len(".count")]: v for k, v in tensors.items() if k.endswith(".count")}
    if not means or set(means) != set(counts):
        raise QuantError(f"{path}: not a covariance file of `coder-quant imatrix --covariance`")
    for name, m in means.items():
        c = counts[name]
        if m.ndim != 3 or m.shape[1] != m.shape[2] or c.shape != (m.shape[0],) or not np.isfinite(m).all():
            raise QuantError(f"{path}: {name} has a malformed covariance {m.shape} / counts {c.shape}")
    return Covariances(path, sha256_file(path), means, counts)
