"""Check a written GGUF against its source checkpoint, tensor by tensor.

Tensors stored in their reference type (what `convert_hf_to_gguf.py --outtype bf16` writes) must
hold exactly the bytes the architecture module builds from the source. Other float types must be
the exact conversion of those values. Quantized tensors are dequantized with ggml's own code and
their error is measured relative to the values llama-quantize would have read (RMS of the error
over RMS of the values). The sha256 sidecar, when present, must match the file. In layers whose
routed up/down channels were equalized (`coder_quant.equalize.layers`), each row j of up_exps is
compared after a least-squares fit of its scale s_j, and column j of down_exps after dividing by
that same s_j: a down that does not undo its up's scaling fails.

`verify_gguf` returns one record per tensor; problems are recorded, not raised, so the caller can
show the whole table before `VerifyReport.raise_for_failures` names the first failing tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np
from gguf import GGUFReader
from gguf.gguf_reader import ReaderTensor

from quantizer import arch as arch_registry
from quantizer import ggml
from quantizer.arch.base import bf16_to_f32, f32_to_bf16
from quantizer.build import checkpoint_specs
from quantizer.errors import VerifyError
from quantizer.inspect import field_value, open_gguf
from quantizer.source import Checkpoint, open_checkpoint
from quantizer.spec import TensorSpec
from quantizer.writer import KEY_EQUALIZE_LAYERS, sidecar_path

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (phase, tensors done, tensors total)
Status = Literal["identical", "converted", "quantized", "mismatch"]
SidecarStatus = Literal["ok", "absent"]
FLOAT_TYPES = frozenset({"f32", "bf16", "f16"})

# A quantized tensor whose error is as large as its values holds garbage, whatever the type:
# the lowest-bit types llama.cpp has stay well below this on real weights.
DEFAULT_MAX_RELATIVE_RMS = 1.0
_EQUALIZED = re.compile(r"^(blk\.\d+)\.ffn_(up|down)_exps\.weight$")


@dataclass(frozen=True)
class TensorCheck:
    name: str
    tclass: str
    type: str  # stored type, llama.cpp name in lower case
    base_type: str  # the reference converter's type
    status: Status
    relative_rms: float  # 0.0 for exact tensors
    detail: str = ""  # why a tensor failed


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    sha256: str
    sidecar: SidecarStatus
    checks: tuple[TensorCheck, ...]

    @property
    def failures(self) -> tuple[TensorCheck, ...]:
        return tuple(c for c in self.checks if c.status == "mismatch")

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_for_failures(self) -> None:
        if self.failures:
            first = self.failures[0]
            more = f" ({len(self.failures) - 1} more tensors failed)" if len(self.failures) > 1 else ""
            raise VerifyError(f"{self.path.name}: tensor {first.name}: {first.detail}{more}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_sidecar(path: Path) -> tuple[str, SidecarStatus]:
    """sha256 of the file and whether its `.sha256` sidecar agrees; a disagreement raises."""
    digest = file_sha256(path)
    side = sidecar_path(Path(path))
    if not side.is_file():
        return digest, "absent"
    recorded = side.read_text(encoding="utf-8").split()
    if not recorded or recorded[0].lower() != digest:
        raise VerifyError(f"{path.name}: sha256 {digest} does not match {side.name} ({recorded[0] if recorded else 'empty'})")
    return digest, "ok"


def stored_shape(tensor: ReaderTensor, expected: tuple[int, ...]) -> tuple[int, ...]:
    """GGUF ne reversed into numpy order; trailing size-1 dims some writers drop are restored."""
    ne = [int(n) for n in tensor.shape]
    ne += [1] * (len(expected) - len(ne))
    return tuple(reversed(ne))


def source_slices(checkpoint: Checkpoint, module: ModuleType, spec: TensorSpec, f32: bool) -> Iterator[np.ndarray]:
    """The reference values of a tensor in slices along axis 0: one expert at a time when stacked."""
    build = module.tensor_f32 if f32 else module.build_tensor
    if spec.transform != "stack":
        yield build(checkpoint, spec)
        return
    for source in spec.sources:
        yield build(checkpoint, dataclasses.replace(spec, sources=(source,), shape=spec.shape[1:], transform="copy"))


def stored_slices(data: np.ndarray, count: int) -> Iterator[np.ndarray]:
    """The tensor's raw bytes cut into `count` equal, consecutive parts (experts are row-major)."""
    flat = data.reshape(-1).view(np.uint8)
    step = flat.size // count
    for i in range(count):
        yield flat[i * step : (i + 1) * step]


