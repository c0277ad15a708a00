"""Check a written GGUF against its source checkpoint, tensor by tensor.

Tensors stored in their reference type (what `convert_hf_to_gguf.py --outtype bf16` writes) must
hold exactly the bytes the architecture module builds from the source. Other float types must be
the exact conversion of those values. Quantized tensors are dequantized with ggml's own code and
their error is measured relative to the values llama-quantize would have read (RMS of the error
over RMS of the values), for the whole tensor and for each expert of a stacked one, against a bound
per type (MAX_RELATIVE_RMS); data that dequantizes to zeros fails whatever the bound. Each tensor's
stored type must be the one the plan of the recipe recorded in the file (`coder_quant.recipe.rules`)
gives it; a file without a recorded recipe must still hold attention, SSM, shared-expert, norm and
router tensors in their reference type. The hyper-parameters the architecture module writes from
config.json must read back the same. The sha256 sidecar, when present, must match the file. In
layers whose routed up/down channels were equalized (`coder_quant.equalize.layers`), each row j of
up_exps is compared after a least-squares fit of its scale s_j, and column j of down_exps after
dividing by that same s_j: a down that does not undo its up's scaling fails.

`verify_gguf` returns one record per tensor and per metadata key; problems are recorded, not raised,
so the caller can show the whole table before `VerifyReport.raise_for_failures` names the first
failing key or tensor.
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
from quantizer.plan import make_plan
from quantizer.source import Checkpoint, open_checkpoint
from quantizer.spec import TensorSpec
from quantizer.verify_metadata import MetadataCheck, metadata_checks, planned_types, recorded_recipe
from quantizer.writer import KEY_EQUALIZE_LAYERS, sidecar_path

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (phase, tensors done, tensors total)
Status = Literal["identical", "converted", "quantized", "mismatch"]
SidecarStatus = Literal["ok", "absent"]
FLOAT_TYPES = frozenset({"f32", "bf16", "f16"})

# Bound on a quantized tensor's relative RMS error (also per expert), per stored type: about 2.5x the
# worst error llama.cpp's quantizer gave (in the comment), over every 2-D tensor of the tiny synthetic
# checkpoint and of ../shared/reference-model, whole and per expert, without an importance matrix, with
# a collected one and with a skewed one (log-normal, sigma 2), and in GPTQ-rounded and equalized builds.
# Zeroed data gives 1.0 and halved data 0.5. For types whose honest error is above ~0.2 no bound can
# sit 2x above it and below 0.5: those bounds are tighter multiples, and past ~0.25 they catch only
# zeroed or garbage data. The ternary tq types are meant for ternary-trained weights, hence ~0.85 here.
MAX_RELATIVE_RMS: dict[str, float] = {
    "q8_0": 0.015,  # 0.0056
    "q6_k": 0.05,  # 0.0198
    "q5_k": 0.10,  # 0.0388
    "q5_1": 0.10,  # 0.0408
    "q5_0": 0.12,  # 0.0465
    "q4_k": 0.20,  # 0.0788
    "q4_1": 0.20,  # 0.0850
    "q4_0": 0.22,  # 0.0916
    "iq4_nl": 0.21,  # 0.0828
    "iq4_xs": 0.24,  # 0.0953 (one GPTQ-rounded expert; 0.0836 plain)
    "nvfp4": 0.28,  # 0.1172
    "mxfp4": 0.30,  # 0.1237
    "q3_k": 0.40,  # 0.1669
    "iq3_s": 0.40,  # 0.1892 (0.1641 equalized, 0.1483 with the collected imatrix)
    "iq3_xxs": 0.45,  # 0.2349
    "iq2_s": 0.60,  # 0.2894
    "q2_k": 0.65,  # 0.3471
    "iq2_xs": 0.70,  # 0.3608
    "iq2_xxs": 0.80,  # 0.4435
    "iq1_s": 0.90,  # 0.5589
    "iq1_m": 0.90,  # 0.6053
    "q1_0": 0.90,  # 0.6212
    "tq2_0": 0.97,  # 0.8660
    "tq1_0": 0.97,  # 0.8660
}
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
    metadata: tuple[MetadataCheck, ...] = ()
    recipe: str | None = None  # the recorded recipe whose plan the stored types were checked against

    @property
    def failures(self) -> tuple[TensorCheck, ...]:
        return tuple(c for c in self.checks if c.status == "mismatch")

    @property
    def metadata_failures(self) -> tuple[MetadataCheck, ...]:
        return tuple(m for m in self.metadata if not m.ok)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.metadata_failures

    def raise_for_failures(self) -> None:
        keys, tensors = self.metadata_failures, self.failures
        if not keys and not tensors:
            return
        counts = [f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((len(keys), "metadata key"), (len(tensors), "tensor"))
                  if n]  # fmt: skip
        more = f" ({' and '.join(counts)} failed)" if len(keys) + len(tensors) > 1 else ""
        first = f"metadata {keys[0].key}: {keys[0].detail}" if keys else f"tensor {tensors[0].name}: {tensors[0].detail}"
        raise VerifyError(f"{self.path.name}: {first}{more}")


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


def _relative(err2: float, ref2: float) -> float:
    return float(np.sqrt(err2 / ref2)) if ref2 > 0 else float(np.sqrt(err2))


def check_quantized(checkpoint: Checkpoint, module: ModuleType, spec: TensorSpec, stored: str, data: np.ndarray,
                    max_relative_rms: float | None = None, row_scales: np.ndarray | None = None,
                    col_scales: np.ndarray | None = None) -> TensorCheck:
    """Relative RMS error of the dequantized tensor, and of each expert of a stacked one, against
    `max_relative_rms` (default: MAX_RELATIVE_RMS of the stored type); stacked experts' rows multiplied
    by `row_scales` or columns divided by `col_scales` (n_expert, n) first, to undo an equalization."""
    bound = MAX_RELATIVE_RMS.get(stored) if max_relative_rms is None else max_relative_rms
    if bound is None:
        return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, "mismatch", float("nan"),
                           f"no error bound is known for type {stored}")
    n = len(spec.sources) if spec.transform == "stack" else 1
    slice_shape = spec.shape[1:] if spec.transform == "stack" else spec.shape
    err2 = ref2 = 0.0
    zeros: list[int] = []  # slices that dequantize to zeros where the source is not zero
    over: tuple[int, float] | None = None  # the first expert past the bound
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
        if r2 > 0 and not values.any():
            zeros.append(i)
        elif over is None and n > 1 and not _relative(e2, r2) <= bound:
            over = (i, _relative(e2, r2))
    rel = _relative(err2, ref2)
    if zeros:
        detail = (f"{stored} data dequantizes to all zeros" if len(zeros) == n else
                  f"expert {zeros[0]}: {stored} data dequantizes to all zeros ({len(zeros)} of {n} experts)")
    elif not rel <= bound:
        detail = f"{stored} relative RMS error {rel:.3g} exceeds {bound:g}"
    elif over is not None:
        detail = f"expert {over[0]}: {stored} relative RMS error {over[1]:.3g} exceeds {bound:g}"
    else:
        return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, "quantized", rel)
    return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, "mismatch", rel, detail)


def tensor_bytes(reader: GGUFReader, tensor: ReaderTensor) -> np.ndarray:
    start = int(tensor.data_offset)
    return reader.data[start : start + int(tensor.n_bytes)]


def check_tensor(checkpoint: Checkpoint, module: ModuleType, spec: TensorSpec, reader: GGUFReader,
                 tensor: ReaderTensor | None, max_relative_rms: float | None,
                 scales: Callable[[str], np.ndarray | None] = lambda _layer: None,
                 planned: tuple[str, str] | None = None) -> TensorCheck:
    """`planned`: (type the tensor must be stored in, why); None lets any type through."""
    if tensor is None:
        return TensorCheck(spec.name, spec.tclass, "-", spec.base_type, "mismatch", float("nan"), "missing from the GGUF")
    stored = tensor.tensor_type.name.lower()
    if stored_shape(tensor, spec.shape) != spec.shape:
        return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, "mismatch", float("nan"),
                           f"shape {list(stored_shape(tensor, spec.shape))}, the source gives {list(spec.shape)}")
    if planned is not None and stored != planned[0]:
        return TensorCheck(spec.name, spec.tclass, stored, spec.base_type, "mismatch", float("nan"),
                           f"stored as {stored}, but {planned[1]}")
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
    max_relative_rms: float | None = None,
    progress: ProgressFn | None = None,
) -> VerifyReport:
    """Check every tensor and the hyper-parameters of `gguf_path` against the checkpoint folder `source`.

    `max_relative_rms` replaces the per-type bounds of MAX_RELATIVE_RMS with one bound for every type."""
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
        recipe, metadata = recorded_recipe(reader)
        plan = make_plan(specs, recipe) if recipe is not None else None
        metadata += metadata_checks(reader, module, checkpoint.config, plan)
        planned = planned_types(specs, plan)
        checks = []
        scales = _scale_finder(checkpoint, module, reader, specs)
        for i, spec in enumerate(specs):
            check = check_tensor(checkpoint, module, spec, reader, stored.get(spec.name), max_relative_rms, scales,
                                 planned.get(spec.name))  # fmt: skip
            logger.debug("%s: %s %s %.3g", spec.name, check.type, check.status, check.relative_rms)
            checks.append(check)
            if progress is not None:
                progress("verify", i + 1, len(specs))
    finally:
        checkpoint.close()
    return VerifyReport(path, digest, sidecar, tuple(checks), tuple(metadata), recipe.name if recipe else None)
