"""Importance matrices as llama.cpp writes them: the GGUF format and the legacy .dat format.

`load_imatrix` returns the per-column means llama-quantize feeds to ggml (tools/quantize/quantize.cpp,
load_imatrix): GGUF `<name>.in_sum2 / <name>.counts` per expert (a matrix with no data gets ones),
legacy sums divided by their call count. `write_imatrix_gguf` writes the file llama-imatrix writes
(tools/imatrix/imatrix.cpp, save_imatrix): the same keys, tensor order, shapes and layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GGUFReader, GGUFValueType
from gguf.constants import GGMLQuantizationType

from quantizer.errors import ImatrixError
from quantizer.plan import Plan
from quantizer.spec import TensorSpec
from quantizer.writer import new_partial

# Keys of llama.cpp's GGUF imatrix (common/imatrix-loader.h).
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"


@dataclass(frozen=True)
class Imatrix:
    """Per-column activation importance, keyed by GGUF tensor name."""

    path: str
    sha256: str
    # float32 (cols,) for a matrix, (n_expert, cols) for stacked experts; a legacy file does not
    # record the expert split, so its entries stay flat until `check_against` shapes them.
    entries: Mapping[str, np.ndarray]
    datasets: tuple[str, ...]
    chunk_count: int
    chunk_size: int = 0
    legacy: bool = False
    # per stacked-expert entry, which experts saw data (GGUF files only: the legacy format has no counts)
    present: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a GGUF or legacy .dat importance matrix; the format is told by the GGUF magic."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ImatrixError(f"cannot read importance matrix {p}: {exc.strerror}") from None
    is_gguf = len(magic) == 4 and struct.unpack("<I", magic)[0] == GGUF_MAGIC
    try:
        record = _load_gguf(p) if is_gguf else _load_legacy(p)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ImatrixError(f"{p} is not a readable importance matrix: {exc}") from None
    if not record.entries:
        raise ImatrixError(f"importance matrix {p} has no entries")
    _check_values(record)
    return record


def _check_values(record: Imatrix) -> None:
    """Means of squared activations are finite and >= 0: ggml aborts the process on a negative
    importance in the IQ3/IQ2 searches (GGML_ASSERT(grid_index >= 0)) and writes zeros for IQ4_XS."""
    for name, values in record.entries.items():
        if not np.isfinite(values).all():
            raise ImatrixError(f"importance matrix {record.path}: entry {name} has non-finite values")
        if (values < 0).any():
            raise ImatrixError(f"importance matrix {record.path}: entry {name} has negative values")


def _field(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _load_gguf(path: Path) -> Imatrix:
    reader = GGUFReader(path)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.tensor_type != GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor {t.name} is {t.tensor_type.name}, imatrix data must be F32")
        for suffix, table in ((SUFFIX_SUMS, sums), (SUFFIX_COUNTS, counts)):
            if t.name.endswith(suffix):
                table[t.name[: -len(suffix)]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if sums.keys() != counts.keys():
        odd = sorted(sums.keys() ^ counts.keys())[0]
        raise ImatrixError(f"{path}: {odd} has sums without counts or counts without sums")
    if any(reader.get_field(key) is None for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)):
        # llama-quantize refuses such a file too
        raise ImatrixError(f"{path}: missing imatrix metadata ({KEY_DATASETS}, {KEY_CHUNK_COUNT}, {KEY_CHUNK_SIZE})")
    entries = {name: _mean(name, sums[name], counts[name]) for name in sorted(sums)}
    present = {name: np.floor(c.astype(np.float64) + 0.5) > 0 for name, c in counts.items() if c.size > 1}
    return Imatrix(
        path=str(path),
        sha256=_sha256(path),
        entries=entries,
        datasets=tuple(_field(reader, KEY_DATASETS)),
        chunk_count=int(_field(reader, KEY_CHUNK_COUNT)),
        chunk_size=int(_field(reader, KEY_CHUNK_SIZE) or 0),
        present=present,
    )


def _mean(name: str, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    n_mat = counts.size
    if n_mat == 0 or sums.size % n_mat:
        raise ImatrixError(f"imatrix entry {name}: {sums.size} sums do not split into {n_mat} matrices")
    per_mat = sums.reshape(n_mat, -1)
    # counts are stored as float and rounded to integers on load, as llama.cpp does
    n = np.floor(counts.astype(np.float64) + 0.5).astype(np.float32)[:, None]
    mean = np.where(n > 0, per_mat / np.where(n > 0, n, np.float32(1)), np.float32(1)).astype(np.float32)
    return mean[0] if n_mat == 1 else mean


def _load_legacy(path: Path) -> Imatrix:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from(fmt, raw, pos)
        pos += struct.calcsize(fmt)
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ImatrixError(f"{path}: no entries (neither a GGUF nor a legacy imatrix?)")
    entries: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (name_len,) = take("<i")
        name = raw[pos : pos + name_len].decode("utf-8")
        pos += name_len
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(raw):
            raise ImatrixError(f"{path}: entry {name!r} is truncated")
        sums = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # legacy sums are mean * ncall; llama-quantize divides the call count back out
        entries[name] = sums / np.float32(ncall) if ncall > 0 else sums
    chunk_count, datasets = 0, ()
    if pos + 4 <= len(raw):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (ds_len,) = take("<i")
            if ds_len > 0:
                datasets = (raw[pos : pos + ds_len].decode("utf-8"),)
    return Imatrix(str(path), _sha256(path), entries, datasets, chunk_count, 0, legacy=True)


def check_against(imatrix: Imatrix, model: Plan | Iterable[TensorSpec]) -> Imatrix:
    """Check that every entry names a tensor of this model with matching columns (and experts).

    Returns the record with each entry shaped as that tensor needs: (cols,) or (n_expert, cols).
    """
    specs = (e.spec for e in model.entries) if isinstance(model, Plan) else model
    by_name = {s.name: s for s in specs}
    foreign = [name for name in imatrix.entries if name not in by_name]
    if foreign:
        raise ImatrixError(
            f"{imatrix.path} is for another model: {len(foreign)} of {len(imatrix.entries)} entries "
            f"name no tensor of this one (first: {foreign[0]})"
        )
    shaped: dict[str, np.ndarray] = {}
    for name, values in imatrix.entries.items():
        spec = by_name[name]
        cols = spec.shape[-1]
        n_mat = spec.shape[0] if len(spec.shape) == 3 else 1
        if values.size != n_mat * cols or values.shape[-1] not in (cols, n_mat * cols):
            want = f"{cols} columns" + (f" x {n_mat} experts" if n_mat > 1 else "")
            raise ImatrixError(
                f"{imatrix.path} is for another model: {name} has {values.size} values, the tensor needs {want}"
            )
        shaped[name] = values.reshape(n_mat, cols) if n_mat > 1 else values.reshape(cols)
    return dataclasses.replace(imatrix, entries=shaped)


def _gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _pad(n: int, align: int = GGUF_DEFAULT_ALIGNMENT) -> int:
    return -n % align


def temporary_beside(out: Path) -> Path:
    """A new empty file in `out`'s folder, with the user's usual permissions, to be renamed over `out`
    by `publish` once complete: a rename within one folder never leaves a half-written `out`."""
    try:
        return new_partial(out)
    except OSError as exc:
        raise ImatrixError(f"cannot write {out}: {exc.strerror or exc}") from None


def publish(staged: Sequence[tuple[Path, Path]]) -> None:
    """Rename each finished (temporary, output) pair's temporary file over its output, in order."""
    for tmp, out in staged:
        try:
            os.replace(tmp, out)
        except OSError as exc:
            raise ImatrixError(f"cannot write {out}: {exc.strerror or exc}") from exc


