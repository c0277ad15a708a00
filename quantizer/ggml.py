"""ctypes bindings to the libggml that llama-cpp-python installs: type table, quantize, dequantize.

Quantization runs llama.cpp's own C code (`ggml_quantize_chunk`), so the bytes equal what
`llama-quantize` writes for the same tensor, type and importance matrix. The type table is
gguf-py's (`GGMLQuantizationType`, `GGML_QUANT_SIZES`); the library is loaded on first use,
so importing this module (and planning) needs no shared library.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from quantizer.errors import ImatrixError, QuantError, RecipeError

log = logging.getLogger(__name__)

# Types `ggml_quantize_chunk` can write (ggml/src/ggml.c). Q8_1/Q8_K are dot-product
# intermediates and the integer types are not weights, so none of those are targets.
TARGET_TYPES: frozenset[str] = frozenset({
    "f32", "f16", "bf16",
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q1_0", "mxfp4", "nvfp4",
    "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "tq1_0", "tq2_0",
    "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs",
})  # fmt: skip
FLOAT_TYPES: frozenset[str] = frozenset({"f32", "f16", "bf16"})

# llama.cpp quantizes in chunks of at least this many elements (src/llama-quant.cpp, min_chunk_size).
MIN_CHUNK_ELEMENTS = 32 * 512


def _by_name() -> dict[str, GGMLQuantizationType]:
    return {t.name.lower(): t for t in GGMLQuantizationType if t.name.lower() in TARGET_TYPES}


TYPES: dict[str, GGMLQuantizationType] = _by_name()


def ggml_type(name: str) -> int:
    """llama.cpp's lower-case type name ("iq4_xs", "bf16") -> ggml_type enum value."""
    try:
        return int(TYPES[name.lower()])
    except KeyError:
        known = ", ".join(sorted(TYPES))
        raise RecipeError(f"unknown tensor type {name!r} (known: {known})") from None


def type_name(qtype: str | int) -> str:
    """Canonical lower-case name of a type given as a name or an enum value."""
    if isinstance(qtype, str):
        ggml_type(qtype)
        return qtype.lower()
    for name, t in TYPES.items():
        if int(t) == qtype:
            return name
    raise RecipeError(f"unknown ggml type id {qtype}")


