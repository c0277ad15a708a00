"""HF checkpoint -> GGUF in one pass: read source, plan, write. The library side of `coder-quant build`."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from quantizer import arch as arch_registry
from quantizer import ggml
from quantizer.covariance import load_covariances
from quantizer.equalize import EQUALIZE_METHOD, Equalizer
from quantizer.errors import ImatrixError, QuantError
from quantizer.gptq import GPTQ_METHOD, SHRINK, GptqRounder
from quantizer.imatrix import check_against, load_imatrix
from quantizer.plan import Plan, make_plan
from quantizer.recipes import KEEP, Recipe, get_recipe
from quantizer.source import SIDE_FILES, Checkpoint, open_checkpoint
from quantizer.spec import TensorSpec
from quantizer.vocab import load_vocab
from quantizer.writer import ProgressFn, Provenance, WriteResult, write_gguf

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildResult:
    plan: Plan
    written: WriteResult


def checkpoint_specs(checkpoint: Checkpoint) -> list[TensorSpec]:
    """Every output tensor of a checkpoint, in the order the reference converter writes them."""
    module = arch_registry.get_arch(checkpoint.config)
    return module.specs_from_config(checkpoint.config, checkpoint.names, checkpoint.order)


def validate_sources(checkpoint: Checkpoint, specs: list[TensorSpec]) -> None:
    """Every source tensor exists with the shape and a dtype the transforms expect."""
    module = arch_registry.get_arch(checkpoint.config)
    for spec in specs:
        for name, shape in module.expected_source_shapes(spec, checkpoint.config):
            entry = checkpoint.entry(name)
            if entry.shape != tuple(shape):
                raise QuantError(f"checkpoint tensor {name!r} has shape {list(entry.shape)}, "
                                 f"config.json implies {list(shape)}")
            if entry.dtype not in ("BF16", "F16", "F32"):
                raise QuantError(f"checkpoint tensor {name!r} has dtype {entry.dtype}; need BF16, F16 or F32")


def check_output(out: Path, checkpoint: Checkpoint) -> None:
    """Refuse an output that is the source folder or one of its files: the rename would replace it."""
    sources = [checkpoint.path, *checkpoint.files, *(checkpoint.path / name for name in SIDE_FILES)]
    for source in sources:
        if out.exists() and source.exists() and os.path.samefile(out, source):
            what = "folder" if source == checkpoint.path else f"file {source.name}"
            raise QuantError(f"{out} is the source checkpoint's {what}; choose another output path")


def check_imatrix_coverage(plan: Plan, imatrix: Mapping[str, object] | None) -> None:
    """Every tensor of a type ggml quantizes only with importance data has some, checked before any work."""
    for entry in plan.entries:
        if ggml.is_quantized(entry.type) and ggml.requires_imatrix(entry.type) and (
            imatrix is None or entry.name not in imatrix
        ):
            hint = " (use --imatrix)" if imatrix is None else ""
            raise ImatrixError(
                f"{entry.name}: type {entry.type} cannot be quantized without an importance matrix{hint}"
            )


def rule_texts(recipe: Recipe) -> tuple[str, ...]:
    """The recipe's rules as recorded in the GGUF ("PATTERN=TYPE (label)"); verify parses them back."""
    return tuple(f"{r.pattern}={r.type if r.type != KEEP else 'keep'} ({r.label})" for r in recipe.rules)


def build_gguf(
    source: str | Path,
    out: str | Path,
    *,
    recipe: str | None = None,
    rules: tuple[str, ...] | list[str] = (),
    imatrix: str | Path | None = None,
    threads: int = 1,
    force: bool = False,
    progress: ProgressFn | None = None,
    equalize: bool = False,
    gptq: str | Path | None = None,
    gptq_shrink: float = SHRINK,
) -> BuildResult:
    """Convert (and selectively quantize) a Hugging Face checkpoint folder into one GGUF file.

    `equalize` rescales routed up/down channels before quantizing them (quantizer.equalize); it needs
    the importance matrix, and leaves every other tensor as it would be. `gptq` names a covariance
    file (quantizer.covariance) with which routed IQ4_XS experts are rounded by GPTQ (quantizer.gptq)."""
    out = Path(out)
    if not math.isfinite(gptq_shrink) or gptq_shrink < 0:
        raise QuantError(f"--gptq-shrink must be a finite number, 0 or more, got {gptq_shrink:g}")
    if equalize and imatrix is None:
        raise QuantError("--equalize needs --imatrix: the channel scales come from the importance matrix")
    chosen = get_recipe(recipe, tuple(rules))
    checkpoint = open_checkpoint(source)  # reads headers only
    check_output(out, checkpoint)
    if out.exists() and not force:
        raise QuantError(f"{out} exists (use --force to overwrite)")
    module = arch_registry.get_arch(checkpoint.config)
    specs = checkpoint_specs(checkpoint)
    validate_sources(checkpoint, specs)
    vocab = load_vocab(checkpoint.path, module.hparams(checkpoint.config))
    weights = check_against(load_imatrix(imatrix), specs) if imatrix is not None else None
    plan = make_plan(specs, chosen)
    check_imatrix_coverage(plan, weights.entries if weights is not None else None)
    equalizer = None
    if equalize and weights is not None:  # (checked above: equalize comes with an imatrix)
        equalizer = Equalizer(plan.entries, weights.entries, weights.present,
                              lambda spec: module.tensor_f32(checkpoint, spec), threads)  # fmt: skip
        if not equalizer.layers:
            raise QuantError("--equalize: no layer has its routed ffn_up_exps and ffn_down_exps quantized "
                             "with importance data for ffn_down_exps")  # fmt: skip
    rounder = None
    if gptq is not None:
        covariances = load_covariances(gptq)
        rounder = GptqRounder(plan.entries, covariances, equalizer, gptq_shrink, threads)
        if not rounder.layers:
            raise QuantError(f"--gptq: {Path(gptq).name} has no covariances for this model's IQ4_XS experts")
    logger.info("plan: %d tensors, %d bytes of tensor data (recipe %s)", len(plan.entries), plan.tensor_bytes, chosen.name)
    provenance = Provenance(
        recipe=chosen.name,
        rules=rule_texts(chosen),
        sources=tuple(checkpoint.digests(progress)),
        imatrix_file=Path(weights.path).name if weights is not None else None,
        imatrix_sha256=weights.sha256 if weights is not None else None,
        equalize=EQUALIZE_METHOD if equalizer is not None else None,
        equalize_layers=equalizer.layers if equalizer is not None else (),
        gptq=f"{GPTQ_METHOD}, shrink {gptq_shrink:g}" if rounder is not None else None,
        gptq_layers=rounder.layers if rounder is not None else (),
        gptq_covariance_sha256=covariances.sha256 if rounder is not None else None,
    )
    try:
        written = write_gguf(out, checkpoint, module, plan.entries, vocab, provenance,
                             imatrix=weights.entries if weights is not None else None,
                             threads=threads, force=force, progress=progress,
                             transform=rounder or equalizer)
    finally:
        checkpoint.close()
    return BuildResult(plan, written)
