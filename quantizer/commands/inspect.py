"""`coder-quant inspect FILE.gguf`: what a GGUF holds, by tensor class, and how it was made."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quantizer.inspect import GgufSummary, summarize


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="tensor types and bytes by class, and the provenance a build recorded",
        description="Summarise FILE.gguf: bytes and types per tensor class (attention, ssm, shared_expert, "
        "routed_expert, embedding, output, norm, router), totals, and the coder_quant.* provenance keys.",
    )
    p.add_argument("gguf", type=Path, metavar="FILE.gguf", help="GGUF file")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.add_argument("--tensors", action="store_true", help="also list every tensor, grouped by class")
    p.set_defaults(handler=run)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def format_summary(s: GgufSummary, tensors: bool) -> str:
    total = max(s.tensor_bytes, 1)
    lines = [f"{s.path}: {s.architecture or 'unknown architecture'}, {len(s.tensors)} tensors, "
             f"{s.file_bytes:,} bytes on disk", ""]
    lines.append(f"{'class':<14} {'tensors':>7} {'bytes':>14} {'share':>6}  types")
    for c in s.classes:
        types = ", ".join(f"{t} {_size(n)}" for t, n in c.by_type)
        lines.append(f"{c.tclass:<14} {c.n_tensors:>7} {c.nbytes:>14,} {100 * c.nbytes / total:>5.1f}%  {types}")
    lines.append(f"{'total':<14} {len(s.tensors):>7} {s.tensor_bytes:>14,} {100.0:>5.1f}%")
    if tensors:
        width = max(len(t.name) for t in s.tensors)
        for c in s.classes:
            lines += ["", f"[{c.tclass}]"]
            for t in s.tensors:
                if (t.tclass or "other") == c.tclass:
                    shape = "x".join(str(n) for n in t.shape)
                    lines.append(f"  {t.name:<{width}}  {t.ggml_type:<8} {shape:<18} {t.nbytes:>14,}")
    lines += ["", "provenance:" if s.provenance else "provenance: none (not written by coder-quant)"]
    for key, value in s.provenance:
        if isinstance(value, list):
            lines.append(f"  {key}:")
            lines += [f"    {item}" for item in value]
        else:
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    summary = summarize(args.gguf)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2, ensure_ascii=False))
    else:
        print(format_summary(summary, args.tensors))
    return 0
