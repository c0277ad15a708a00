"""`coder-quant verify SRC_DIR OUT.gguf`: prove preserved tensors bit-identical, measure quantized ones,
check each stored type against the recorded recipe and the hyper-parameters against config.json."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from tqdm import tqdm

from quantizer.build import checkpoint_specs
from quantizer.source import open_checkpoint
from quantizer.verify import VerifyReport, verify_gguf


def rms_bound(text: str) -> float:
    """argparse type for --max-rms: a finite number above 0 (a NaN bound fails every quantized tensor)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check a GGUF against its source checkpoint, tensor by tensor",
        description="Re-read SRC_DIR and OUT.gguf. Tensors in their reference type must be bit-identical "
        "to what the source gives; quantized tensors report their relative RMS error, which must stay under "
        "a bound for their type (also per expert), and must not be all zeros; every tensor must be stored in "
        "the type the recorded recipe plans for it (without one, attention, SSM and shared-expert tensors "
        "in their reference type); the hyper-parameters must match config.json; the sha256 sidecar, if "
        "present, must match. Exits 1 naming the first metadata key or tensor that fails.",
    )
    p.add_argument("source", type=Path, metavar="SRC_DIR", help="Hugging Face checkpoint folder")
    p.add_argument("gguf", type=Path, metavar="OUT.gguf", help="GGUF built from it")
    p.add_argument("--max-rms", type=rms_bound, default=None, metavar="X",
                   help="fail a quantized tensor whose relative RMS error exceeds X, whatever its type "
                   "(default: a bound per type, about 2.5x the error llama.cpp's quantizer gives)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table; only the verdict")
    p.set_defaults(handler=run)


def format_table(report: VerifyReport) -> str:
    width = max((len(c.name) for c in report.checks), default=4)
    lines = [f"{'tensor':<{width}}  {'class':<13}  {'type':<8}  {'status':<9}  rel. RMS"]
    for c in report.checks:
        rms = "-" if c.status in ("identical", "converted") else f"{c.relative_rms:.4g}"
        lines.append(f"{c.name:<{width}}  {c.tclass:<13}  {c.type:<8}  {c.status:<9}  {rms}")
        if c.status == "mismatch":
            lines.append(f"    {c.detail}")
    return "\n".join(lines)


def format_metadata_failures(report: VerifyReport) -> str:
    """One line per metadata key that does not match: every one, not only the first."""
    return "\n".join(f"metadata {m.key}: {m.detail}" for m in report.metadata_failures)


def summary(report: VerifyReport) -> str:
    counts: dict[str, int] = {}
    for c in report.checks:
        counts[c.status] = counts.get(c.status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    quantized = [c.relative_rms for c in report.checks if c.status == "quantized"]
    worst = f"; worst quantized relative RMS {max(quantized):.4g}" if quantized else ""
    types = f"types as recipe {report.recipe} plans" if report.recipe else "no recipe recorded"
    bad = len(report.metadata_failures)
    keys = f"{len(report.metadata)} metadata keys" + (f" ({bad} differ)" if bad else " match")
    return (f"{report.path}: {len(report.checks)} tensors: {parts}{worst}; {types}; {keys}; "
            f"sha256 sidecar {report.sidecar}")


def check_source(source: Path) -> None:
    """Read the checkpoint's config.json and tensor names first: verify_gguf hashes the whole GGUF
    (minutes for a large one) before it reads the source, and a config that cannot work is refused."""
    checkpoint = open_checkpoint(source)
    try:
        checkpoint_specs(checkpoint)
    finally:
        checkpoint.close()


def run(args: argparse.Namespace) -> int:
    check_source(args.source)
    if args.quiet:
        logging.getLogger().setLevel(logging.WARNING)
    bar: tqdm | None = None

    def progress(phase: str, done: int, total: int) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            bar = tqdm(desc="verifying", total=total, unit="tensor", file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        report = verify_gguf(args.source, args.gguf, max_relative_rms=args.max_rms, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print(format_table(report))
    if report.metadata_failures:
        print(format_metadata_failures(report))
    print(summary(report))
    report.raise_for_failures()
    return 0
