"""`coder-quant inspect FILE.gguf`: what a GGUF holds, by tensor class, and how it was made."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quantizer.inspect import PROVENANCE_PREFIX, GgufSummary, summarize

# Parallel lists the writer records: shown as one "sha256  file" line per source file.
SOURCE_FILES, SOURCE_SHA256 = PROVENANCE_PREFIX + "source.files", PROVENANCE_PREFIX + "source.sha256"


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
    provenance = dict(s.provenance)
    files, hashes = provenance.get(SOURCE_FILES), provenance.get(SOURCE_SHA256)
    paired = isinstance(files, list) and isinstance(hashes, list) and len(files) == len(hashes)
    for key, value in s.provenance:
        if paired and key == SOURCE_SHA256:
            continue
        if paired and key == SOURCE_FILES:
            lines.append(f"  {PROVENANCE_PREFIX}source (sha256, file):")
            lines += [f"    {digest}  {name}" for name, digest in zip(files, hashes, strict=True)]
        elif isinstance(value, list):
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
