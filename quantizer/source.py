"""Hugging Face checkpoint reader: config.json plus memory-mapped safetensors shards.

Every header is validated against its file before any tensor is read: header size limit,
offsets in bounds, dtype x shape == byte length, no two tensors overlapping, and the shard
index agreeing with the shards. Tensors are returned as read-only views of the mapping;
BF16 comes back as raw uint16 words (numpy has no bfloat16).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantizer.errors import CheckpointError

logger = logging.getLogger(__name__)

# Bytes per element of every safetensors dtype; only READABLE ones can be converted.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
READABLE: dict[str, type[np.generic]] = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files whose digests go into the output's provenance metadata, besides the shards.
SIDE_FILES = ("config.json", INDEX_NAME, "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json")

ProgressFn = Callable[[str, int, int], None]  # (phase, bytes done, bytes total)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header; returns its tensors by name."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path.name}: truncated (no safetensors header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path.name}: header size {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + header_len > size:
                raise CheckpointError(f"{path.name}: truncated (header of {header_len} bytes, file has {size})")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path.name}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path.name}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: header is not a JSON object")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    entries = {name: _entry(path, name, meta, data_start, data_size)
               for name, meta in header.items() if name != "__metadata__"}
    _check_overlaps(path, entries, data_start)
    return entries


def _entry(path: Path, name: str, meta: Any, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path.name}: tensor {name!r}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise CheckpointError(f"{where}: bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)):
        raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CheckpointError(f"{where}: {end - begin} bytes, but {dtype} x {shape} needs {expected}")
    if end > data_size:
        raise CheckpointError(f"{where}: ends at data byte {end}, past the end of the file "
                              f"({data_size} data bytes; truncated?)")
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, end - begin)


def _check_overlaps(path: Path, entries: dict[str, TensorEntry], data_start: int) -> None:
    spans = sorted((e.start, e.start + e.nbytes, e.name) for e in entries.values() if e.nbytes)
    for (_, prev_end, prev_name), (start, _, name) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            raise CheckpointError(f"{path.name}: tensors {prev_name!r} and {name!r} overlap")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent.name}: missing {path.name}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: not a JSON object")
    return data


def read_weight_map(folder: Path) -> dict[str, str] | None:
    """The shard index's weight map (tensor name -> shard file name), or None where there is no index."""
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        return None
    weight_map = _load_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{INDEX_NAME}: no usable weight_map")
    return weight_map


def _shards(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """Shard files in the reference's reading order, and the index's weight map if any."""
    weight_map = read_weight_map(folder)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        for name in files:
            if Path(name).name != name or not (folder / name).is_file():
                raise CheckpointError(f"{INDEX_NAME}: shard {name!r} is missing")
        return [folder / name for name in files], weight_map
    files = sorted(p for p in folder.glob("model*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"{folder.name}: no {SINGLE_NAME} or {INDEX_NAME}")
    return files, None


@dataclass
class Checkpoint:
    """An opened, validated checkpoint folder."""

    path: Path
    config: dict[str, Any]
    files: tuple[Path, ...]
    entries: dict[str, TensorEntry]
    order: tuple[str, ...]  # shards in name order, tensors sorted by name within each shard
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> set[str]:
        return set(self.entries)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}") from None

    def dtype(self, name: str) -> str:
        return self.entry(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def raw(self, name: str) -> np.ndarray:
        """Read-only view of a tensor: uint16 words for BF16, float16 or float32 otherwise."""
        entry = self.entry(name)
        if entry.dtype not in READABLE:
            raise CheckpointError(f"tensor {name!r} has dtype {entry.dtype}; only BF16, F16 and F32 are supported")
        if entry.file not in self._maps:
            with entry.file.open("rb") as f:
                self._maps[entry.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        count = entry.nbytes // DTYPE_SIZES[entry.dtype]
        data = np.frombuffer(self._maps[entry.file], dtype=READABLE[entry.dtype], count=count, offset=entry.start)
        return data.reshape(entry.shape)

    def release(self, names: Iterable[str] | None = None) -> None:
        """Drop mapped pages (of `names`, default all) from this process; they stay in the page
        cache. The writer calls it after each output tensor, so resident memory tracks the tensor
        being built, not the model."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        if names is None:
            for mapping in self._maps.values():
                mapping.madvise(mmap.MADV_DONTNEED)
            return
        for name in names:
            entry = self.entry(name)
            mapping = self._maps.get(entry.file)
            if mapping is not None and entry.nbytes:
                start = entry.start - entry.start % mmap.PAGESIZE
                mapping.madvise(mmap.MADV_DONTNEED, start, entry.start + entry.nbytes - start)

    def close(self) -> None:
        self._maps.clear()  # each mapping closes when the last array viewing it goes

    def digests(self, progress: ProgressFn | None = None) -> list[tuple[str, str]]:
        """(file name, sha256) of the shards and the side files that exist, for provenance."""
        paths = [*self.files, *(p for p in (self.path / n for n in SIDE_FILES) if p.is_file())]
        total, done, out = sum(p.stat().st_size for p in paths), 0, []
        for path in paths:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress("hash", done, total)
            out.append((path.name, digest.hexdigest()))
        return out


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Open and validate a checkpoint folder; raises CheckpointError with a one-line reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    config = _load_json(folder / "config.json")
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}  # multimodal wrappers, as the reference does
    files, weight_map = _shards(folder)
    entries: dict[str, TensorEntry] = {}
    order: list[str] = []
    for path in files:
        header = read_header(path)
        for name in sorted(header):
            if name in entries:
                raise CheckpointError(f"tensor {name!r} is in both {entries[name].file.name} and {path.name}")
            entries[name] = header[name]
            order.append(name)
    if weight_map is not None:
        _check_index(weight_map, entries)
    logger.info("checkpoint %s: %d tensors in %d file(s)", folder.name, len(entries), len(files))
    return Checkpoint(folder, config, tuple(files), entries, tuple(order))


def _check_index(weight_map: dict[str, str], entries: dict[str, TensorEntry]) -> None:
    for name, file in weight_map.items():
        entry = entries.get(name)
        if entry is None or entry.file.name != file:
            raise CheckpointError(f"{INDEX_NAME} puts {name!r} in {file}, which lacks it (incomplete shard?)")
    unlisted = sorted(set(entries) - set(weight_map))
    if unlisted:
        raise CheckpointError(f"tensor {unlisted[0]!r} in {entries[unlisted[0]].file.name} has no {INDEX_NAME} entry")
