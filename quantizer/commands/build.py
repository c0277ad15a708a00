"""`coder-quant build SRC_DIR OUT.gguf`: convert a checkpoint and quantize its routed experts in one pass."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from quantizer.build import build_gguf
from quantizer.gptq import SHRINK
from quantizer.recipes import DEFAULT_RECIPE, PRESETS
from quantizer.writer import check_output_path

PHASE_LABELS = {"hash": "hashing source", "write": "writing GGUF"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build",
        help="convert a Hugging Face checkpoint to GGUF, quantizing only what the recipe says",
        description="Convert SRC_DIR (config.json, safetensors, tokenizer) to OUT.gguf in one pass. "
        "Tensors the recipe keeps are written exactly as llama.cpp's convert_hf_to_gguf.py --outtype bf16 "
        "writes them; the others are quantized with llama.cpp's own code.",
    )
    p.add_argument("source", type=Path, metavar="SRC_DIR", help="Hugging Face checkpoint folder")
    p.add_argument("out", type=Path, metavar="OUT.gguf", help="output file")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, metavar="NAME",
                   help=f"precision preset: {', '.join(PRESETS)} (default {DEFAULT_RECIPE})")
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=TYPE",
                   help="extra rule placed before the preset's (first match wins); repeatable")
    p.add_argument("--imatrix", type=Path, default=None, metavar="FILE",
                   help="importance matrix (llama-imatrix GGUF or legacy .dat)")
    p.add_argument("--equalize", action="store_true",
                   help="rescale routed up/down channels by activation statistics before quantizing "
                   "(AWQ-style, function-preserving; needs --imatrix)")
    p.add_argument("--gptq", type=Path, default=None, metavar="COV.safetensors",
                   help="round routed IQ4_XS experts by GPTQ with these input covariances "
                   "(`coder-quant imatrix --covariance`); llama.cpp still writes the bytes")
    p.add_argument("--gptq-shrink", type=float, default=SHRINK, metavar="K",
                   help=f"weight, in tokens, of the layer-wide covariance blended into each expert's "
                   f"(default {SHRINK:g}; 0: each expert's own)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="quantization threads (default: all CPU cores)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.set_defaults(handler=run)


class _Bars:
    """One tqdm bar per phase, created when the phase first reports."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(phase)
        if bar is None:
            self.close()  # the previous phase is over
            bar = tqdm(desc=PHASE_LABELS.get(phase, phase), total=total, unit="B", unit_scale=True,
                       unit_divisor=1024, file=sys.stderr, dynamic_ncols=True)
            self.bars[phase] = bar
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _check_output(source: Path, out: Path) -> None:
    """Refuse a missing output folder or a directory as output now, not after hashing every source
    shard (minutes on a large checkpoint)."""
    if out.is_dir() and source.is_dir() and os.path.samefile(out, source):
        return  # build_gguf refuses this before hashing too, saying that it is the source
    check_output_path(out)


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        print("coder-quant: error: --threads must be at least 1", file=sys.stderr)
        return 2
    _check_output(args.source, args.out)
    # gguf-py's writer logs its own file plan at INFO; only its warnings matter here
    logging.getLogger("gguf").setLevel(logging.WARNING)
    if args.quiet:
        logging.getLogger().setLevel(logging.WARNING)
    bars = _Bars(enabled=not args.quiet)
    try:
        result = build_gguf(args.source, args.out, recipe=args.recipe, rules=args.rule, imatrix=args.imatrix,
                            threads=args.threads, force=args.force, progress=bars, equalize=args.equalize,
                            gptq=args.gptq, gptq_shrink=args.gptq_shrink)
    finally:
        bars.close()
    if not args.quiet:
        written = result.written
        print(f"{written.path}: {written.nbytes:,} bytes, {written.tensors} tensors, recipe {result.plan.recipe}")
        print(f"sha256 {written.sha256}")
    return 0
