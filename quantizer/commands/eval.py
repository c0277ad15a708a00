"""`coder-quant eval BASE QUANT --text FILE`: KL divergence, perplexity and top-1 agreement."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from quantizer.errors import QuantError
from quantizer.evaluate import EvalResult, evaluate
from quantizer.llama_session import MAX_CTX


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="compare a quantized GGUF with its base (KLD, PPL, top-1), as llama-perplexity does",
        description="Run both models over the text in chunks of --ctx tokens and score the second half "
        "of each chunk, as llama-perplexity --kl-divergence does.",
    )
    p.add_argument("base", type=Path, help="reference GGUF (usually the BF16 build)")
    p.add_argument("quant", type=Path, help="GGUF to evaluate")
    p.add_argument("--text", type=Path, required=True, help="evaluation text (UTF-8)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (512: llama-perplexity's default; "
                   f"at most the models' trained context and {MAX_CTX})")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most this many chunks (default: all)")
    p.add_argument(
        "--base-logits",
        type=Path,
        default=None,
        metavar="CACHE",
        help="file of the base model's distributions: read if present (and matching), else written "
        "(its folder must exist)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(handler=run)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantError(f"cannot read text {path}: {exc}") from None


def format_result(r: EvalResult) -> str:
    rows = [
        ("chunks x scored tokens", f"{r.chunks} x {r.tokens // max(r.chunks, 1)} = {r.tokens} (ctx {r.ctx})"),
        ("Mean PPL(base)", f"{r.ppl_base:10.6f} ± {r.ppl_base_unc:.6f}"),
        ("Mean PPL(Q)", f"{r.ppl_quant:10.6f} ± {r.ppl_quant_unc:.6f}"),
        ("Mean PPL(Q)/PPL(base)", f"{r.ppl_ratio:10.6f} ± {r.ppl_ratio_unc:.6f}"),
        ("Mean    KLD", f"{r.kld_mean:10.6f} ± {r.kld_mean_unc:.6f}"),
        ("Maximum KLD", f"{r.kld_max:10.6f}"),
        ("99.9%   KLD", f"{r.kld_p999:10.6f}"),
        ("99.0%   KLD", f"{r.kld_p99:10.6f}"),
        ("Median  KLD", f"{r.kld_median:10.6f}"),
        ("Same top p", f"{r.top1:6.3f} ± {r.top1_unc:.3f} %"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}} : {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    result = evaluate(
        args.base,
        args.quant,
        read_text(args.text),
        ctx=args.ctx,
        base_logits=args.base_logits,
        max_chunks=args.chunks,
    )
    if args.json:
        json.dump(result.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_result(result))
    return 0
