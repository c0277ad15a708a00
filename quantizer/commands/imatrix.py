"""`coder-quant imatrix MODEL.gguf -o OUT.gguf`: importance matrix in llama-imatrix's GGUF format."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from quantizer.commands.eval import read_text
from quantizer.commands.suggest import size_argument
from quantizer.covariance import DEFAULT_LIMIT, CovarianceCollector, stage_covariances
from quantizer.errors import QuantError
from quantizer.imatrix import publish, stage_imatrix_gguf
from quantizer.imatrix_collect import collect_imatrix, default_calibration_text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "imatrix",
        help="collect an importance matrix (llama-imatrix's GGUF format) by running a GGUF over a text",
        description="Run MODEL over the text in chunks of --ctx tokens and record, for every weight "
        "matrix (per expert for stacked experts), the sum of squared inputs per column, as llama-imatrix "
        "does. Without --text, a fixed set of Python standard-library sources is the calibration text.",
    )
    p.add_argument("model", type=Path, metavar="MODEL.gguf", help="model to run (usually the BF16 build)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.gguf", help="imatrix file to write")
    p.add_argument("--text", type=Path, default=None, help="calibration text (default: Python stdlib sources)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (512: llama-imatrix's default)")
    p.add_argument("--chunks", type=int, default=None, help="process at most this many chunks (default: all)")
    p.add_argument("--process-output", action="store_true", help="also collect output.weight, as llama-imatrix")
    p.add_argument("--covariance", type=Path, default=None, metavar="COV.safetensors",
                   help="also write each routed expert's input covariance, for `build --gptq` (needs RAM: "
                   "n_layer x n_expert x (n_embd^2 + n_ff^2) x 8 bytes while collecting)")
    p.add_argument("--covariance-limit", type=size_argument, default=DEFAULT_LIMIT, metavar="SIZE",
                   help="stop with an error if the covariances would need more memory than this (default 8GiB)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    p.set_defaults(handler=run)


def check_output(out: Path, force: bool) -> None:
    """Refuse an output that could not be written, before the collection spends minutes or hours."""
    if out.exists() and not force:
        raise QuantError(f"{out} exists (use --force to overwrite)")
    if out.is_dir():
        raise QuantError(f"{out} is a directory")
    folder = out.parent
    if not folder.is_dir():
        raise QuantError(f"{out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise QuantError(f"{out}: folder {folder} is not writable")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path (existing or not), or one file by two names."""
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: samefile below says what it can
        pass
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_distinct(model: Path, output: Path, covariance: Path | None) -> None:
    """Refuse outputs that would replace the model or each other, even with --force: the rename
    at the end would leave the model or the importance matrix gone."""
    for out, flag in ((output, "-o"), (covariance, "--covariance")):
        if out is not None and _same_file(out, model):
            raise QuantError(f"{flag} {out} is the model file {model}; choose another output path")
    if covariance is not None and _same_file(output, covariance):
        raise QuantError(f"--covariance {covariance} and -o {output} are the same file; choose two paths")


def run(args: argparse.Namespace) -> int:
    check_distinct(args.model, args.output, args.covariance)
    for out in (args.output, args.covariance):
        if out is not None:
            check_output(out, args.force)
    if args.text is not None:
        text, dataset = read_text(args.text), str(args.text)
    else:
        text, dataset = default_calibration_text()
    # delay: input refused in the first moments (a text too short for --ctx) shows its line, not an empty bar
    with tqdm(desc="imatrix", unit="chunk", file=sys.stderr, dynamic_ncols=True, delay=0.5) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        collector = None
        if args.covariance is not None:
            collector = CovarianceCollector(chunk_size=args.ctx, process_output=args.process_output,
                                            limit=args.covariance_limit)
        stats = collect_imatrix(
            args.model, text, ctx=args.ctx, max_chunks=args.chunks, process_output=args.process_output,
            progress=progress, collector=collector,
        )  # fmt: skip
    # both files are written in full before either is published, so a failure leaves neither
    staged: list[tuple[Path, Path]] = []
    try:
        staged.append((stage_imatrix_gguf(args.output, stats.sums, stats.counts, [dataset], stats.chunk_count,
                                          stats.chunk_size), args.output))
        if collector is not None and args.covariance is not None:
            staged.append((stage_covariances(args.covariance, collector, dataset, stats.chunk_count),
                           args.covariance))
        publish(staged)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    print(f"{args.output}: {len(stats.sums)} matrices, {stats.chunk_count} chunks of {stats.chunk_size} tokens")
    if collector is not None and args.covariance is not None:
        print(f"{args.covariance}: input covariances of {len(collector.covariances or {})} routed expert tensors")
    return 0