def write_imatrix_gguf(
    path: str | os.PathLike[str],
    sums: Mapping[str, np.ndarray],
    counts: Mapping[str, np.ndarray],
    datasets: Sequence[str],
    chunk_count: int,
    chunk_size: int,
) -> None:
    """Write raw statistics in llama-imatrix's GGUF layout; the file appears only once complete."""
    tmp = stage_imatrix_gguf(path, sums, counts, datasets, chunk_count, chunk_size)
    try:
        publish([(tmp, Path(path))])
    finally:
        tmp.unlink(missing_ok=True)


def stage_imatrix_gguf(
    path: str | os.PathLike[str],
    sums: Mapping[str, np.ndarray],
    counts: Mapping[str, np.ndarray],
    datasets: Sequence[str],
    chunk_count: int,
    chunk_size: int,
) -> Path:
    """Write raw statistics in llama-imatrix's GGUF layout to a temporary file beside `path`, returned
    for `publish` (which renames it over `path`); nothing is left behind if the write fails.

    `sums[name]`: summed squared activations, (cols,) or (n_expert, cols); `counts[name]`: rows
    accumulated per matrix, a scalar/(1,) or (n_expert,).
    """
    if sums.keys() != counts.keys():
        raise ImatrixError("sums and counts must name the same tensors")
    kv = b"".join((
        _gguf_string(KEY_TYPE) + struct.pack("<I", GGUFValueType.STRING) + _gguf_string("imatrix"),
        _gguf_string(KEY_DATASETS) + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, len(datasets)),
        *(_gguf_string(d) for d in datasets),
        _gguf_string(KEY_CHUNK_COUNT) + struct.pack("<II", GGUFValueType.UINT32, chunk_count),
        _gguf_string(KEY_CHUNK_SIZE) + struct.pack("<II", GGUFValueType.UINT32, chunk_size),
    ))  # fmt: skip
    tensors: list[tuple[str, np.ndarray, tuple[int, ...]]] = []
    for name in sorted(sums):  # llama-imatrix sorts names for a deterministic file
        c = np.asarray(counts[name], dtype=np.float32).reshape(-1)
        s = np.asarray(sums[name], dtype=np.float32).reshape(c.size, -1)
        n_mat, cols = s.shape
        if n_mat == 0 or cols == 0:
            continue
        # ggml counts dims up to the last one > 1, so a single matrix is written 1-D
        tensors.append((name + SUFFIX_SUMS, s, (cols, n_mat) if n_mat > 1 else (cols,)))
        tensors.append((name + SUFFIX_COUNTS, c, (1, n_mat) if n_mat > 1 else (1,)))
    infos, offset = [], 0
    for name, data, ne in tensors:
        infos.append(
            _gguf_string(name)
            + struct.pack(f"<I{len(ne)}qiQ", len(ne), *ne, GGMLQuantizationType.F32, offset)
        )
        offset += data.nbytes + _pad(data.nbytes)
    header = struct.pack("<IIqq", GGUF_MAGIC, GGUF_VERSION, len(tensors), 4) + kv + b"".join(infos)
    out = Path(path)
    tmp = temporary_beside(out)
    try:
        with tmp.open("wb") as f:
            f.write(header + bytes(_pad(len(header))))
            for _, data, _ in tensors:
                f.write(data.astype("<f4").tobytes() + bytes(_pad(data.nbytes)))
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, file too large, permissions...: one line, not a traceback
            raise ImatrixError(f"cannot write {out}: {exc.strerror or exc}") from exc
        raise
    return tmp
