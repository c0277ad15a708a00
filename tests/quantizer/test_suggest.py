"""`coder-quant suggest`: sizes, the budget split, the knapsack, and one small run on the reference model."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from quantizer.build import checkpoint_specs
from quantizer.cli import main
from quantizer.commands.suggest import render
from quantizer.evaluate import EvalResult
from quantizer.plan import make_plan
from quantizer.recipes import KEEP, get_recipe
from quantizer.source import open_checkpoint
from quantizer.suggest import (
    Allocation,
    Option,
    Split,
    SuggestError,
    Suggestion,
    allocate,
    best_uniform,
    expert_groups,
    parse_size,
    rules_for,
    split_budget,
)


def test_parse_size() -> None:
    assert parse_size("14805408") == 14_805_408
    assert parse_size("12MB") == 12_000_000
    assert parse_size("12MiB") == parse_size("12M") == 12 * 2**20
    assert parse_size("1.5 GiB") == 3 * 2**29
    for bad in ("", "twelve", "12XB", "-3G"):
        with pytest.raises(SuggestError):
            parse_size(bad)


def _random_options(rng: np.random.Generator, n_groups: int) -> list[Option]:
    sizes = {"a": 3, "b": 4, "c": 5, "d": 7}
    options = []
    for g in range(n_groups):
        scale = rng.uniform(0.5, 2.0)
        for t, size in sizes.items():
            options.append(Option(f"g{g}", t, size * 1000, scale * 2.0 ** -size * rng.uniform(0.8, 1.2)))
    return options


def test_allocation_is_the_best_combination_that_fits() -> None:
    rng = np.random.default_rng(0)
    for budget in (16_000, 19_000, 23_500):
        options = _random_options(rng, 4)
        alloc = allocate(options, budget)
        by_group = [[o for o in options if o.group == f"g{g}"] for g in range(4)]
        fitting = [c for c in itertools.product(*by_group) if sum(o.nbytes for o in c) <= budget]
        best = min(fitting, key=lambda c: sum(o.kld for o in c))
        assert alloc.predicted_kld == pytest.approx(sum(o.kld for o in best))
        assert alloc.expert_bytes <= budget
        assert [g for g, _ in alloc.choice] == ["g0", "g1", "g2", "g3"]


def test_allocation_rounds_costs_up_when_bytes_are_coarsened() -> None:
    options = [Option("x", "a", 999_999, 1.0), Option("x", "b", 1_000_001, 0.5)]
    alloc = allocate(options, 1_000_000, resolution=10)
    assert alloc.choice == (("x", "a"),)
    with pytest.raises(SuggestError, match="at least"):
        allocate(options, 999_000)


def test_best_uniform_needs_every_group() -> None:
    options = [Option("g0", "a", 10, 1.0), Option("g1", "a", 10, 2.0), Option("g0", "b", 20, 0.1)]
    assert best_uniform(options, 40) == ("a", 3.0)
    assert best_uniform(options, 10) is None


@pytest.fixture(scope="module")
def specs(reference_model: Path) -> list:
    checkpoint = open_checkpoint(reference_model)
    try:
        return checkpoint_specs(checkpoint)
    finally:
        checkpoint.close()


def test_groups_and_rules_select_exactly_their_tensors(specs: list) -> None:
    experts = [s.name for s in specs if s.tclass == "routed_expert"]
    for granularity, count in (("kind", 3), ("layer", 12)):
        groups = expert_groups(specs, granularity)
        assert len(groups) == count
        matched = [s.name for g in groups for s in specs if re.search(g.pattern, s.name)]
        assert sorted(matched) == sorted(experts)  # every expert tensor once, nothing else
    groups = expert_groups(specs, "layer")
    down0 = next(g for g in groups if g.name == "blk.0.ffn_down_exps")
    assert down0.nbytes("iq4_xs") == 16 * 256 * 136 and down0.nbytes(KEEP) == 16 * 256 * 256 * 2
    options = [Option(g.name, "iq4_xs", g.nbytes("iq4_xs"), 0.001) for g in groups]
    options.append(Option("blk.0.ffn_down_exps", "q5_k", down0.nbytes("q5_k"), 0.0005))
    alloc = allocate(options, 10**9)
    assert dict(alloc.choice)["blk.0.ffn_down_exps"] == "q5_k"
    assert rules_for(groups, alloc) == (r"^blk\.0\.ffn_down_exps\.=q5_k", "class:routed_expert=iq4_xs")
    plan = make_plan(specs, get_recipe("bf16", rules_for(groups, alloc)))
    chosen = {e.name: e.type for e in plan.entries if e.spec.tclass == "routed_expert"}
    assert chosen.pop("blk.0.ffn_down_exps.weight") == "q5_k" and set(chosen.values()) == {"iq4_xs"}


def test_budget_split(specs: list) -> None:
    bf16_file = 33_286_496  # the BF16 build of the reference model
    cpu = split_budget(specs, bf16_file, 14_805_408, None)
    assert cpu.fixed_gpu == 0 and cpu.expert_budget >= 12 * 16 * 256 * 136  # room for IQ4_XS experts
    gpu = split_budget(specs, bf16_file, 4_000_000, 8_000_000)
    assert gpu.fixed_gpu > 0 and gpu.fixed_ram + gpu.fixed_gpu == cpu.fixed_ram
    with pytest.raises(SuggestError, match="vram-budget"):
        split_budget(specs, bf16_file, 10**9, 1_000_000)


def test_small_run_fits_and_is_measured(
    reference_model: Path, heldout_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "calibration.txt"
    text.write_text(heldout_text.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    budget = 8_120_672 + 6_600_000  # BF16 non-expert bytes plus a little under IQ4_XS experts
    args = ["suggest", str(reference_model), "--ram-budget", str(budget), "--text", str(text),
            "--ctx", "256", "--chunks", "2", "--granularity", "kind", "--types", "iq3_s,iq4_xs",
            "--try-equalize"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "=iq3_s'" in out  # the budget is below IQ4_XS everywhere, so at least one group drops
    assert len(re.findall(r"\d\*", out)) == 3 and "Mean    KLD" in out  # one choice per group
    verdict = re.search(r"with up/down equalization \(--equalize\) mean KLD (\S+), without (\S+): (.*)", out)
    assert verdict is not None and float(verdict.group(1)) > 0 and float(verdict.group(2)) > 0
    build_line = next(line for line in out.splitlines() if line.startswith("build:"))
    assert ("--equalize" in build_line) == verdict.group(3).endswith(": proposed")
    assert main([*args[:2], "--ram-budget", "1M", *args[4:-1]]) == 1
    assert "at least" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args[:2], "--ram-budget", "lots", *args[4:-1]])
    assert "cannot read size" in capsys.readouterr().err


def _result(kld: float, unc: float) -> EvalResult:
    return EvalResult(tokens=100, chunks=1, ctx=256, kld_mean=kld, kld_mean_unc=unc, kld_median=kld, kld_p99=kld,
                      kld_p999=kld, kld_max=kld, top1=95.0, top1_unc=0.1, ppl_base=7.0, ppl_base_unc=0.1,
                      ppl_quant=7.1, ppl_quant_unc=0.1, ppl_ratio=1.01, ppl_ratio_unc=0.001)  # fmt: skip


def test_render_says_why_equalization_is_or_is_not_proposed() -> None:
    alloc = Allocation((("g0", "iq4_xs"),), 1000, 0.01)
    base = dict(rules=("class:routed_expert=iq4_xs",), allocation=alloc, split=Split(10, 0, 1000),
                options=(Option("g0", "iq4_xs", 1000, 0.01),), uniform=None)  # fmt: skip
    chosen = render(Suggestion(**base, measured=_result(0.008, 0.0001), equalize=True, other=_result(0.009, 0.0001)))
    assert "mean KLD 0.008000, without 0.009000: lower by more than one standard error: proposed" in chosen
    assert "--imatrix IMATRIX.gguf --equalize --rule 'class:routed_expert=iq4_xs'" in chosen
    declined = render(Suggestion(**base, measured=_result(0.009, 0.0002), equalize=False, other=_result(0.0089, 0.0002)))
    assert "mean KLD 0.008900, without 0.009000: not clearly lower: not proposed" in declined
    assert "--equalize" not in declined.splitlines()[-1]
    assert "equalization" not in render(Suggestion(**base, measured=_result(0.009, 0.0002)))


def test_render_says_why_gptq_is_or_is_not_proposed() -> None:
    alloc = Allocation((("g0", "iq4_xs"),), 1000, 0.01)
    base = dict(rules=("class:routed_expert=iq4_xs",), allocation=alloc, split=Split(10, 0, 1000),
                options=(Option("g0", "iq4_xs", 1000, 0.01),), uniform=None)  # fmt: skip
    chosen = render(Suggestion(**base, measured=_result(0.007, 0.0001), equalize=True, other=_result(0.0075, 0.0001),
                               gptq=True, gptq_pair=(_result(0.0075, 0.0001), _result(0.008, 0.0001))))
    assert "with GPTQ rounding (--gptq) mean KLD 0.007500, without 0.008000: lower by more" in chosen
    assert "(--equalize on top of --gptq) mean KLD 0.007000, without 0.007500: lower by more" in chosen
    assert "(with --equalize --gptq COV.safetensors):" in chosen
    assert chosen.splitlines()[-1].startswith("build: coder-quant build SRC_DIR OUT.gguf --recipe bf16 --imatrix "
                                              "IMATRIX.gguf --equalize --gptq COV.safetensors --rule")
    declined = render(Suggestion(**base, measured=_result(0.008, 0.0002), gptq=False,
                                 gptq_pair=(_result(0.0079, 0.0002), _result(0.008, 0.0002))))
    assert "mean KLD 0.007900, without 0.008000: not clearly lower: not proposed" in declined
    assert "--gptq" not in declined.splitlines()[-1]
