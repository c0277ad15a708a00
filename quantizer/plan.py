"""The plan: one frozen record per output tensor, from names, shapes and dtypes only.

`make_plan` applies a recipe's rules (first match wins), then the shape-fallback table, and
prices every tensor in bytes. It reads nothing and touches no weights; the writer carries it out.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from gguf import GGUF_DEFAULT_ALIGNMENT

from quantizer import ggml
from quantizer.errors import RecipeError
from quantizer.recipes import CLASS_PREFIX, FINAL_FALLBACK, KEEP, PROTECTED, SHAPE_FALLBACK, Recipe
from quantizer.spec import TENSOR_CLASSES, TensorClass, TensorSpec

Placement = Literal["gpu", "ram"]
# Tensor classes that stay in system RAM under `--gpu-layers attn` (as llama.cpp places them).
RAM_CLASSES = frozenset({"routed_expert", "embedding"})

# Header size estimate. Tensor infos are counted exactly; the key/value metadata is dominated by
# the tokenizer (token strings, token types, BPE merges: about 38 bytes per vocabulary entry for
# Qwen's byte-level BPE) plus hyperparameters and the chat template.
GGUF_FIXED_HEADER = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
METADATA_BYTES_PER_TOKEN = 38
METADATA_BASE_BYTES = 16 * 1024


@dataclass(frozen=True)
class PlanEntry:
    spec: TensorSpec
    type: str  # llama.cpp type name the tensor is written in
    nbytes: int  # tensor data bytes, before GGUF alignment padding
    rule: str  # label of the rule that chose the type
    fallback: str | None = None  # why the type differs from the rule's, e.g. a shape fallback

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def params(self) -> int:
        return math.prod(self.spec.shape)

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        """GGUF's ne: numpy shape reversed, row length first."""
        return tuple(reversed(self.spec.shape))

    @property
    def placement(self) -> Placement:
        """Where `--gpu-layers attn` puts it: routed experts stay in system RAM, and so does token_embd,
        which llama.cpp keeps on the CPU whatever -ngl says (its rows are gathered, not multiplied;
        src/llama-model.cpp, the input layer). server/placement.py places it the same way."""
        return "ram" if self.spec.tclass in RAM_CLASSES else "gpu"


@dataclass(frozen=True)
class ClassTotal:
    tclass: TensorClass
    tensors: int
    params: int
    nbytes: int


def _padded(n: int) -> int:
    return n + (-n % GGUF_DEFAULT_ALIGNMENT)


def _tensor_info_bytes(entry: PlanEntry) -> int:
    # name (u64 length + bytes), n_dims u32, ne i64 each, type i32, offset u64
    return 8 + len(entry.name.encode()) + 4 + 8 * len(entry.spec.shape) + 4 + 8


@dataclass(frozen=True)
class Plan:
    recipe: str
    entries: tuple[PlanEntry, ...]
    metadata_bytes: int  # estimated key/value metadata

    @property
    def params(self) -> int:
        return sum(e.params for e in self.entries)

    @property
    def tensor_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def header_bytes(self) -> int:
        """Estimated: fixed header + metadata + exact tensor infos, padded to the alignment."""
        infos = sum(_tensor_info_bytes(e) for e in self.entries)
        return _padded(GGUF_FIXED_HEADER + self.metadata_bytes + infos)

    @property
    def file_bytes(self) -> int:
        """Estimated GGUF size: header + tensor data, each tensor padded to 32 bytes."""
        return self.header_bytes + sum(_padded(e.nbytes) for e in self.entries)

    def placement_bytes(self, where: Placement) -> int:
        return sum(e.nbytes for e in self.entries if e.placement == where)

    @property
    def gpu_bytes(self) -> int:
        return self.placement_bytes("gpu")

    @property
    def ram_bytes(self) -> int:
        return self.placement_bytes("ram")

    def class_totals(self) -> tuple[ClassTotal, ...]:
        totals = []
        for tclass in TENSOR_CLASSES:
            members = [e for e in self.entries if e.spec.tclass == tclass]
            if members:
                totals.append(
                    ClassTotal(tclass, len(members), sum(e.params for e in members), sum(e.nbytes for e in members))
                )
        return tuple(totals)

    def fallbacks(self) -> tuple[PlanEntry, ...]:
        return tuple(e for e in self.entries if e.fallback)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "tensors": [
                {
                    "name": e.name,
                    "sources": list(e.spec.sources),
                    "shape": list(e.gguf_shape),
                    "class": e.spec.tclass,
                    "base_type": e.spec.base_type,
                    "type": e.type,
                    "bytes": e.nbytes,
                    "params": e.params,
                    "rule": e.rule,
                    "fallback": e.fallback,
                    "placement": e.placement,
                }
                for e in self.entries
            ],
            "totals": {t.tclass: {"tensors": t.tensors, "params": t.params, "bytes": t.nbytes} for t in self.class_totals()},
            "params": self.params,
            "tensor_bytes": self.tensor_bytes,
            "header_bytes_estimate": self.header_bytes,
            "file_bytes_estimate": self.file_bytes,
            "placement": {"gpu_layers": "attn", "gpu_bytes": self.gpu_bytes, "ram_bytes": self.ram_bytes},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _protected_reason(spec: TensorSpec) -> str | None:
    if len(spec.shape) < 2:
        return "1-D tensors are never quantized"
    for pattern, reason in PROTECTED:
        if pattern.startswith(CLASS_PREFIX):
            if spec.tclass == pattern[len(CLASS_PREFIX) :]:
                return reason
        elif re.search(pattern, spec.name):
            return reason
    return None


