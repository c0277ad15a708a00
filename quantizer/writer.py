"""Carry out a plan: stream every tensor into a GGUF, atomically, with a sha256 sidecar.

Tensor infos and metadata go first (GGUFWriter: header, key/values, tensor infos), then each
tensor is built, converted or quantized and written in turn, so memory stays bounded by the
largest tensor. The file is written to a temporary file of its own beside OUT (.OUT.XXXXXXXX.partial,
so that concurrent builds to one OUT never share one), fsynced and renamed; on any error, Ctrl-C or
SIGTERM, the temporary file is removed and nothing appears at OUT.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, Protocol

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from quantizer import __version__, ggml
from quantizer.arch.base import add_general_metadata, f32_to_bf16
from quantizer.errors import QuantError
from quantizer.source import Checkpoint
from quantizer.spec import TensorSpec
from quantizer.vocab import Vocab, add_vocab

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (phase, bytes done, bytes total)

# Our own provenance keys; `coder-quant inspect` prints everything under the prefix.
KEY_PREFIX = "coder_quant."
KEY_VERSION = KEY_PREFIX + "version"
KEY_RECIPE = KEY_PREFIX + "recipe"
KEY_RULES = KEY_PREFIX + "recipe.rules"  # "PATTERN=TYPE (label)" per rule, first match wins
KEY_IMATRIX_FILE = KEY_PREFIX + "imatrix.file"
KEY_IMATRIX_SHA256 = KEY_PREFIX + "imatrix.sha256"
KEY_SOURCE_FILES = KEY_PREFIX + "source.files"
KEY_SOURCE_SHA256 = KEY_PREFIX + "source.sha256"  # parallel to source.files
KEY_EQUALIZE = KEY_PREFIX + "equalize"  # how routed up/down were equalized (quantizer.equalize)
KEY_EQUALIZE_LAYERS = KEY_PREFIX + "equalize.layers"  # the layers it applies to
KEY_GPTQ = KEY_PREFIX + "gptq"  # how routed experts were rounded (quantizer.gptq)
KEY_GPTQ_LAYERS = KEY_PREFIX + "gptq.layers"
KEY_GPTQ_COVARIANCE_SHA256 = KEY_PREFIX + "gptq.covariance.sha256"


class ValueTransform(Protocol):
    """Changes a quantized tensor's values (and importance) before llama.cpp quantizes them
    (quantizer.equalize.Equalizer, quantizer.gptq.GptqRounder)."""

    def apply(self, spec: TensorSpec, values: np.ndarray,
              weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]: ...


class PlannedTensor(Protocol):
    """One plan entry as the writer needs it (quantizer.plan.PlanEntry)."""

    spec: TensorSpec
    type: str
    nbytes: int


@dataclass(frozen=True)
class Provenance:
    """What the output records about how it was made."""

    recipe: str
    rules: tuple[str, ...]
    sources: tuple[tuple[str, str], ...]  # (file name, sha256)
    imatrix_file: str | None = None
    imatrix_sha256: str | None = None
    equalize: str | None = None  # method, when routed up/down channels were equalized
    equalize_layers: tuple[str, ...] = ()
    gptq: str | None = None  # method, when routed experts were rounded by GPTQ
    gptq_layers: tuple[str, ...] = ()
    gptq_covariance_sha256: str | None = None


@dataclass(frozen=True)
class WriteResult:
    path: Path
    sha256: str
    nbytes: int
    tensors: int


PARTIAL_SUFFIX = ".partial"


def _partial_prefix(out: Path) -> str:
    # hidden, and named after the output, so that a listing shows whose temporary file it is
    return f".{out.name}."


def partial_paths(out: Path) -> list[Path]:
    """The temporary files beside `out` of writes to it or to its sidecar: in progress, or left by a
    process killed outright (SIGKILL, power loss), which no cleanup can reach."""
    pattern = glob.escape(_partial_prefix(out)) + "*" + PARTIAL_SUFFIX
    return sorted(out.parent.glob(pattern))


def usual_mode() -> int:
    """The permissions a new file of this user gets (0o666 less the umask), not mkstemp's private 0600."""
    # the umask can only be read by setting it; a strict value in between loosens nothing meanwhile
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def new_partial(out: Path) -> Path:
    """A new empty file beside `out`, unique to this write, with the permissions the user's umask gives
    any new file (not mkstemp's private 0600), which the published file keeps."""
    fd, name = tempfile.mkstemp(prefix=_partial_prefix(out), suffix=PARTIAL_SUFFIX, dir=out.parent)
    try:
        os.fchmod(fd, usual_mode())
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return Path(name)