def block_size(qtype: str | int) -> int:
    """Columns per quantization block (1 for float types)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type(type_name(qtype)))][0]


def row_size(qtype: str | int, ncols: int) -> int:
    """Bytes of one row of `ncols` values; ncols must be a multiple of the block size."""
    blck, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type(type_name(qtype)))]
    if ncols % blck:
        raise RecipeError(f"{type_name(qtype)} needs a multiple of {blck} columns, got {ncols}")
    return ncols // blck * size


def is_quantized(qtype: str | int) -> bool:
    return type_name(qtype) not in FLOAT_TYPES


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml/include/ggml.h
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def library_path() -> Path:
    """The libggml-base file that libllama itself loads. Wheels hold copies, not links, of the versioned
    names; libllama needs `libggml-base.so.0`, and opening `libggml-base.so` after it would map a second
    copy of ggml into the process (before it, the loader matches the copy's soname and shares it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise QuantError("llama-cpp-python is not installed: it provides the ggml quantization library")
    package = Path(spec.origin).parent
    for name in ("libggml-base.so.0", "libggml-base.so", "libggml-base.0.dylib", "libggml-base.dylib", "ggml-base.dll"):
        for candidate in (package / "lib" / name, package / name):
            if candidate.is_file():
                return candidate
    raise QuantError(f"libggml-base not found inside the llama_cpp package at {package}")


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    c = ctypes
    lib.ggml_quantize_chunk.argtypes = [c.c_int, c.c_void_p, c.c_void_p, c.c_int64, c.c_int64, c.c_int64, c.c_void_p]
    lib.ggml_quantize_chunk.restype = c.c_size_t
    lib.ggml_quantize_init.argtypes = [c.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [c.c_int]
    lib.ggml_quantize_requires_imatrix.restype = c.c_bool
    lib.ggml_row_size.argtypes = [c.c_int, c.c_int64]
    lib.ggml_row_size.restype = c.c_size_t
    lib.ggml_type_name.argtypes = [c.c_int]
    lib.ggml_type_name.restype = c.c_char_p
    lib.ggml_validate_row_data.argtypes = [c.c_int, c.c_void_p, c.c_size_t]
    lib.ggml_validate_row_data.restype = c.c_bool
    lib.ggml_get_type_traits.argtypes = [c.c_int]
    lib.ggml_get_type_traits.restype = c.POINTER(_TypeTraits)
    # gguf-py's table and this library must agree, or every byte count would be wrong.
    for name, t in TYPES.items():
        blck, size = GGML_QUANT_SIZES[t]
        if lib.ggml_type_name(int(t)).decode().lower() != name or lib.ggml_row_size(int(t), blck) != size:
            raise QuantError(f"gguf-py and libggml disagree on type {name}: versions do not match")
    log.debug("loaded %s", lib._name)
    return lib


def requires_imatrix(qtype: str | int) -> bool:
    """True for types ggml refuses to quantize without an importance matrix (iq2_xxs, iq2_xs, iq1_s)."""
    return bool(_lib().ggml_quantize_requires_imatrix(ggml_type(type_name(qtype))))


def _check_imatrix(imatrix: np.ndarray | None, n_mat: int, ncols: int, what: str) -> np.ndarray | None:
    if imatrix is None:
        return None
    imat = np.ascontiguousarray(imatrix, dtype=np.float32)
    if imat.size != n_mat * ncols or imat.ndim > 2 or imat.shape[-1] != ncols:
        want = f"({ncols},)" if n_mat == 1 else f"({n_mat}, {ncols})"
        raise ImatrixError(f"{what}: importance matrix has shape {imatrix.shape}, tensor needs {want}")
    # means of squares are >= 0; a negative weight aborts the IQ3/IQ2 searches (GGML_ASSERT(grid_index >= 0))
    # and zeroes IQ4_XS blocks, so neither may reach ggml
    if not np.isfinite(imat).all():
        raise ImatrixError(f"{what}: importance matrix contains non-finite values")
    if (imat < 0).any():
        raise ImatrixError(f"{what}: importance matrix contains negative values")
    return imat.reshape(n_mat, ncols)


def _check_finite(src: np.ndarray, rows: int, what: str) -> None:
    """Refuse Inf/NaN in `src` (n_mat * rows, cols): ggml's quantizers abort the process on them
    (GGML_ASSERT(scale >= 0) in the IQ searches)."""
    if np.isfinite(src).all():
        return
    first = int(np.flatnonzero(~np.isfinite(src))[0])  # failure path only
    row, col = divmod(first, src.shape[-1])
    expert = f" of expert {row // rows}" if src.shape[0] > rows else ""
    raise QuantError(f"{what}: non-finite value {src.flat[first]} at row {row % rows}, column {col}{expert}; "
                     "llama.cpp cannot quantize it")


def _chunks(n_mat: int, rows: int, ncols: int) -> list[tuple[int, int]]:
    """(first global row, row count) pieces sized as llama.cpp's, never crossing an expert boundary."""
    chunk_elements = ncols if ncols >= MIN_CHUNK_ELEMENTS else ncols * -(-MIN_CHUNK_ELEMENTS // ncols)
    per_chunk = chunk_elements // ncols
    return [(m * rows + r, min(per_chunk, rows - r)) for m in range(n_mat) for r in range(0, rows, per_chunk)]


def quantize(
    data: np.ndarray,
    qtype: str,
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
    *,
    tensor: str | None = None,
) -> np.ndarray:
    """Quantize float32 (rows, cols) or (n_expert, rows, cols) to `qtype`; returns the raw bytes.

    `imatrix` is the per-column mean of squared activations: (cols,) for a matrix,
    (n_expert, cols) for stacked experts (one slice per expert, as llama-quantize passes it).
    `tensor` names the data in errors. Non-finite data or importance, or negative importance,
    raise QuantError: ggml would abort the process or write zeros.
    """
    name = type_name(qtype)
    if data.ndim not in (2, 3):
        raise QuantError(f"quantize expects a 2-D or 3-D array, got shape {data.shape}")
    n_mat, rows, ncols = (1, *data.shape) if data.ndim == 2 else data.shape
    what = f"{tensor or 'tensor'} {tuple(data.shape)} -> {name}"
    rsize = row_size(name, ncols)
    imat = _check_imatrix(imatrix, n_mat, ncols, what)
    lib = _lib()
    tid = ggml_type(name)
    if imat is None and lib.ggml_quantize_requires_imatrix(tid):
        raise ImatrixError(f"type {name} cannot be quantized without an importance matrix")
    src = np.ascontiguousarray(data, dtype=np.float32).reshape(n_mat * rows, ncols)
    _check_finite(src, rows, what)
    out = np.empty(n_mat * rows * rsize, dtype=np.uint8)
    lib.ggml_quantize_init(tid)  # build the lattice tables once, before the threads race for them

    def run(piece: tuple[int, int]) -> None:
        first, nrows = piece
        dst = out.ctypes.data + first * rsize
        imat_ptr = None if imat is None else imat[first // rows].ctypes.data
        written = lib.ggml_quantize_chunk(tid, src[first].ctypes.data, dst, 0, nrows, ncols, imat_ptr)
        if written != nrows * rsize or not lib.ggml_validate_row_data(tid, dst, written):
            raise QuantError(f"{name} quantization produced invalid data (rows {first}..{first + nrows})")

    pieces = _chunks(n_mat, rows, ncols)
    workers = max(1, min(threads or os.cpu_count() or 1, len(pieces)))
    if workers == 1:
        for piece in pieces:
            run(piece)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, pieces))  # ctypes drops the GIL for the C call
    return out


def dequantize(raw: np.ndarray, qtype: str, shape: Sequence[int]) -> np.ndarray:
    """Raw bytes of `qtype` -> float32 array of numpy `shape` (last dim = row), via ggml's to_float."""
    name = type_name(qtype)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    expected = n // shape[-1] * row_size(name, shape[-1]) if shape else 0
    buf = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if buf.size != expected:
        raise QuantError(f"{name} data for shape {shape} needs {expected} bytes, got {buf.size}")
    if name == "f32":
        return buf.view(np.float32).reshape(shape).copy()
    traits = _lib().ggml_get_type_traits(ggml_type(name)).contents
    if not traits.to_float:
        raise QuantError(f"ggml has no dequantization for {name}")
    out = np.empty(n, dtype=np.float32)
    _TO_FLOAT(traits.to_float)(buf.ctypes.data, out.ctypes.data, n)
    return out.reshape(shape)
