"""`coder-quant suggest SRC_DIR --ram-budget SIZE`: measure expert sensitivity, propose a recipe."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from quantizer.commands.eval import format_result, read_text
from quantizer.imatrix_collect import default_calibration_text
from quantizer.suggest import EXPERT_TYPES, SuggestError, Suggestion, parse_size, suggest


def size_argument(text: str) -> int:
    """argparse type for sizes such as 24GiB (quantizer.suggest.parse_size)."""
    try:
        return parse_size(text)
    except SuggestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "suggest",
        help="measure how much each routed-expert group suffers from quantization and propose a recipe",
        description="Build the BF16 GGUF and, for every routed-expert group and candidate type, a GGUF with "
        "only that group quantized (with an importance matrix); measure each one's KL divergence on the "
        "calibration text, then choose the types that fit the budgets with the lowest total. Sizes: "
        "14805408, 12MB (10^6), 12MiB or 12M (2^20).",
    )
    p.add_argument("source", type=Path, metavar="SRC_DIR", help="Hugging Face checkpoint folder")
    p.add_argument("--ram-budget", required=True, type=size_argument, metavar="SIZE",
                   help="system RAM for the weights (everything, without --vram-budget)")
    p.add_argument("--vram-budget", type=size_argument, default=None, metavar="SIZE",
                   help="GPU memory: attention, SSM and shared-expert tensors go there, routed experts stay in RAM")
    p.add_argument("--text", type=Path, default=None, help="calibration text (default: Python stdlib sources)")
    p.add_argument("--imatrix", type=Path, default=None,
                   help="importance matrix to use (default: collect one for the measurements, not kept)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    p.add_argument("--chunks", type=int, default=32, help="chunks scored per measurement (default 32)")
    p.add_argument("--granularity", choices=("kind", "layer"), default="layer",
                   help="one type per expert kind (gate/up/down), or per kind and layer (default)")
    p.add_argument("--types", default=",".join(EXPERT_TYPES),
                   help=f"candidate expert types, comma separated (default {','.join(EXPERT_TYPES)})")
    p.add_argument("--try-equalize", action="store_true",
                   help="also measure the chosen recipe with up/down channel equalization (one more build) "
                   "and propose it when it is lower by more than one standard error")
    p.add_argument("--gptq", type=Path, default=None, metavar="COV.safetensors",
                   help="also measure the chosen recipe with GPTQ rounding (`imatrix --covariance`; IQ4_XS "
                   "experts only) and propose it when it is lower by more than one standard error")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="quantization threads")
    p.set_defaults(handler=run)  # fmt: skip


def imatrix_note(s: Suggestion, ctx: int, text: Path | None) -> list[str]:
    """Where the build's --imatrix comes from: the caller's file, or how to remake the one suggest
    collected (on the BF16 build, over the same text and --ctx) and deleted with its scratch folder."""
    if s.imatrix is not None:
        return []
    text_flag = f" --text {shlex.quote(str(text))}" if text is not None else ""
    return ["", "IMATRIX.gguf: the measurements used an importance matrix suggest collected and did not keep; "
            "make one the same way with `coder-quant build SRC_DIR BF16.gguf --recipe bf16` and "
            f"`coder-quant imatrix BF16.gguf -o IMATRIX.gguf --ctx {ctx}{text_flag}`, "
            "or collect one first and pass it to suggest with --imatrix"]


def render(s: Suggestion, ctx: int = 512, text: Path | None = None) -> str:
    """Budgets, the measured sensitivity table with the choice marked, prediction and measurement.

    `ctx` and `text` are suggest's, to tell how to remake the importance matrix it collected."""
    chosen = dict(s.allocation.choice)
    types = list(dict.fromkeys(o.type for o in s.options))
    kld = {(o.group, o.type): o.kld for o in s.options}
    lines = [
        f"RAM: {s.split.fixed_ram:,} bytes for the header and tensors kept in RAM, "
        f"{s.split.expert_budget:,} left for routed experts",
    ]
    if s.split.fixed_gpu:
        lines.append(f"GPU: {s.split.fixed_gpu:,} bytes (attention, SSM, shared experts, output)")
    lines += ["", "mean KLD with only that group quantized (* = chosen):"]
    lines.append(f"  {'group':<24}" + "".join(f"{t:>11}" for t in types))
    for group in chosen:
        cells = [f"{kld[(group, t)]:.6f}" + ("*" if chosen[group] == t else " ") for t in types]
        lines.append(f"  {group:<24}" + "".join(f"{c:>11}" for c in cells))
    lines += [
        "",
        f"why: of all combinations that fit {s.split.expert_budget:,} bytes, this one has the lowest sum "
        f"of the groups' KLDs ({s.allocation.predicted_kld:.6f}, {s.allocation.expert_bytes:,} bytes)",
    ]
    if s.uniform is not None:
        lines.append(f"     the best single type that fits, {s.uniform[0]}, sums to {s.uniform[1]:.6f}")
    if s.gptq_pair is not None:
        with_gptq, without = s.gptq_pair
        verdict = "lower by more than one standard error: proposed" if s.gptq else "not clearly lower: not proposed"
        lines.append(f"     with GPTQ rounding (--gptq) mean KLD {with_gptq.kld_mean:.6f}, without "
                     f"{without.kld_mean:.6f}: {verdict}")
    if s.other is not None:
        with_eq, without = (s.measured, s.other) if s.equalize else (s.other, s.measured)
        verdict = "lower by more than one standard error: proposed" if s.equalize else "not clearly lower: not proposed"
        on_top = " on top of --gptq" if s.gptq else ""
        lines.append(f"     with up/down equalization (--equalize{on_top}) mean KLD {with_eq.kld_mean:.6f}, without "
                     f"{without.kld_mean:.6f}: {verdict}")
    extra = [flag for flag, on in (("--equalize", s.equalize), ("--gptq COV.safetensors", s.gptq)) if on]
    lines += ["", "measured on the calibration text" + (f" (with {' '.join(extra)}):" if extra else ":"),
              format_result(s.measured)]
    rules = " ".join(f"--rule '{r}'" for r in s.rules)
    flags = " ".join([f"--imatrix {shlex.quote(str(s.imatrix)) if s.imatrix else 'IMATRIX.gguf'}", *extra])
    lines += imatrix_note(s, ctx, text)
    lines += ["", f"build: coder-quant build SRC_DIR OUT.gguf --recipe bf16 {flags} {rules}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.text is not None:
        text = read_text(args.text)
    else:
        text, _ = default_calibration_text()
    logging.getLogger("gguf").setLevel(logging.WARNING)
    for name in ("quantizer.build", "quantizer.writer", "quantizer.evaluate", "quantizer.source"):
        logging.getLogger(name).setLevel(logging.WARNING)
    result = suggest(
        args.source,
        args.ram_budget,
        text,
        vram_budget=args.vram_budget,
        ctx=args.ctx,
        chunks=args.chunks,
        granularity=args.granularity,
        types=[t.strip().lower() for t in args.types.split(",") if t.strip()],
        imatrix=args.imatrix,
        threads=args.threads,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        try_equalize=args.try_equalize,
        gptq=args.gptq,
    )
    print(render(result, args.ctx, args.text))
    return 0