def _expected_bytes(values: np.ndarray, stored: str, base: str) -> np.ndarray:
    """Exact conversion of reference values (base type) into another float type."""
    if stored == base:
        return values
    as_f32 = bf16_to_f32(values) if base == "bf16" else values.astype(np.float32)
    if stored == "f32":
        return as_f32
    if stored == "bf16":
        return f32_to_bf16(as_f32)
    return as_f32.astype(np.float16)


def _first_difference(got: np.ndarray, want: np.ndarray) -> int:
    return int(np.flatnonzero(got != want)[0])


def check_exact(checkpoint: Checkpoint, module: ModuleType, spec: TensorSpec, stored: str, data: np.ndarray) -> TensorCheck:
    status: Status = "identical" if stored == spec.base_type else "converted"
    n = len(spec.sources) if spec.transform == "stack" else 1
    offset = 0
    for got, values in zip(stored_slices(data, n), source_slices(checkpoint, module, spec, f32=False), strict=True):
        want = np.ascontiguousarray(_expected_bytes(values, stored, spec.base_type)).reshape(-1).view(np.uint8)
        if got.size != want.size or not np.array_equal(got, want):
            where = _first_difference(got, want) if got.size == want.size else -1
            detail = (f"stored {stored} bytes differ from the source at byte {offset + where}" if where >= 0
                      else f"stored {got.size} bytes where the source gives {want.size}")
            return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, "mismatch", float("nan"), detail)
        offset += got.size
    return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, status, 0.0)


def squared_sums(values: np.ndarray, ref: np.ndarray, block: int = 1 << 20) -> tuple[float, float]:
    """Sum of squared errors and of squared reference values, in float64, a block at a time."""
    v, r = values.reshape(-1), ref.reshape(-1)
    err2 = ref2 = 0.0
    for start in range(0, v.size, block):
        vb, rb = v[start : start + block].astype(np.float64), r[start : start + block].astype(np.float64)
        diff = vb - rb
        err2 += float(np.dot(diff, diff))
        ref2 += float(np.dot(rb, rb))
    return err2, ref2


def equalized_scales(checkpoint: Checkpoint, module: ModuleType, spec: TensorSpec, stored: str,
                     data: np.ndarray) -> np.ndarray:
    """Per expert and row of an equalized up_exps, the least-squares s_j with stored_j * s_j ~ source_j."""
    n = len(spec.sources)
    scales = np.ones(spec.shape[:2], dtype=np.float64)
    for i, (raw, ref) in enumerate(zip(stored_slices(data, n), source_slices(checkpoint, module, spec, f32=True), strict=True)):
        values = ggml.dequantize(raw, stored, spec.shape[1:]).astype(np.float64)
        norm = (values * values).sum(axis=1)
        scales[i] = np.where(norm > 0, (values * ref).sum(axis=1) / np.where(norm > 0, norm, 1.0), 1.0)
    return scales


def check_quantized(checkpoint: Checkpoint, module: ModuleType, spec: TensorSpec, stored: str, data: np.ndarray,
                    max_relative_rms: float, row_scales: np.ndarray | None = None,
                    col_scales: np.ndarray | None = None) -> TensorCheck:
    """Relative RMS error of the dequantized tensor; stacked experts' rows multiplied by `row_scales`
    or columns divided by `col_scales` (n_expert, n) first, to undo an equalization."""
    n = len(spec.sources) if spec.transform == "stack" else 1
    slice_shape = spec.shape[1:] if spec.transform == "stack" else spec.shape
    err2 = ref2 = 0.0
    for i, (raw, ref) in enumerate(zip(stored_slices(data, n), source_slices(checkpoint, module, spec, f32=True),
                                       strict=True)):  # fmt: skip
        values = ggml.dequantize(raw, stored, slice_shape)
        if row_scales is not None:
            values = values * row_scales[i][:, None]
        if col_scales is not None:
            values = values / col_scales[i][None, :]
        if not np.isfinite(values).all():
            return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, "mismatch", float("nan"),
                               f"dequantized {stored} data holds NaN or infinity")
        e2, r2 = squared_sums(values, ref)
        err2 += e2
        ref2 += r2
    rel = float(np.sqrt(err2 / ref2)) if ref2 > 0 else float(np.sqrt(err2))
    if not rel <= max_relative_rms:
        return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, "mismatch", rel,
                           f"{stored} relative RMS error {rel:.3g} exceeds {max_relative_rms:g}")
    return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, "quantized", rel)