def sync_complete(f: BinaryIO, path: Path) -> int:
    """Flush and fsync `f` (open on `path`) and return its size; a file shorter on disk than what was
    written to it (a file-size limit met in the last buffered bytes) is an error, never published."""
    f.flush()
    os.fsync(f.fileno())
    size, on_disk = f.tell(), os.fstat(f.fileno()).st_size
    if on_disk != size:
        raise QuantError(f"short write: {path.name} has {on_disk} bytes on disk, {size} were written")
    return size


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".sha256")


def file_type(entries: Sequence[PlannedTensor]) -> LlamaFileType:
    """general.file_type: llama.cpp's file type for the quantized type holding the most bytes
    (as llama-quantize names a mix after its target), or the dominant float type if none."""
    by_bytes: Counter[str] = Counter()
    for entry in entries:
        by_bytes[entry.type] += entry.nbytes
    quantized = Counter({t: n for t, n in by_bytes.items() if ggml.is_quantized(t)})
    ranked = (quantized or by_bytes).most_common(1)
    dominant = ranked[0][0].upper() if ranked else "BF16"
    for name in ("ALL_" + dominant, "MOSTLY_" + dominant, f"MOSTLY_{dominant}_M", f"MOSTLY_{dominant}_S"):
        if name in LlamaFileType.__members__:
            return LlamaFileType[name]
    return LlamaFileType.GUESSED


def _add_provenance(writer: gguf.GGUFWriter, prov: Provenance) -> None:
    writer.add_string(KEY_VERSION, __version__)
    writer.add_string(KEY_RECIPE, prov.recipe)
    writer.add_array(KEY_RULES, list(prov.rules))
    if prov.imatrix_file is not None:
        writer.add_string(KEY_IMATRIX_FILE, prov.imatrix_file)
        writer.add_string(KEY_IMATRIX_SHA256, prov.imatrix_sha256 or "")
    if prov.equalize is not None:
        writer.add_string(KEY_EQUALIZE, prov.equalize)
        writer.add_array(KEY_EQUALIZE_LAYERS, list(prov.equalize_layers))
    if prov.gptq is not None:
        writer.add_string(KEY_GPTQ, prov.gptq)
        writer.add_array(KEY_GPTQ_LAYERS, list(prov.gptq_layers))
        writer.add_string(KEY_GPTQ_COVARIANCE_SHA256, prov.gptq_covariance_sha256 or "")
    writer.add_array(KEY_SOURCE_FILES, [name for name, _ in prov.sources])
    writer.add_array(KEY_SOURCE_SHA256, [digest for _, digest in prov.sources])


def tensor_data(checkpoint: Checkpoint, arch: ModuleType, entry: PlannedTensor,
                imatrix: Mapping[str, np.ndarray] | None, threads: int,
                transform: ValueTransform | None = None) -> np.ndarray:
    """The bytes (as an array) of one tensor in its planned type."""
    spec = entry.spec
    if entry.type == spec.base_type:
        return arch.build_tensor(checkpoint, spec)
    values = arch.tensor_f32(checkpoint, spec)
    checkpoint.release()  # the source pages are no longer needed while quantizing
    if entry.type == "f32":
        return values
    if entry.type == "bf16":
        return f32_to_bf16(values)
    if entry.type == "f16":
        return values.astype(np.float16)
    weights = None if imatrix is None else imatrix.get(spec.name)
    if transform is not None:
        if not np.isfinite(values).all():  # ggml.quantize checks too, but by then the name is lost
            raise QuantError(f"{spec.name}: non-finite values; llama.cpp cannot quantize them")
        values, weights = transform.apply(spec, values, weights)
    return ggml.quantize(values, entry.type, weights, threads, tensor=spec.name)


