"""The plan: pure pricing of every tensor, totals, file size and placement split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantizer.arch import get_arch
from quantizer.cli import main
from quantizer.plan import make_plan, render_text
from quantizer.recipes import get_recipe
from quantizer.spec import TensorSpec
from quantizer.synthetic import write_checkpoint

TINY = [
    TensorSpec("token_embd.weight", ("model.embed_tokens.weight",), (1000, 288), "embedding", "bf16", "copy"),
    TensorSpec("blk.0.attn_norm.weight", ("n",), (288,), "norm", "f32", "add_one"),
    TensorSpec("blk.0.attn_q.weight", ("q",), (512, 288), "attention", "bf16", "copy"),
    TensorSpec("blk.0.ffn_gate_exps.weight", ("g0", "g1"), (2, 256, 512), "routed_expert", "bf16", "stack"),
    TensorSpec("blk.0.ffn_down_exps.weight", ("d0", "d1"), (2, 288, 256), "routed_expert", "bf16", "stack"),
    TensorSpec("blk.0.ffn_up_exps.weight", ("u0", "u1"), (2, 256, 288), "routed_expert", "bf16", "stack"),
]


def test_plan_prices_each_tensor_and_reports_fallbacks():
    plan = make_plan(TINY, get_recipe("attn-bf16-iq4xs"))
    by_name = {e.name: e for e in plan.entries}
    gate, up = by_name["blk.0.ffn_gate_exps.weight"], by_name["blk.0.ffn_up_exps.weight"]
    assert (gate.type, gate.nbytes, gate.fallback) == ("iq4_xs", 2 * 256 * (512 // 256 * 136), None)
    assert gate.gguf_shape == (512, 256, 2) and gate.rule == "routed experts -> iq4_xs"
    assert (up.type, up.nbytes) == ("iq4_nl", 2 * 256 * (288 // 32 * 18))
    assert up.fallback == "iq4_xs -> iq4_nl: 288 columns not a multiple of 256"
    assert by_name["blk.0.ffn_down_exps.weight"].type == "iq4_xs"  # 256 columns: no fallback
    assert by_name["blk.0.attn_q.weight"].nbytes == 512 * 288 * 2
    assert by_name["blk.0.attn_norm.weight"].nbytes == 288 * 4
    assert [e.name for e in plan.fallbacks()] == ["blk.0.ffn_up_exps.weight"]


def test_plan_totals_placement_and_file_size():
    plan = make_plan(TINY, get_recipe("attn-bf16-iq4xs"), metadata_bytes=1000)
    in_ram = [e for e in plan.entries if e.spec.tclass in ("routed_expert", "embedding")]
    assert {e.placement for e in in_ram} == {"ram"} and len(in_ram) == 4  # 3 expert tensors + token_embd
    assert plan.ram_bytes == sum(e.nbytes for e in in_ram)
    assert plan.gpu_bytes == plan.tensor_bytes - plan.ram_bytes == 288 * 4 + 512 * 288 * 2
    totals = {t.tclass: t for t in plan.class_totals()}
    assert totals["routed_expert"].tensors == 3 and totals["routed_expert"].params == 2 * 256 * (512 + 288 + 288)
    assert plan.params == sum(t.params for t in totals.values())
    padded = sum(-(-e.nbytes // 32) * 32 for e in plan.entries)
    infos = sum(8 + len(e.name) + 4 + 8 * len(e.spec.shape) + 4 + 8 for e in plan.entries)
    assert plan.header_bytes == -(-(24 + 1000 + infos) // 32) * 32
    assert plan.file_bytes == plan.header_bytes + padded


def test_plan_json_and_text():
    plan = make_plan(TINY, get_recipe("attn-bf16-iq3s", ["attn_q=q8_0"]))
    data = json.loads(plan.to_json())
    assert data["recipe"] == "attn-bf16-iq3s"
    row = next(t for t in data["tensors"] if t["name"] == "blk.0.attn_q.weight")
    assert row == {
        "name": "blk.0.attn_q.weight", "sources": ["q"], "shape": [288, 512], "class": "attention",
        "base_type": "bf16", "type": "q8_0", "bytes": 512 * 288 // 32 * 34, "params": 512 * 288,
        "rule": "--rule attn_q=q8_0", "fallback": None, "placement": "gpu",
    }  # fmt: skip
    assert data["placement"]["ram_bytes"] == plan.ram_bytes
    text = render_text(plan)
    assert "blk.0.ffn_up_exps.weight" in text and "iq3_s -> iq4_nl: 288 columns" in text
    assert "u0 (+1)" in text and "--gpu-layers attn" in text


# ---- Qwen3-Coder-Next, from its config.json: figures computed here from the architecture ----

CODER_NEXT_CONFIG = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "decoder_sparse_step": 1,
    "full_attention_interval": 4,
    "head_dim": 256,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 262144,
    "mlp_only_layers": [],
    "moe_intermediate_size": 512,
    "norm_topk_prob": True,
    "num_attention_heads": 16,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "num_hidden_layers": 48,
    "num_key_value_heads": 2,
    "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-06,
    "rope_theta": 5000000,
    "shared_expert_intermediate_size": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}


def coder_next_figures() -> dict[str, int]:
    """Parameter and byte counts of the GGUF, from the architecture's formulae."""
    c = CODER_NEXT_CONFIG
    h, n_layer, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    n_full = n_layer // c["full_attention_interval"]
    n_linear = n_layer - n_full
    key_dim = c["linear_num_key_heads"] * c["linear_key_head_dim"]
    value_dim = c["linear_num_value_heads"] * c["linear_value_head_dim"]
    conv_dim = 2 * key_dim + value_dim
    n_v = c["linear_num_value_heads"]
    q_dim, kv_dim = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    experts = n_layer * c["num_experts"] * 3 * h * c["moe_intermediate_size"]
    # f32 in the reference bf16 GGUF: norms, router, shared-expert gate, conv kernel, A, dt
    f32 = (
        h  # output_norm
        + n_layer * (2 * h + c["num_experts"] * h + h)  # attn/post norms, router, shared gate
        + n_full * 2 * c["head_dim"]  # q_norm, k_norm
        + n_linear * (conv_dim * c["linear_conv_kernel_dim"] + 2 * n_v + c["linear_value_head_dim"])
    )
    bf16 = (
        2 * vocab * h  # token_embd, output (untied)
        + n_layer * 3 * h * c["shared_expert_intermediate_size"]
        + n_full * (h * 2 * q_dim + 2 * h * kv_dim + q_dim * h)  # q (with gate), k, v, o
        + n_linear * (h * (conv_dim + value_dim) + h * 2 * n_v + value_dim * h)  # qkv+z, ba, out
    )
    return {
        "params": experts + f32 + bf16,
        "experts": experts,
        "non_expert_bytes": 4 * f32 + 2 * bf16,
        "tensors": 3 + n_linear * 18 + n_full * 16,
    }