def tensor_bytes(reader: GGUFReader, tensor: ReaderTensor) -> np.ndarray:
    start = int(tensor.data_offset)
    return reader.data[start : start + int(tensor.n_bytes)]


def check_tensor(checkpoint: Checkpoint, module: ModuleType, spec: TensorSpec, reader: GGUFReader,
                 tensor: ReaderTensor | None, max_relative_rms: float,
                 scales: Callable[[str], np.ndarray | None] = lambda _layer: None) -> TensorCheck:
    if tensor is None:
        return TensorCheck(spec.name, spec.tclass, "-", spec.base_type, "mismatch", float("nan"), "missing from the GGUF")
    stored = tensor.tensor_type.name.lower()
    if stored_shape(tensor, spec.shape) != spec.shape:
        return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, "mismatch", float("nan"),
                           f"shape {list(stored_shape(tensor, spec.shape))}, the source gives {list(spec.shape)}")
    if stored in FLOAT_TYPES:
        return check_exact(checkpoint, module, spec, stored, tensor_bytes(reader, tensor))
    m = _EQUALIZED.match(spec.name)
    s = scales(m.group(1)) if m else None
    row_scales, col_scales = (s, None) if m and m.group(2) == "up" else (None, s)
    return check_quantized(checkpoint, module, spec, stored, tensor_bytes(reader, tensor), max_relative_rms,
                           row_scales, col_scales)  # fmt: skip


def _scale_finder(checkpoint: Checkpoint, module: ModuleType, reader: GGUFReader,
                  specs: list[TensorSpec]) -> Callable[[str], np.ndarray | None]:
    """Scales of each layer the GGUF says was equalized, recovered from its up_exps once."""
    field = reader.fields.get(KEY_EQUALIZE_LAYERS)
    layers = set(field_value(field) or ()) if field is not None else set()
    by_name = {s.name: s for s in specs}
    tensors = {t.name: t for t in reader.tensors}
    found: dict[str, np.ndarray] = {}

    def scales(layer: str) -> np.ndarray | None:
        up = f"{layer}.ffn_up_exps.weight"
        if layer not in layers or up not in tensors or up not in by_name:
            return None
        if layer not in found:
            t = tensors[up]
            found[layer] = equalized_scales(checkpoint, module, by_name[up], t.tensor_type.name.lower(),
                                            tensor_bytes(reader, t))  # fmt: skip
        return found[layer]

    return scales


def _check_architecture(reader: GGUFReader, module: ModuleType, path: Path) -> None:
    field = reader.fields.get("general.architecture")
    arch = field_value(field) if field is not None else None
    if arch != module.GGUF_ARCH:
        raise VerifyError(f"{path.name}: general.architecture is {arch!r}, the source is {module.GGUF_ARCH!r}")


def verify_gguf(
    source: str | Path,
    gguf_path: str | Path,
    *,
    max_relative_rms: float = DEFAULT_MAX_RELATIVE_RMS,
    progress: ProgressFn | None = None,
) -> VerifyReport:
    """Check every tensor of `gguf_path` against the checkpoint folder `source`."""
    path = Path(gguf_path)
    reader = open_gguf(path)
    digest, sidecar = check_sidecar(path)
    checkpoint = open_checkpoint(source)
    try:
        module = arch_registry.get_arch(checkpoint.config)
        _check_architecture(reader, module, path)
        specs = checkpoint_specs(checkpoint)
        stored = {t.name: t for t in reader.tensors}
        extra = sorted(set(stored) - {s.name for s in specs})
        if extra:
            raise VerifyError(f"{path.name}: tensor {extra[0]} has no counterpart in the source")
        checks = []
        scales = _scale_finder(checkpoint, module, reader, specs)
        for i, spec in enumerate(specs):
            check = check_tensor(checkpoint, module, spec, reader, stored.get(spec.name), max_relative_rms, scales)
            logger.debug("%s: %s %s %.3g", spec.name, check.type, check.status, check.relative_rms)
            checks.append(check)
            if progress is not None:
                progress("verify", i + 1, len(specs))
    finally:
        checkpoint.close()
    return VerifyReport(path, digest, sidecar, tuple(checks))