def _build_writer(checkpoint: Checkpoint, arch: ModuleType, entries: Sequence[PlannedTensor], vocab: Vocab,
                  prov: Provenance) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(path=None, arch=arch.GGUF_ARCH)
    for entry in entries:
        qtype = GGMLQuantizationType[entry.type.upper()]
        # element shape with a non-uint8 dtype: GGUFWriter then keeps the shape as given
        writer.add_tensor_info(entry.spec.name, entry.spec.shape, np.dtype(np.float32), entry.nbytes, raw_dtype=qtype)
    # key order as the reference writes it: general.*, hyper-parameters, quantization version, tokenizer
    add_general_metadata(writer, checkpoint.path)
    arch.add_hparams(writer, checkpoint.config, int(file_type(entries)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, vocab)
    _add_provenance(writer, prov)
    return writer


def check_output_path(out: Path) -> None:
    """Refuse an output no write could publish, in one line; cheap, so callers run it before long work."""
    if out.is_dir():
        raise QuantError(f"{out} is a directory (give the path of the file to write)")
    if not out.parent.exists():
        raise QuantError(f"{out}: output folder does not exist")
    if not out.parent.is_dir():
        raise QuantError(f"{out}: {out.parent} is not a folder")


def _new_sidecar(out: Path, digest: str) -> Path:
    tmp = new_partial(sidecar_path(out))
    tmp.write_text(f"{digest}  {out.name}\n", encoding="utf-8")
    return tmp


def _publish(tmp: Path, side_tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished GGUF, then its sidecar, into place. The folder is locked meanwhile, so that
    two builds finishing together cannot leave one's GGUF beside the other's digest."""
    folder = os.open(out.parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without flock (some NFS): publish unlocked
            fcntl.flock(folder, fcntl.LOCK_EX)
        if out.exists() and not force:  # another build published it while this one was writing
            raise QuantError(f"{out} exists (use --force to overwrite)")
        sidecar_path(out).unlink(missing_ok=True)  # never leave a stale digest beside a new file
        os.replace(tmp, out)
        with contextlib.suppress(OSError):  # not every file system syncs a folder
            os.fsync(folder)
        os.replace(side_tmp, sidecar_path(out))
    finally:
        os.close(folder)  # releases the lock


def write_gguf(
    out: Path,
    checkpoint: Checkpoint,
    arch: ModuleType,
    entries: Sequence[PlannedTensor],
    vocab: Vocab,
    provenance: Provenance,
    *,
    imatrix: Mapping[str, np.ndarray] | None = None,
    threads: int = 1,
    force: bool = False,
    progress: ProgressFn | None = None,
    transform: ValueTransform | None = None,
) -> WriteResult:
    """Write `entries` (in order) from `checkpoint` to `out`; all or nothing."""
    out = Path(out)
    check_output_path(out)
    if out.exists() and not force:
        raise QuantError(f"{out} exists (use --force to overwrite)")
    writer = _build_writer(checkpoint, arch, entries, vocab, provenance)
    partial: Path | None = None
    side: Path | None = None
    try:
        partial = new_partial(out)
        digest, size = _stream(writer, partial, checkpoint, arch, entries, imatrix, threads, progress, transform)
        side = _new_sidecar(out, digest)
        _publish(partial, side, out, force)
    except BaseException as exc:
        # closing retries a failed flush; the first error is the one to report
        with contextlib.suppress(OSError):
            writer.close()
        for tmp in (partial, side):
            if tmp is not None:
                tmp.unlink(missing_ok=True)  # already renamed into place if publishing got that far
        if isinstance(exc, OSError):  # disk full, permissions...: one line, not a traceback
            raise QuantError(f"I/O error while writing {out}: {exc.strerror or exc}") from exc
        raise
    logger.info("wrote %s: %d tensors, %d bytes", out, len(entries), size)
    return WriteResult(out, digest, size, len(entries))


def _stream(writer: gguf.GGUFWriter, partial: Path, checkpoint: Checkpoint, arch: ModuleType,
            entries: Sequence[PlannedTensor], imatrix: Mapping[str, np.ndarray] | None, threads: int,
            progress: ProgressFn | None, transform: ValueTransform | None) -> tuple[str, int]:
    """Header, metadata and tensor infos, then each tensor's data; returns (sha256, size)."""
    writer.write_header_to_file(path=partial)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    fout = writer.fout[0]
    fout.flush()
    digest = hashlib.sha256()
    with partial.open("rb") as head:
        digest.update(head.read())
    total, done = sum(e.nbytes for e in entries), 0
    for entry in entries:
        data = tensor_data(checkpoint, arch, entry, imatrix, threads, transform)
        if data.nbytes != entry.nbytes:
            raise QuantError(f"{entry.spec.name}: built {data.nbytes} bytes, plan says {entry.nbytes}")
        # padded as GGUFWriter.write_tensor_data pads, but written through the file object, which
        # raises on a short write: ndarray.tofile ignores a failure to flush its last buffered bytes
        align = writer.data_alignment
        for chunk in (bytes(-fout.tell() % align), memoryview(np.ascontiguousarray(data)).cast("B"),
                      bytes(-data.nbytes % align)):  # fmt: skip
            fout.write(chunk)
            digest.update(chunk)
        del data
        checkpoint.release()
        done += entry.nbytes
        if progress is not None:
            progress("write", done, total)
    size = sync_complete(fout, partial)  # the digest is of the bytes meant to be there
    writer.close()
    return digest.hexdigest(), size
