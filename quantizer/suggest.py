"""Suggest a recipe for memory budgets: measure what each routed-expert group costs in quality, then
spend the bytes where they buy the most.

1. Build the BF16 GGUF, collect an importance matrix and the base distributions on a calibration text.
2. Sensitivity: for every expert group (a tensor kind, or a kind in one layer) and candidate type,
   build a GGUF where only that group is quantized (with the imatrix) and measure its mean KLD.
3. Allocation: one type per group with the lowest summed KLD that fits the bytes left for routed
   experts (an exact knapsack over the measured options). Group KLDs are assumed to add up, which
   they do roughly; the chosen recipe is then built and measured on the same text.
4. Optionally, up/down equalization (quantizer.equalize): it changes no byte count and needs a
   layer's up and down both quantized, so it cannot be priced per group. The chosen recipe is measured
   with it too, and it is proposed when that measures lower by more than one standard error.
Attention, SSM, shared-expert, embedding and output tensors are kept as the source has them.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT

from quantizer import ggml
from quantizer.build import build_gguf, check_imatrix_coverage, checkpoint_specs
from quantizer.equalize import eligible_layers
from quantizer.errors import QuantError
from quantizer.evaluate import EvalResult, LlamaSession, score_against_cache, write_base_cache
from quantizer.imatrix import check_against, load_imatrix, write_imatrix_gguf
from quantizer.imatrix_collect import collect_imatrix
from quantizer.plan import make_plan
from quantizer.recipes import KEEP, get_recipe
from quantizer.source import open_checkpoint
from quantizer.spec import TensorSpec

log = logging.getLogger(__name__)

Granularity = Literal["kind", "layer"]
# Candidate expert types, smallest first (3.06 to 6.56 bits per weight); keeping BF16 is always a candidate.
EXPERT_TYPES: tuple[str, ...] = ("iq3_xxs", "iq3_s", "iq4_xs", "q4_k", "q5_k", "q6_k")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


class SuggestError(QuantError):
    """The budgets cannot be met, or the inputs for a suggestion are unusable."""


def parse_size(text: str) -> int:
    """Bytes from "14805408", "12MB" (10^6), "11.5MiB" or "12M" (2^20: a bare unit letter is binary)."""
    m = _SIZE.match(text)
    if not m:
        raise SuggestError(f"cannot read size {text!r} (examples: 24GiB, 64GB, 12M, 14805408)")
    number, unit, binary, b = m.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    base = 1024 if binary or (unit and not b) else 1000
    return int(float(number) * base**power)


@dataclass(frozen=True)
class Group:
    """Routed-expert tensors that get one type together."""

    name: str  # "ffn_down_exps" or "blk.3.ffn_down_exps"
    pattern: str  # regex for a --rule
    specs: tuple[TensorSpec, ...]

    def nbytes(self, qtype: str) -> int:
        total = 0
        for s in self.specs:
            rows = 1
            for d in s.shape[:-1]:
                rows *= d
            total += rows * ggml.row_size(s.base_type if qtype == KEEP else qtype, s.shape[-1])
        return total


@dataclass(frozen=True)
class Option:
    group: str
    type: str
    nbytes: int
    kld: float  # mean KLD with only this group quantized to this type


@dataclass(frozen=True)
class Allocation:
    choice: tuple[tuple[str, str], ...]  # (group, type), in group order
    expert_bytes: int
    predicted_kld: float  # sum of the chosen options' own KLDs


@dataclass(frozen=True)
class Suggestion:
    rules: tuple[str, ...]  # REGEX=TYPE, for `coder-quant build --recipe bf16 --rule ...`
    allocation: Allocation
    split: Split
    options: tuple[Option, ...]
    uniform: tuple[str, float] | None  # best single type that fits, and its summed KLD
    measured: EvalResult  # the proposal: the rules, with up/down equalization when `equalize`
    equalize: bool = False
    other: EvalResult | None = None  # the same rules the other way (with or without equalization)
    gptq: bool = False  # the proposal rounds its IQ4_XS experts by GPTQ (build --gptq)
    gptq_pair: tuple[EvalResult, EvalResult] | None = None  # (with, without) GPTQ, both unequalized
    imatrix: Path | None = None  # the caller's importance matrix; None: suggest collected its own, not kept


def expert_groups(specs: Iterable[TensorSpec], granularity: Granularity) -> list[Group]:
    """Routed-expert tensors grouped by kind (gate/up/down), or by kind and layer."""
    groups: dict[str, list[TensorSpec]] = {}
    for s in specs:
        if s.tclass != "routed_expert":
            continue
        m = re.match(r"^blk\.(\d+)\.(\w+)\.", s.name)
        kind = m.group(2) if m else s.name
        key = f"blk.{m.group(1)}.{kind}" if granularity == "layer" and m else kind
        groups.setdefault(key, []).append(s)
    if not groups:
        raise SuggestError("the model has no routed-expert tensors: nothing to choose")
    return [Group(k, rf"^{re.escape(k)}\." if k.startswith("blk.") else rf"\.{re.escape(k)}\.", tuple(v))
            for k, v in groups.items()]  # fmt: skip


@dataclass(frozen=True)
class Split:
    """Bytes that do not depend on the expert types, by device."""

    fixed_ram: int  # GGUF header and tensors other than routed experts held in RAM
    fixed_gpu: int  # tensors on the GPU (0 without a VRAM budget)
    expert_budget: int  # RAM left for routed experts


def split_budget(specs: Sequence[TensorSpec], bf16_file_bytes: int, ram: int, vram: int | None) -> Split:
    """Where the bytes go under `--gpu-layers attn` (or all in RAM without a GPU).

    llama.cpp keeps the input layer (token_embd) in RAM and `attn` keeps routed experts there; every
    other tensor goes to the GPU. The header is the BF16 build's (the rules of a suggestion add a few
    hundred bytes of metadata, not counted).
    """
    plan = make_plan(specs, get_recipe("bf16"))
    ram_bytes = bf16_file_bytes - bf16_tensor_bytes(specs)  # the real header
    gpu_bytes = 0
    for e in plan.entries:
        if e.spec.tclass == "routed_expert":
            continue
        if vram is not None and e.spec.tclass != "embedding":
            gpu_bytes += e.nbytes
        else:
            ram_bytes += e.nbytes
    if vram is not None and gpu_bytes > vram:
        raise SuggestError(f"the tensors kept for the GPU (attention, SSM, shared experts, output) need "
                           f"{gpu_bytes:,} bytes; --vram-budget is {vram:,}")  # fmt: skip
    return Split(ram_bytes, gpu_bytes, ram - ram_bytes)


def bf16_tensor_bytes(specs: Sequence[TensorSpec]) -> int:
    """Bytes of tensor data (aligned) in the BF16 build: its file size less the header."""
    plan = make_plan(specs, get_recipe("bf16"))
    return sum(e.nbytes + (-e.nbytes % GGUF_DEFAULT_ALIGNMENT) for e in plan.entries)


def check_experts_fit(split: Split, groups: Sequence[Group], types: Sequence[str]) -> None:
    """Refuse budgets that leave too little for every expert group at its smallest candidate type."""
    least = sum(min(g.nbytes(t) for t in (*types, KEEP)) for g in groups)
    if split.expert_budget < least:
        raise SuggestError(f"routed experts need at least {least:,} bytes on top of {split.fixed_ram:,} bytes of "
                           f"other tensors in RAM; --ram-budget is {split.expert_budget + split.fixed_ram:,}")  # fmt: skip


def check_inputs(specs: Sequence[TensorSpec], groups: Sequence[Group], types: Sequence[str], ram_budget: int,
                 vram_budget: int | None, ctx: int, chunks: int, threads: int, imatrix: Path | None,
                 gptq: Path | None) -> None:
    """Everything that can be refused from the plan alone, before hours of builds and measurements.

    The budgets are priced without the GGUF header (known only once the BF16 build is written), so
    a budget refused here is short by at least that much; split_budget checks again with it."""
    if not types:
        raise SuggestError("--types names no candidate expert type")
    for name, value, least in (("--ctx", ctx, 4), ("--chunks", chunks, 1), ("--threads", threads, 1)):
        if value < least:  # --ctx: llama-perplexity's chunks need 4 tokens (llama_session.chunk_tokens)
            raise SuggestError(f"{name} must be at least {least}, got {value}")
    if gptq is not None and not gptq.is_file():
        raise SuggestError(f"--gptq: covariance file not found: {gptq}")
    if imatrix is not None:
        weights = check_against(load_imatrix(imatrix), specs).entries
        for t in types:  # each candidate is measured with this imatrix on every expert group
            check_imatrix_coverage(make_plan(specs, get_recipe("bf16", (f"class:routed_expert={t}",))), weights)
    check_experts_fit(split_budget(specs, bf16_tensor_bytes(specs), ram_budget, vram_budget), groups, types)


def allocate(options: Sequence[Option], budget: int, resolution: int = 20_000) -> Allocation:
    """One option per group with the lowest summed KLD whose bytes fit `budget` (exact knapsack).

    Bytes are counted in units of their greatest common divisor, or of budget/resolution rounded up
    when that would be too fine; rounding costs up keeps every answer within the budget.
    """
    by_group: dict[str, list[Option]] = {}
    for o in options:
        by_group.setdefault(o.group, []).append(o)
    unit = math.gcd(*(o.nbytes for o in options)) or 1
    if budget // unit > resolution:
        unit = -(-budget // resolution)
    cap = budget // unit
    if cap < 0:
        raise SuggestError(f"the budget leaves {budget:,} bytes for routed experts")
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for opts in by_group.values():
        nxt, pick = np.full(cap + 1, np.inf), np.full(cap + 1, -1)
        for i, o in enumerate(opts):
            cost = -(-o.nbytes // unit)
            if cost > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[cost:] = best[: cap + 1 - cost] + o.kld
            better = cand < nxt
            nxt[better], pick[better] = cand[better], i
        best = nxt
        picks.append(pick)
    if not np.isfinite(best).any():
        least = sum(min(o.nbytes for o in opts) for opts in by_group.values())
        raise SuggestError(f"routed experts need at least {least:,} bytes; the budget leaves {budget:,}")
    used = int(np.argmin(best))
    chosen: list[Option] = []
    for opts, pick in zip(reversed(list(by_group.values())), reversed(picks), strict=True):
        o = opts[int(pick[used])]
        chosen.append(o)
        used -= -(-o.nbytes // unit)
    chosen.reverse()
    return Allocation(tuple((o.group, o.type) for o in chosen), sum(o.nbytes for o in chosen), sum(o.kld for o in chosen))


def best_uniform(options: Sequence[Option], budget: int) -> tuple[str, float] | None:
    """The single type for every group that fits the budget with the lowest summed KLD, for comparison."""
    totals: dict[str, list[Option]] = {}
    for o in options:
        totals.setdefault(o.type, []).append(o)
    n_groups = len({o.group for o in options})
    fitting = [(sum(o.kld for o in v), t) for t, v in totals.items()
               if len(v) == n_groups and sum(o.nbytes for o in v) <= budget]  # fmt: skip
    return (min(fitting)[1], min(fitting)[0]) if fitting else None


def rules_for(groups: Sequence[Group], allocation: Allocation) -> tuple[str, ...]:
    """--rule arguments carrying out an allocation on top of the bf16 recipe: one rule per group that
    differs from the most common type, then that type for every routed expert (first match wins)."""
    pattern = {g.name: g.pattern for g in groups}
    common = Counter(t for _, t in allocation.choice).most_common(1)[0][0]
    rules = [f"{pattern[g]}={t}" for g, t in allocation.choice if t != common]
    if common != KEEP:
        rules.append(f"class:routed_expert={common}")
    return tuple(rules)


@dataclass
class _Workspace:
    """The BF16 build, its imatrix and base distributions, and a scratch folder, for one suggestion."""

    source: Path
    folder: Path
    text: str
    ctx: int
    chunks: int
    threads: int
    bf16: Path = field(init=False)
    imatrix: Path = field(init=False)
    cache: Path = field(init=False)
    base_sha: str = field(init=False)

    def prepare(self, imatrix: Path | None) -> None:
        self.bf16 = self.folder / "bf16.gguf"
        self.base_sha = build_gguf(self.source, self.bf16, recipe="bf16", threads=self.threads).written.sha256
        if imatrix is None:
            stats = collect_imatrix(self.bf16, self.text, ctx=self.ctx)
            imatrix = self.folder / "imatrix.gguf"
            write_imatrix_gguf(imatrix, stats.sums, stats.counts, ["calibration"], stats.chunk_count, stats.chunk_size)
        self.imatrix = imatrix
        self.cache = self.folder / "base.logits"
        with LlamaSession(self.bf16, self.ctx) as session:
            write_base_cache(session, self.text, self.chunks, self.cache, self.base_sha)

    def can_equalize(self, specs: Sequence[TensorSpec], rules: Sequence[str]) -> bool:
        entries = make_plan(specs, get_recipe("bf16", tuple(rules))).entries
        return bool(eligible_layers(entries, check_against(load_imatrix(self.imatrix), specs).entries))

    def measure(self, rules: Sequence[str], name: str, equalize: bool = False,
                gptq: Path | None = None) -> EvalResult:
        out = self.folder / f"{name}.gguf"
        build_gguf(self.source, out, recipe="bf16", rules=tuple(rules), imatrix=self.imatrix,
                   threads=self.threads, force=True, equalize=equalize, gptq=gptq)  # fmt: skip
        try:
            with LlamaSession(out, self.ctx) as session:
                return score_against_cache(session, self.text, self.chunks, self.cache, self.base_sha)
        finally:
            out.unlink(missing_ok=True)
            out.with_name(out.name + ".sha256").unlink(missing_ok=True)


def suggest(
    source: str | Path,
    ram_budget: int,
    text: str,
    vram_budget: int | None = None,
    ctx: int = 512,
    chunks: int = 32,
    granularity: Granularity = "layer",
    types: Sequence[str] = EXPERT_TYPES,
    imatrix: str | Path | None = None,
    threads: int = 1,
    workdir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    try_equalize: bool = False,
    gptq: str | Path | None = None,
) -> Suggestion:
    """Measure per-group sensitivity on `text` and propose the expert types that fit the budgets;
    with `try_equalize`, also measure them with up/down equalization and propose it if clearly lower;
    with `gptq` (a covariance file), likewise for GPTQ rounding where every routed expert is IQ4_XS."""
    report = progress or (lambda msg: log.info("%s", msg))
    for t in types:
        if t != KEEP:
            ggml.ggml_type(t)  # RecipeError for an unknown name, before any work
    checkpoint = open_checkpoint(source)
    try:
        specs = checkpoint_specs(checkpoint)
    finally:
        checkpoint.close()
    groups = expert_groups(specs, granularity)
    own_imatrix = Path(imatrix) if imatrix is not None else None
    check_inputs(specs, groups, types, ram_budget, vram_budget, ctx, chunks, threads, own_imatrix,
                 Path(gptq) if gptq is not None else None)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="coder-quant-suggest-", dir=workdir) as tmp:
        ws = _Workspace(Path(source), Path(tmp), text, ctx, chunks, threads)
        report("building the BF16 reference, importance matrix and base distributions")
        ws.prepare(own_imatrix)
        split = split_budget(specs, ws.bf16.stat().st_size, ram_budget, vram_budget)
        check_experts_fit(split, groups, types)  # again, now with the real header
        options = [Option(g.name, KEEP, g.nbytes(KEEP), 0.0) for g in groups]  # the reference itself
        for g in groups:
            for t in types:
                result = ws.measure([f"{g.pattern}={t}"], f"{g.name}-{t}")
                options.append(Option(g.name, t, g.nbytes(t), result.kld_mean))
                report(f"{g.name:<24} {t:<8} {g.nbytes(t):>14,} bytes  mean KLD {result.kld_mean:.6f}")
        allocation = allocate(options, split.expert_budget)
        rules = rules_for(groups, allocation)
        report("measuring the suggested recipe")
        measured = ws.measure(rules, "suggested")
        # GPTQ first, then equalization on top of whatever was chosen: the two interact (equalization
        # changes down's input scales, which GPTQ then rounds against).
        rounded, gptq_pair = False, None
        if gptq is not None and {t for _, t in allocation.choice} == {"iq4_xs"}:
            report("measuring it with GPTQ rounding")
            with_gptq = ws.measure(rules, "suggested-gptq", gptq=Path(gptq))
            rounded, gptq_pair = _clearly_lower(with_gptq, measured), (with_gptq, measured)
            measured = with_gptq if rounded else measured
        elif gptq is not None:
            report("GPTQ not tried: it rounds IQ4_XS experts only")
        other, equalize = None, False
        if try_equalize and ws.can_equalize(specs, rules):
            report("measuring it with up/down equalization")
            equalized = ws.measure(rules, "suggested-equalized", equalize=True, gptq=Path(gptq) if rounded else None)
            equalize = _clearly_lower(equalized, measured)
            measured, other = (equalized, measured) if equalize else (measured, equalized)
    uniform = best_uniform(options, split.expert_budget)
    return Suggestion(rules, allocation, split, tuple(options), uniform, measured, equalize, other,
                      rounded, gptq_pair, own_imatrix)


def _clearly_lower(a: EvalResult, b: EvalResult) -> bool:
    """Whether a's mean KLD is below b's by more than the larger of their standard errors."""
    return a.kld_mean < b.kld_mean - max(a.kld_mean_unc, b.kld_mean_unc)
