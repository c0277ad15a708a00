"""config.json values and command options that used to crash late or pass silently: refused in one
line naming the key or flag, before any tensor is read, hashed or measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantizer import suggest as suggest_module
from quantizer import verify as verify_module
from quantizer.arch import get_arch
from quantizer.arch.base import HyperParameterError
from quantizer.build import build_gguf
from quantizer.cli import main
from quantizer.commands import verify as verify_command
from quantizer.commands.plan import specs_for_source
from quantizer.commands.suggest import render
from quantizer.evaluate import EvalResult
from quantizer.imatrix import write_imatrix_gguf
from quantizer.source import Checkpoint
from quantizer.suggest import Allocation, Option, Split, Suggestion
from quantizer.synthetic import write_checkpoint

# (key the error must name, config.json changes); the tiny preset has 8 experts
BAD_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "eps-string": ("rms_norm_eps", {"rms_norm_eps": "x"}),
    "eps-negative": ("rms_norm_eps", {"rms_norm_eps": -1}),
    "theta-in-rope": ("rope_parameters.rope_theta", {"rope_parameters": {"rope_theta": "abc"}}),
    "theta-top-level": ("rope_theta", {"rope_theta": "abc"}),
    "theta-overflows-float32": ("rope_parameters.rope_theta", {"rope_parameters": {"rope_theta": 1e300}}),
    "rope-not-object": ("rope_parameters", {"rope_parameters": "default"}),
    "yarn-without-original": ("rope_parameters.original_max_position_embeddings",
                              {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}),
    "context-negative": ("max_position_embeddings", {"max_position_embeddings": -5}),
    "context-float": ("max_position_embeddings", {"max_position_embeddings": 4096.0}),
    "top-k-over-experts": ("num_experts_per_tok", {"num_experts_per_tok": 16}),
    "top-k-zero": ("num_experts_per_tok", {"num_experts_per_tok": 0}),
    "head-dim-zero": ("head_dim", {"head_dim": 0}),
    "rotary-top-level": ("partial_rotary_factor", {"partial_rotary_factor": 2.0}),
    "rotary-in-rope": ("rope_parameters.partial_rotary_factor",
                       {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.0}}),
    "interval-zero": ("full_attention_interval", {"layer_types": None, "full_attention_interval": 0}),
    "layer-type-unknown": ("layer_types", {"layer_types": ["linear_attention"] * 3 + ["sliding_attention"]}),
}  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("config-guards") / "tiny", preset="tiny").path


@pytest.fixture(scope="module")
def pristine_gguf(pristine: Path) -> Path:
    out = pristine.parent / "tiny-bf16.gguf"
    build_gguf(pristine, out, recipe="bf16")
    return out


def _with_config(pristine: Path, folder: Path, changes: dict[str, Any]) -> Path:
    """The pristine checkpoint (files linked, not copied) with config.json changed."""
    folder.mkdir()
    for f in pristine.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((pristine / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, **changes}), encoding="utf-8")
    return folder


def _no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data read or hashed before config.json was checked")

    monkeypatch.setattr(Checkpoint, "raw", refuse)
    monkeypatch.setattr(Checkpoint, "digests", refuse)
    monkeypatch.setattr(verify_module, "file_sha256", refuse)


def _one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coder-quant: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_bad_config_is_refused_by_plan_build_and_verify(
    case: str, pristine: Path, pristine_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    key, changes = BAD_CONFIGS[case]
    source = _with_config(pristine, tmp_path / "src", changes)
    _no_tensor_reads(monkeypatch)
    out = tmp_path / "out.gguf"
    for argv in (["plan", str(source), "--summary"], ["build", str(source), str(out), "--recipe", "bf16"],
                 ["verify", str(source), str(pristine_gguf), "--quiet"]):  # fmt: skip
        capsys.readouterr()
        assert main(argv) == 1, argv[0]
        _one_line_error(capsys.readouterr().err, f"config.json: {key} ")
    assert not out.exists()


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_bad_config_raises_a_typed_error_naming_the_key(case: str, pristine: Path) -> None:
    key, changes = BAD_CONFIGS[case]
    config = {**json.loads((pristine / "config.json").read_text(encoding="utf-8")), **changes}
    with pytest.raises(HyperParameterError) as caught:
        get_arch(config).specs_from_config(config)
    assert caught.value.key == key


def test_good_config_edge_values_are_accepted(pristine: Path, tmp_path: Path) -> None:
    # the bounds themselves: every expert routed to, partial_rotary_factor 1, an int rope_theta
    source = _with_config(pristine, tmp_path / "src", {"num_experts_per_tok": 8, "partial_rotary_factor": 1.0,
                                                       "rope_parameters": {"rope_theta": 10000}})  # fmt: skip
    assert len(specs_for_source(source)) > 0


@pytest.mark.parametrize("bound", ["nan", "inf", "-1", "0", "abc"])
def test_verify_refuses_a_bound_that_is_not_a_positive_number(
    bound: str, pristine: Path, pristine_gguf: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("verify ran with a bound it should have refused")

    monkeypatch.setattr(verify_command, "verify_gguf", refuse)
    with pytest.raises(SystemExit) as caught:
        main(["verify", str(pristine), str(pristine_gguf), "--max-rms", bound])
    assert caught.value.code == 2
    assert "argument --max-rms: " in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def no_suggest_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("suggest started its builds before checking its inputs")

    monkeypatch.setattr(suggest_module._Workspace, "prepare", refuse)


def _partial_imatrix(pristine: Path, path: Path) -> Path:
    """An imatrix of the model's attention tensors only: no routed-expert entries."""
    sums = {s.name: np.ones((1, s.shape[-1]), dtype=np.float32)
            for s in specs_for_source(pristine) if len(s.shape) == 2 and "attn" in s.name}  # fmt: skip
    write_imatrix_gguf(path, sums, {n: np.ones(1) for n in sums}, ["test"], 1, 8)
    return path