@pytest.fixture(scope="module")
def coder_next_specs() -> list[TensorSpec]:
    return get_arch(CODER_NEXT_CONFIG).specs_from_config(CODER_NEXT_CONFIG)


def test_coder_next_parameter_count(coder_next_specs: list[TensorSpec]):
    want = coder_next_figures()
    plan = make_plan(coder_next_specs, get_recipe("bf16"))
    assert len(plan.entries) == want["tensors"] == 843
    assert plan.params == want["params"]
    assert 79.6e9 < plan.params < 79.7e9  # "80B"
    totals = {t.tclass: t for t in plan.class_totals()}
    assert totals["routed_expert"].params == want["experts"] == 77_309_411_328
    embd = 151936 * 2048 * 2  # token_embd, BF16: kept in RAM by llama.cpp
    assert plan.gpu_bytes == want["non_expert_bytes"] - embd
    assert 4.8e9 < want["non_expert_bytes"] < 4.9e9 and 4.2e9 < plan.gpu_bytes < 4.25e9


@pytest.mark.parametrize(
    ("recipe", "bits_gate_up", "bits_down", "low_gb", "high_gb"),
    [
        ("attn-bf16-iq4xs", 4.25, 4.25, 45.5, 46.5),
        ("attn-bf16-iq3s", 3.4375, 3.4375, 37.5, 38.5),
        ("attn-bf16-iq3s-down-iq4xs", 3.4375, 4.25, 40.5, 41.5),
        ("attn-bf16-iq4xs-down-q5k", 4.25, 5.5, 49.0, 50.0),
    ],
)
def test_coder_next_file_size(coder_next_specs, recipe, bits_gate_up, bits_down, low_gb, high_gb):
    want = coder_next_figures()
    plan = make_plan(coder_next_specs, get_recipe(recipe))
    expert_bytes = want["experts"] // 3 * (2 * bits_gate_up + bits_down) / 8
    embd = 151936 * 2048 * 2  # token_embd, BF16: kept in RAM by llama.cpp
    assert plan.ram_bytes == expert_bytes + embd
    assert plan.gpu_bytes == want["non_expert_bytes"] - embd  # everything but the routed experts is untouched
    assert plan.tensor_bytes == expert_bytes + want["non_expert_bytes"]
    # header: 151,936-token vocabulary (tokens, types, merges) and 843 tensor infos: a few MB
    assert 1e6 < plan.file_bytes - plan.tensor_bytes < 12e6
    assert low_gb * 1e9 < plan.file_bytes < high_gb * 1e9
    assert not plan.fallbacks()


