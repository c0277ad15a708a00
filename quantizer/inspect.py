"""Read a GGUF back: tensors grouped by class, byte totals, provenance, and a content digest.

`summarize` answers "what is in this file" (the `inspect` command); `digest` reduces a file to
hashes of every tensor's bytes and every metadata value, so two files built by different tools can
be compared key by key without keeping either of them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from quantizer.errors import QuantError
from quantizer.spec import TENSOR_CLASSES, TensorClass

# Metadata keys our writer records about how a file was made (recipe, imatrix, sources, version).
PROVENANCE_PREFIX = "coder_quant."

# GGUF tensor name -> class, first match wins. Names follow llama.cpp's qwen3next tensor map
# (gguf-py's MODEL_TENSOR names); the block prefix "blk.N." is stripped before matching.
CLASS_RULES: tuple[tuple[str, TensorClass], ...] = (
    (r"^token_embd\.", "embedding"),
    (r"^output\.", "output"),
    (r"^ffn_(gate|up|down|gate_up)_exps\.", "routed_expert"),
    (r"^ffn_gate_inp\.", "router"),
    (r"^ffn_(gate|up|down)_shexp\.|^ffn_gate_inp_shexp\.", "shared_expert"),
    (r"^ssm_", "ssm"),
    (r"^attn_(qkv|gate)\.", "ssm"),  # Gated DeltaNet in_proj_qkvz halves; full attention uses attn_q/k/v
    (r"^attn_(q|k|v|output)\.", "attention"),
    (r"norm\.", "norm"),
)

# Arrays longer than this and strings longer than LONG_STRING are digested as sha256 + length.
BIG_ARRAY = 64
LONG_STRING = 512

# Header pseudo-fields gguf-py's reader lists among the key/value pairs.
HEADER_FIELDS = frozenset({"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as stored: shape in GGUF order (ne0 first, as llama.cpp prints it)."""

    name: str
    tclass: TensorClass | None  # None: a name no rule knows
    ggml_type: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class ClassTotal:
    tclass: str
    n_tensors: int
    nbytes: int
    by_type: tuple[tuple[str, int], ...]  # (ggml type, bytes), largest first


@dataclass(frozen=True)
class GgufSummary:
    path: Path
    file_bytes: int
    architecture: str | None
    tensors: tuple[TensorEntry, ...]
    classes: tuple[ClassTotal, ...]
    provenance: tuple[tuple[str, Any], ...]  # coder_quant.* keys, as stored

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "file_bytes": self.file_bytes,
            "tensor_bytes": self.tensor_bytes,
            "architecture": self.architecture,
            "classes": [
                {"class": c.tclass, "tensors": c.n_tensors, "bytes": c.nbytes, "by_type": dict(c.by_type)}
                for c in self.classes
            ],
            "tensors": [
                {"name": t.name, "class": t.tclass, "type": t.ggml_type, "shape": list(t.shape),
                 "bytes": t.nbytes}
                for t in self.tensors
            ],
            "provenance": dict(self.provenance),
        }


def classify(name: str) -> TensorClass | None:
    """Class of a GGUF tensor name, by the first matching rule of CLASS_RULES."""
    local = re.sub(r"^blk\.\d+\.", "", name)
    for pattern, tclass in CLASS_RULES:
        if re.search(pattern, local):
            return tclass
    return None


def open_gguf(path: Path) -> GGUFReader:
    """Open a GGUF for reading, turning a malformed file into one clear error."""
    if not Path(path).is_file():
        raise QuantError(f"{path}: no such file")
    try:
        return GGUFReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise QuantError(f"{path}: not a readable GGUF file ({exc})") from exc


def field_value(field: ReaderField) -> Any:
    """A metadata value as plain Python (str, int, float, bool or list of them)."""
    value = field.contents()
    if isinstance(value, np.generic):
        return value.item()
    return value


def field_type(field: ReaderField) -> str:
    """GGUF value type, e.g. "UINT32" or "ARRAY[STRING]"."""
    names = [GGUFValueType(t).name for t in field.types]
    if names[0] == "ARRAY":
        return f"ARRAY[{names[1] if len(names) > 1 else '?'}]"
    return names[0]


def tensor_entries(reader: GGUFReader) -> tuple[TensorEntry, ...]:
    return tuple(
        TensorEntry(
            name=t.name,
            tclass=classify(t.name),
            ggml_type=t.tensor_type.name,
            shape=tuple(int(n) for n in t.shape),
            nbytes=int(t.n_bytes),
        )
        for t in reader.tensors
    )


def class_totals(tensors: tuple[TensorEntry, ...]) -> tuple[ClassTotal, ...]:
    totals = []
    for tclass in (*TENSOR_CLASSES, None):
        members = [t for t in tensors if t.tclass == tclass]
        if not members:
            continue
        by_type: dict[str, int] = {}
        for t in members:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.nbytes
        totals.append(
            ClassTotal(
                tclass=tclass or "other",
                n_tensors=len(members),
                nbytes=sum(t.nbytes for t in members),
                by_type=tuple(sorted(by_type.items(), key=lambda kv: -kv[1])),
            )
        )
    return tuple(totals)


def summarize(path: Path) -> GgufSummary:
    """Tensors, per-class byte totals and provenance of the GGUF at `path`."""
    path = Path(path)
    reader = open_gguf(path)
    arch_field = reader.fields.get("general.architecture")
    tensors = tensor_entries(reader)
    provenance = tuple(
        (name, field_value(field)) for name, field in reader.fields.items() if name.startswith(PROVENANCE_PREFIX)
    )
    return GgufSummary(
        path=path,
        file_bytes=path.stat().st_size,
        architecture=field_value(arch_field) if arch_field is not None else None,
        tensors=tensors,
        classes=class_totals(tensors),
        provenance=provenance,
    )


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def digest_value(field: ReaderField) -> dict[str, Any]:
    """{type, value} for small values; {type, sha256, length} for big arrays and long strings.

    Arrays hash their compact JSON form (UTF-8, no spaces); strings hash their UTF-8 bytes, and
    `length` counts array elements or string bytes.
    """
    ftype = field_type(field)
    value = field_value(field)
    if isinstance(value, list) and len(value) > BIG_ARRAY:
        return {"type": ftype, "sha256": _hash_json(value), "length": len(value)}
    if isinstance(value, str) and len(value.encode()) > LONG_STRING:
        raw = value.encode()
        return {"type": ftype, "sha256": hashlib.sha256(raw).hexdigest(), "length": len(raw)}
    return {"type": ftype, "value": value}


def digest(path: Path) -> dict[str, Any]:
    """Every tensor (name, type, GGUF-order shape, sha256 of its bytes) and every metadata key."""
    reader = open_gguf(Path(path))
    tensors = []
    for t in reader.tensors:
        start = int(t.data_offset)
        data = reader.data[start : start + int(t.n_bytes)]
        tensors.append(
            {
                "name": t.name,
                "type": t.tensor_type.name,
                "shape": [int(n) for n in t.shape],
                "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            }
        )
    metadata = {
        name: digest_value(field) for name, field in reader.fields.items() if name not in HEADER_FIELDS
    }
    return {
        "gguf_version": field_value(reader.fields["GGUF.version"]),
        "alignment": int(reader.alignment),
        "tensors": tensors,
        "metadata": metadata,
    }
