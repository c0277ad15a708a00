"""`--gpu-layers auto` and the BF16 warning are pure functions: synthetic tensor lists and numbers,
then the wiring through Settings, the CLI's --plan and the loader's backend query (CPU build)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from server.placement import (
    MemoryShape,
    PlacementError,
    TensorInfo,
    parse_preset,
    plan_for_gguf,
    plan_placement,
)
from server.placement_auto import (
    HEADROOM_MIN,
    bf16_warning,
    choose_auto,
    compute_buffer_estimate,
    parse_compute_capability,
)
from server.settings import Settings

MIB = 1 << 20
EXPERT = 50 * MIB  # per expert tensor: 150 MiB of experts per layer
OTHER = 1 * MIB
LAYERS = 8
CTX = 4096


def tensors(layers: int = LAYERS, dtype: str = "BF16") -> list[TensorInfo]:
    out = [TensorInfo("token_embd.weight", dtype, (64, 1000), OTHER), TensorInfo("output.weight", dtype, (64, 1000), OTHER)]
    for il in range(layers):
        names = ("attn_q.weight", "ffn_gate_inp.weight", "ffn_up_shexp.weight",
                 "ffn_up_exps.weight", "ffn_gate_exps.weight", "ffn_down_exps.weight")
        out += [TensorInfo(f"blk.{il}.{n}", dtype, (64, 64), EXPERT if "_exps" in n else OTHER) for n in names]
    return out


def shape(layers: int = LAYERS) -> MemoryShape:
    return MemoryShape(n_layer_all=layers, n_nextn=0, recurrent=(False,) * layers, n_head_kv=(2,) * layers,
                       key_length=64, value_length=64, ctx_train=CTX, n_head=8)


def attn_gpu_bytes() -> int:
    return plan_placement(tensors(), shape(), parse_preset("attn"), CTX, True).gpu_bytes


def reserve() -> int:
    return choose_auto(tensors(), shape(), CTX, 1, None).reserve_bytes  # a small limit: fixed headroom


def expert_layers_on_gpu(choice) -> list[int]:
    plan = plan_placement(tensors(), shape(), choice.preset, CTX, True)
    return sorted({t.layer for t in plan.tensors if t.tclass == "routed_expert" and t.device == "gpu"})


# --- compute buffer estimate -------------------------------------------------------------------------


def test_compute_buffer_estimate_matches_the_h200_measurement():
    # Qwen3-Coder-Next, ctx 8192, n_ubatch 512: llama.cpp logged 678,418,186 bytes for CUDA0
    got = compute_buffer_estimate(2048, 151936, 16, 8192, 512, None)
    assert abs(got - 678_418_186) / 678_418_186 < 0.01
    assert compute_buffer_estimate(2048, 151936, 16, 8192, 1024, None) == 2 * got
    assert compute_buffer_estimate(2048, 151936, 16, 8192, 512, False) == got + 512 * 4 * 16 * 8192


# --- choose_auto ----------------------------------------------------------------------------------------


def test_everything_fits_means_all_experts_on_the_gpu():
    choice = choose_auto(tensors(), shape(), CTX, 1 << 40, None)
    assert choice.fits and choice.cpu_moe_layers == 0 and choice.preset.kind == "all"
    assert expert_layers_on_gpu(choice) == list(range(LAYERS))


def test_the_last_layers_experts_fill_what_is_left():
    limit = attn_gpu_bytes() + reserve() + 3 * 3 * EXPERT + EXPERT  # room for 3 layers and a bit
    choice = choose_auto(tensors(), shape(), CTX, limit, None)
    assert choice.fits and choice.cpu_moe_layers == LAYERS - 3
    assert (choice.preset.kind, choice.preset.cpu_moe_layers) == ("attn", LAYERS - 3)
    assert expert_layers_on_gpu(choice) == [5, 6, 7]
    assert choice.gpu_bytes + choice.reserve_bytes <= limit
    assert choice.gpu_bytes + 3 * EXPERT + choice.reserve_bytes > limit  # one more layer would not fit


def test_budget_caps_the_free_memory():
    limit = attn_gpu_bytes() + reserve() + 2 * 3 * EXPERT
    by_budget = choose_auto(tensors(), shape(), CTX, 1 << 40, limit)
    by_free = choose_auto(tensors(), shape(), CTX, limit, None)
    assert by_budget.cpu_moe_layers == by_free.cpu_moe_layers == LAYERS - 2
    assert by_budget.limit_bytes == limit
    assert choose_auto(tensors(), shape(), CTX, limit, 0).cpu_moe_layers == LAYERS - 2  # 0: no cap
    assert choose_auto(tensors(), shape(), CTX, None, limit).cpu_moe_layers == LAYERS - 2  # budget alone


def test_no_room_for_experts_is_attn():
    choice = choose_auto(tensors(), shape(), CTX, attn_gpu_bytes() + reserve() + EXPERT, None)
    assert choice.fits and choice.cpu_moe_layers == LAYERS and choice.preset.kind == "attn"
    assert choice.preset.cpu_moe_layers is None and expert_layers_on_gpu(choice) == []


def test_non_expert_part_too_big_falls_back_to_fewer_layers():
    limit = attn_gpu_bytes() + reserve() - 1
    choice = choose_auto(tensors(), shape(), CTX, limit, None)
    assert not choice.fits and choice.preset.kind == "layers" and choice.preset.n_gpu_layers < LAYERS + 1
    assert "exceed" in choice.reason and expert_layers_on_gpu(choice) == []
    assert choice.gpu_bytes + choice.reserve_bytes <= limit


def test_nothing_fits_is_cpu_only():
    choice = choose_auto(tensors(), shape(), CTX, HEADROOM_MIN, None)
    assert not choice.fits and choice.preset.kind == "none" and choice.gpu_bytes == 0


def test_unknown_limit_is_attn_with_a_reason():
    choice = choose_auto(tensors(), shape(), CTX, None, None)
    assert not choice.fits and choice.preset.kind == "attn" and "unknown" in choice.reason


# --- presets, settings, CLI -------------------------------------------------------------------------


def test_auto_preset_parses_and_must_be_resolved():
    assert parse_preset("auto").kind == "auto"
    with pytest.raises(PlacementError, match="cpu_moe_layers"):
        parse_preset("auto", 3)
    with pytest.raises(PlacementError, match="resolved"):
        plan_placement(tensors(), shape(), parse_preset("auto"), CTX, True)
    cpu = plan_placement(tensors(), shape(), parse_preset("auto"), CTX, False)  # no GPU backend: CPU
    assert cpu.preset_effective == "none" and cpu.gpu_bytes == 0


def test_settings_take_auto_and_a_budget():
    s = Settings(gpu_layers="auto", vram_budget="24GiB")
    assert (s.gpu_layers, s.vram_budget) == ("auto", 24 << 30)
    assert Settings(vram_budget="500MB").vram_budget == 500_000_000
    assert Settings().vram_budget == 0
    for bad in ("lots", "-1GiB"):
        with pytest.raises(ValidationError):
            Settings(vram_budget=bad)


def test_plan_for_gguf_resolves_auto(test_gguf: Path):
    settings = SimpleNamespace(gpu_layers="auto", cpu_moe_layers=0, ctx_size=512, vram_budget=0)
    plan = plan_for_gguf(test_gguf, settings, gpu_backend=True, free_bytes=1 << 40)
    assert plan.preset_requested == "auto" and plan.preset_effective == "all"
    assert plan.auto is not None and plan.auto["fits"] and plan.auto["cpu_moe_layers"] == 0
    assert all(t.device == "gpu" for t in plan.tensors if t.tclass == "routed_expert")
    assert "auto:" in plan.render() and json.dumps(plan.to_json())


def test_cli_plan_with_auto_on_a_cpu_build(test_gguf: Path, capsys: pytest.CaptureFixture[str]):
    from server.cli import main

    assert main([str(test_gguf), "--plan", "--json", "--gpu-layers", "auto", "--vram-budget", "2GiB"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["preset_requested"], plan["preset_effective"], plan["gpu_bytes"]) == ("auto", "none", 0)


def test_backend_query_finds_no_gpu_on_a_cpu_build():
    import llama_cpp

    from server.loader import gpu_free_bytes

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build has a GPU backend")
    assert gpu_free_bytes() is None


# --- BF16 warning --------------------------------------------------------------------------------------


def test_compute_capability_from_the_cuda_log():
    text = ("ggml_cuda_init: found 2 CUDA devices:\n"
            "  Device 0: NVIDIA H200, compute capability 9.0, VMM: yes, VRAM: 143167 MiB\n"
            "  Device 1: Tesla T4, compute capability 7.5, VMM: yes, VRAM: 15095 MiB\n")
    assert parse_compute_capability(text) == (7, 5)
    assert parse_compute_capability("load_tensors: CPU_Mapped model buffer size = 1.00 MiB") is None


@pytest.mark.parametrize(
    ("cc", "types", "warns"),
    [((7, 5), {"BF16", "IQ4_XS"}, True), ((6, 1), {"bf16"}, True), ((8, 0), {"BF16"}, False),
     ((9, 0), {"BF16"}, False), ((7, 5), {"F16", "Q8_0"}, False), (None, {"BF16"}, False)],
)
def test_bf16_warning(cc, types, warns):
    message = bf16_warning(cc, types)
    assert (message is not None) == warns
    if message:
        assert "no longer bit-for-bit" in message and "--recipe attn-f16-iq4xs" in message
        assert f"more than {8 if cc >= (7, 0) else 128} tokens" in message and "decoding" in message


@pytest.mark.parametrize(("recipe", "warns"), [("attn-bf16-iq4xs", True), ("attn-f16-iq4xs", False),
                                               ("attn-q8-iq4xs", False)])
def test_the_recipes_the_warning_names_put_no_bf16_on_the_gpu(recipe, warns):
    """Qwen3-Coder-Next's tensors under `attn`, planned with each recipe, as a pre-Ampere GPU sees them."""
    from quantizer.arch import get_arch
    from quantizer.plan import make_plan
    from quantizer.recipes import get_recipe
    from quantizer.synthetic import config_json, resolve_shape
    from server.placement import MemoryShape, TensorInfo, parse_preset, plan_placement

    config = config_json(resolve_shape("coder-next", {"layers": 4}), "bf16")
    entries = make_plan(get_arch(config).specs_from_config(config), get_recipe(recipe)).entries
    tensors = [TensorInfo(e.name, e.type, e.gguf_shape, e.nbytes) for e in entries]
    shape = MemoryShape(n_layer_all=4, n_nextn=0, recurrent=(True, True, True, False), n_head_kv=(2,) * 4,
                        key_length=256, value_length=256, ssm_conv_kernel=4, ssm_inner_size=32 * 128,
                        ssm_state_size=128, ssm_group_count=16, ctx_train=262144)
    plan = plan_placement(tensors, shape, parse_preset("attn"), 4096, gpu_backend=True)
    gpu_types = {t.ggml_type for t in plan.tensors if t.device == "gpu"}
    assert (bf16_warning((7, 5), gpu_types) is not None) == warns
    assert "IQ4_XS" in {t.ggml_type.upper() for t in plan.tensors if t.device == "cpu"}