def test_plan_command_on_config_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "config.json").write_text(json.dumps(CODER_NEXT_CONFIG))
    assert main(["plan", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recipe"] == "attn-bf16-iq4xs" and len(data["tensors"]) == 843
    assert data["placement"]["ram_bytes"] == coder_next_figures()["experts"] * 17 // 32 + 151936 * 2048 * 2
    assert main(["plan", str(tmp_path), "--recipe", "nope"]) == 1
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "missing")]) == 1


def test_plan_command_on_reference_model(reference_model: Path, capsys: pytest.CaptureFixture[str]):
    """Tensor data bytes are exact; the file estimate is near llama.cpp's (../shared/README.md)."""
    assert main(["plan", str(reference_model), "--recipe", "attn-bf16-iq4xs-mix", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["tensors"]) == 73
    assert abs(data["file_bytes_estimate"] - 12_027_104) / 12_027_104 < 0.005
    assert main(["plan", str(reference_model), "--recipe", "bf16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert abs(data["file_bytes_estimate"] - 33_285_376) / 33_285_376 < 0.005
    assert main(["plan", str(reference_model), "--summary"]) == 0
    assert "routed_expert" in capsys.readouterr().out


@pytest.mark.parametrize(("index", "message"), [
    ("{not json", "model.safetensors.index.json: not readable JSON"),
    ('{"weight_map": 5}', "model.safetensors.index.json: no usable weight_map"),
    ('{"weight_map": {"a": 1}}', "model.safetensors.index.json: no usable weight_map"),
])  # fmt: skip
def test_plan_command_on_a_bad_index(tmp_path: Path, capsys: pytest.CaptureFixture[str], index: str, message: str):
    (tmp_path / "config.json").write_text(json.dumps(CODER_NEXT_CONFIG))
    (tmp_path / "model.safetensors.index.json").write_text(index)
    assert main(["plan", str(tmp_path), "--summary"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"coder-quant: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("key", ["hidden_size", "num_experts", "linear_value_head_dim"])
def test_plan_command_refuses_a_config_missing_a_shape_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           key: str):
    # qwen3next would otherwise fill it with transformers' default (hidden_size 2048...) and price another model
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in CODER_NEXT_CONFIG.items() if k != key}))
    assert main(["plan", str(tmp_path), "--summary"]) == 1
    assert capsys.readouterr().err == f"coder-quant: error: {tmp_path / 'config.json'}: missing {key!r}, " \
                                      "needed to size the tensors\n"


def test_plan_command_checks_the_config_against_the_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = write_checkpoint(tmp_path / "tiny", preset="tiny", layers=2).path
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]  # the default, 2048, is not the checkpoint's 256: `build` refuses it too
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["plan", str(folder), "--summary"]) == 1
    assert "has shape [512, 256], config.json implies [512, 2048]" in capsys.readouterr().err
