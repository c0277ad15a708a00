"""Suggest a recipe for memory budgets: measure what each routed-expert group costs in quality, then
spend the bytes where they buy the most.

1. Build the BF16 GGUF, collect an importance matrix and the base distributions on a calibration text.
2. Sensitivity: for every expert group (a tensor kind, or a kind in one layer) and candidate type,
   build a GGUF where only that group is quantized (with the imatrix) and measure its mean KLD.
3. Allocation: start every group at its smallest type and, while bytes remain, take the upgrade that
   removes the most KLD per byte (on each group's lower convex hull). Group KLDs are assumed to add up;
   the chosen recipe is then built and measured, and the prediction printed beside the measurement.
Attention, SSM, shared-expert, embedding and output tensors are kept as the source has them.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from quantizer import ggml
from quantizer.build import build_gguf, checkpoint_specs
from quantizer.errors import QuantError
from quantizer.evaluate import EvalResult, LlamaSession, score_against_cache, sha256_file, write_base_cache
from quantizer.imatrix import write_imatrix_gguf
from quantizer.imatrix_collect import collect_imatrix
from quantizer.plan import make_plan
from quantizer.recipes import KEEP, get_recipe
from quantizer.source import open_checkpoint
from quantizer.spec import TensorSpec

log = logging.getLogger(__name__)

Granularity = Literal["kind", "layer"]
# Candidate expert types, smallest first; all use 256-column blocks except q8_0 (32).
EXPERT_TYPES: tuple[str, ...] = ("iq2_s", "iq3_xxs", "iq3_s", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0")
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
class Step:
    group: str
    old: str
    new: str
    added_bytes: int
    kld_saved: float


@dataclass(frozen=True)
class Allocation:
    choice: tuple[tuple[str, str], ...]  # (group, type), in group order
    expert_bytes: int
    predicted_kld: float
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Suggestion:
    rules: tuple[str, ...]  # REGEX=TYPE, for `coder-quant build --recipe bf16 --rule ...`
    allocation: Allocation
    expert_budget: int
    fixed_ram: int  # bytes that are not routed experts, in RAM
    fixed_gpu: int  # and on the GPU (0 without a VRAM budget)
    options: tuple[Option, ...]
    measured: EvalResult | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


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


def split_fixed(specs: Sequence[TensorSpec], with_gpu: bool) -> tuple[int, int, int]:
    """(fixed RAM bytes, fixed GPU bytes, header estimate) of everything but routed experts, kept as is.

    With a GPU, llama.cpp keeps the input layer (token_embd) in RAM and `--gpu-layers attn` keeps the
    routed experts there; everything else goes to the GPU.
    """
    plan = make_plan(specs, get_recipe("bf16"))
    ram = gpu = 0
    for e in plan.entries:
        if e.spec.tclass == "routed_expert":
            continue
        if with_gpu and e.spec.tclass != "embedding":
            gpu += e.nbytes
        else:
            ram += e.nbytes
    return ram, gpu, plan.file_bytes - plan.tensor_bytes


def _hull(options: list[Option]) -> list[Option]:
    """Lower convex hull of (bytes, kld), smallest first: the upgrades worth taking in order."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.kld)):
        if pts and o.kld >= pts[-1].kld:
            continue  # more bytes, no less KLD
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # drop b if it lies on or above the segment a -> o
            if (b.kld - a.kld) * (o.nbytes - a.nbytes) >= (o.kld - a.kld) * (b.nbytes - a.nbytes):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def allocate(options: Sequence[Option], budget: int) -> Allocation:
    """Pick one option per group: greedy by KLD saved per byte on each group's convex hull."""
    by_group: dict[str, list[Option]] = {}
    for o in options:
        by_group.setdefault(o.group, []).append(o)
    hulls = {g: _hull(opts) for g, opts in by_group.items()}
    level = dict.fromkeys(hulls, 0)
    spent = sum(h[0].nbytes for h in hulls.values())
    if spent > budget:
        smallest = ", ".join(sorted({h[0].type for h in hulls.values()}))
        raise SuggestError(f"routed experts need at least {spent:,} bytes ({smallest}); the budget leaves {budget:,}")
    steps: list[Step] = []
    while True:
        best: tuple[float, str] | None = None
        for g, h in hulls.items():
            i = level[g]
            if i + 1 < len(h) and spent + h[i + 1].nbytes - h[i].nbytes <= budget:
                rate = (h[i].kld - h[i + 1].kld) / max(h[i + 1].nbytes - h[i].nbytes, 1)
                if best is None or rate > best[0]:
                    best = (rate, g)
        if best is None:
            break
        g = best[1]
        old, new = hulls[g][level[g]], hulls[g][level[g] + 1]
        spent += new.nbytes - old.nbytes
        level[g] += 1
        steps.append(Step(g, old.type, new.type, new.nbytes - old.nbytes, old.kld - new.kld))
    chosen = [hulls[g][level[g]] for g in by_group]
    return Allocation(
        tuple((o.group, o.type) for o in chosen), sum(o.nbytes for o in chosen), sum(o.kld for o in chosen),
        tuple(steps),
    )  # fmt: skip