SUGGEST_CASES: dict[str, tuple[list[str], str]] = {
    "no-types": (["--ram-budget", "1G", "--types", ","], "--types"),
    "ram-budget": (["--ram-budget", "1"], "--ram-budget is 1"),
    "vram-budget": (["--ram-budget", "1G", "--vram-budget", "1"], "--vram-budget is 1"),
    "chunks-zero": (["--ram-budget", "1G", "--chunks", "0"], "--chunks"),
    "ctx-tiny": (["--ram-budget", "1G", "--ctx", "2"], "--ctx"),
    "threads-zero": (["--ram-budget", "1G", "--threads", "0"], "--threads"),
    "imatrix-missing": (["--ram-budget", "1G", "--imatrix", "{tmp}/missing.gguf"], "missing.gguf"),
    "imatrix-without-experts": (["--ram-budget", "1G", "--imatrix", "{partial}", "--types", "iq2_xxs"],
                                "_exps.weight: type iq2_xxs cannot be quantized without an importance matrix"),
    "gptq-missing": (["--ram-budget", "1G", "--gptq", "{tmp}/cov.safetensors"], "cov.safetensors"),
}  # fmt: skip


@pytest.mark.parametrize("case", SUGGEST_CASES, ids=list(SUGGEST_CASES))
def test_suggest_checks_its_inputs_before_any_work(
    case: str, pristine: Path, tmp_path: Path, no_suggest_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    args, fragment = SUGGEST_CASES[case]
    partial = _partial_imatrix(pristine, tmp_path / "partial.gguf") if "{partial}" in args else None
    args = [a.format(tmp=tmp_path, partial=partial) for a in args]
    text = tmp_path / "calibration.txt"
    text.write_text("def f():\n    return 1\n" * 50, encoding="utf-8")
    assert main(["suggest", str(pristine), "--text", str(text), *args]) == 1
    _one_line_error(capsys.readouterr().err, fragment)


def _suggestion(imatrix: Path | None) -> Suggestion:
    result = EvalResult(tokens=100, chunks=1, ctx=256, kld_mean=0.01, kld_mean_unc=0.001, kld_median=0.01,
                        kld_p99=0.01, kld_p999=0.01, kld_max=0.01, top1=95.0, top1_unc=0.1, ppl_base=7.0,
                        ppl_base_unc=0.1, ppl_quant=7.1, ppl_quant_unc=0.1, ppl_ratio=1.01, ppl_ratio_unc=0.001)
    return Suggestion(rules=("class:routed_expert=iq4_xs",), allocation=Allocation((("g0", "iq4_xs"),), 1000, 0.01),
                      split=Split(10, 0, 1000), options=(Option("g0", "iq4_xs", 1000, 0.01),), uniform=None,
                      measured=result, imatrix=imatrix)  # fmt: skip


def test_suggested_build_names_an_imatrix_that_exists() -> None:
    # suggest's own imatrix lives in its scratch folder and is deleted: say so, and how to remake it
    collected = render(_suggestion(None), ctx=256, text=Path("cal text.txt")).splitlines()
    note = next(line for line in collected if line.startswith("IMATRIX.gguf:"))
    assert "did not keep" in note
    assert "`coder-quant imatrix BF16.gguf -o IMATRIX.gguf --ctx 256 --text 'cal text.txt'`" in note
    assert collected[-1].startswith("build: coder-quant build SRC_DIR OUT.gguf --recipe bf16 --imatrix IMATRIX.gguf ")
    # the caller's own imatrix is named as given, with no note
    own = render(_suggestion(Path("/data/my imatrix.gguf"))).splitlines()
    assert not any(line.startswith("IMATRIX.gguf:") for line in own)
    assert "--imatrix '/data/my imatrix.gguf' --rule" in own[-1]