def resolve_type(spec: TensorSpec, wanted: str) -> tuple[str, str | None]:
    """The type the tensor can take given its shape, and a note when it is not `wanted`."""
    if wanted == spec.base_type:
        return wanted, None
    reason = _protected_reason(spec)
    if reason:
        return spec.base_type, f"{wanted} -> {spec.base_type}: {reason}"
    cols = spec.shape[-1]
    if cols % ggml.block_size(wanted) == 0:
        return wanted, None
    why = f"{cols} columns not a multiple of {ggml.block_size(wanted)}"
    fallback = SHAPE_FALLBACK.get(wanted)
    if fallback is None and ggml.block_size(wanted) > 32:
        raise RecipeError(f"{spec.name}: no shape fallback is defined for {wanted} ({why})")
    if fallback is not None:
        if cols % ggml.block_size(fallback) == 0:
            return fallback, f"{wanted} -> {fallback}: {why}"
        why += f", nor of {ggml.block_size(fallback)} for {fallback}"
    final = spec.base_type if FINAL_FALLBACK == KEEP else FINAL_FALLBACK
    return final, f"{wanted} -> {final}: {why}"


def make_plan(specs: Iterable[TensorSpec], recipe: Recipe, metadata_bytes: int | None = None) -> Plan:
    """Choose and price a type for every tensor. `metadata_bytes` defaults to an estimate from the vocabulary."""
    entries = []
    for spec in specs:
        rule = recipe.choose(spec)
        qtype, note = resolve_type(spec, rule.type_for(spec))
        rows = math.prod(spec.shape[:-1])
        entries.append(PlanEntry(spec, qtype, rows * ggml.row_size(qtype, spec.shape[-1]), rule.label, note))
    if metadata_bytes is None:
        vocab = next((e.spec.shape[0] for e in entries if e.spec.tclass == "embedding"), 0)
        metadata_bytes = METADATA_BASE_BYTES + METADATA_BYTES_PER_TOKEN * vocab
    return Plan(recipe.name, tuple(entries), metadata_bytes)


# ---- text rendering (the CLI prints this) ----


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _sources(spec: TensorSpec) -> str:
    if len(spec.sources) <= 1:
        return spec.sources[0] if spec.sources else "-"
    return f"{spec.sources[0]} (+{len(spec.sources) - 1})"


def render_text(plan: Plan, per_tensor: bool = True) -> str:
    """Per-tensor table, totals by class, file size and the `--gpu-layers attn` split."""
    lines = [f"recipe: {plan.recipe}", ""]
    if per_tensor:
        rows = [("GGUF tensor", "source", "type", "bytes", "rule")]
        for e in plan.entries:
            rule = e.rule + (f" [{e.fallback}]" if e.fallback else "")
            rows.append((e.name, _sources(e.spec), e.type, f"{e.nbytes:,}", rule))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}")
        lines.append("")
    lines.append(f"{'class':<14} {'tensors':>7} {'params':>16} {'bytes':>16}  {'bits/param':>10}")
    for t in plan.class_totals():
        bpw = 8 * t.nbytes / t.params if t.params else 0.0
        lines.append(f"{t.tclass:<14} {t.tensors:>7} {t.params:>16,} {t.nbytes:>16,}  {bpw:>10.3f}")
    lines.append(f"{'total':<14} {len(plan.entries):>7} {plan.params:>16,} {plan.tensor_bytes:>16,}")
    lines.append("")
    lines.append(f"file size (estimate): {plan.file_bytes:,} bytes ({_fmt_bytes(plan.file_bytes)})")
    lines.append(
        f"--gpu-layers attn: GPU {plan.gpu_bytes:,} bytes ({_fmt_bytes(plan.gpu_bytes)}), "
        f"RAM {plan.ram_bytes:,} bytes ({_fmt_bytes(plan.ram_bytes)}) of routed experts and token_embd"
    )
    if plan.fallbacks():
        lines.append(f"{len(plan.fallbacks())} tensor(s) use a fallback type (see the rule column)")
    return "\n".join(lines)