def rules_for(groups: Sequence[Group], allocation: Allocation) -> tuple[str, ...]:
    """--rule arguments carrying out an allocation on top of the bf16 recipe."""
    pattern = {g.name: g.pattern for g in groups}
    return tuple(f"{pattern[g]}={t}" for g, t in allocation.choice if t != KEEP)


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
        build_gguf(self.source, self.bf16, recipe="bf16", threads=self.threads, force=True)
        self.base_sha = sha256_file(self.bf16)
        if imatrix is None:
            stats = collect_imatrix(self.bf16, self.text, ctx=self.ctx)
            imatrix = self.folder / "imatrix.gguf"
            write_imatrix_gguf(imatrix, stats.sums, stats.counts, ["calibration"], stats.chunk_count, stats.chunk_size)
        self.imatrix = imatrix
        self.cache = self.folder / "base.logits"
        with LlamaSession(self.bf16, self.ctx) as session:
            write_base_cache(session, self.text, self.chunks, self.cache, self.base_sha)

    def measure(self, rules: Sequence[str], name: str) -> EvalResult:
        out = self.folder / f"{name}.gguf"
        build_gguf(self.source, out, recipe="bf16", rules=tuple(rules), imatrix=self.imatrix,
                   threads=self.threads, force=True)  # fmt: skip
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
) -> Suggestion:
    """Measure per-group sensitivity on `text` and propose the expert types that fit the budgets."""
    report = progress or (lambda msg: log.info("%s", msg))
    checkpoint = open_checkpoint(source)
    try:
        specs = checkpoint_specs(checkpoint)
    finally:
        checkpoint.close()
    groups = expert_groups(specs, granularity)
    fixed_ram, fixed_gpu, header = split_fixed(specs, with_gpu=vram_budget is not None)
    notes = []
    if vram_budget is not None and fixed_gpu > vram_budget:
        raise SuggestError(f"attention, SSM and shared-expert tensors need {fixed_gpu:,} bytes of VRAM kept "
                           f"as they are; --vram-budget is {vram_budget:,}")  # fmt: skip
    if vram_budget is not None:
        notes.append(f"GPU: {fixed_gpu:,} of {vram_budget:,} bytes (everything but routed experts and token_embd)")
    budget = ram_budget - fixed_ram - header
    notes.append(f"RAM: {fixed_ram + header:,} bytes fixed, {budget:,} left for routed experts")
    for t in types:
        if t != KEEP:
            ggml.ggml_type(t)
    with tempfile.TemporaryDirectory(prefix="coder-quant-suggest-", dir=workdir) as tmp:
        ws = _Workspace(Path(source), Path(tmp), text, ctx, chunks, threads)
        report("building the BF16 reference, importance matrix and base distributions")
        ws.prepare(Path(imatrix) if imatrix is not None else None)
        options = [Option(g.name, KEEP, g.nbytes(KEEP), 0.0) for g in groups]
        for g in groups:
            for t in types:
                result = ws.measure([f"{g.pattern}={t}"], f"{g.name}-{t}")
                options.append(Option(g.name, t, g.nbytes(t), result.kld_mean))
                report(f"{g.name:<24} {t:<8} {g.nbytes(t):>14,} bytes  mean KLD {result.kld_mean:.6f}")
        allocation = allocate(options, budget)
        rules = rules_for(groups, allocation)
        report("measuring the suggested recipe")
        measured = ws.measure(rules, "suggested")
    return Suggestion(rules, allocation, budget, fixed_ram + header, fixed_gpu, tuple(options), measured,
                      tuple(notes))  # fmt: skip
