"""Placement is a pure function: these tests build tensor lists by hand, except the last ones, which
read a GGUF that coder-quant builds from a synthetic checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from server.placement import (
    EXPERT_PATTERN,
    MemoryShape,
    PlacementError,
    TensorInfo,
    cpu_override_patterns,
    layer_on_gpu,
    memory_shape_from_fields,
    padded_ctx,
    parse_preset,
    plan_for_gguf,
    plan_placement,
    read_gguf,
    tensor_class,
)

LINEAR = ("attn_qkv.weight", "attn_gate.weight", "ssm_a", "ssm_conv1d.weight", "ssm_dt.bias", "ssm_ba.weight",
          "ssm_norm.weight", "ssm_out.weight")
FULL = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_q_norm.weight",
        "attn_k_norm.weight")
COMMON = ("attn_norm.weight", "post_attention_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight",
          "ffn_up_shexp.weight", "ffn_gate_shexp.weight", "ffn_down_shexp.weight", "ffn_up_exps.weight",
          "ffn_gate_exps.weight", "ffn_down_exps.weight")


def qwen3next_tensors(layers: int, nextn: int = 0) -> list[TensorInfo]:
    """A qwen3next tensor list: every 4th layer full attention; experts 1000 bytes, the rest 10."""
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for il in range(layers + nextn):
        own = FULL if (il + 1) % 4 == 0 or il >= layers else LINEAR
        names += [f"blk.{il}.{suffix}" for suffix in own + COMMON]
        if il >= layers:
            names.append(f"blk.{il}.nextn.eh_proj.weight")
    return [TensorInfo(n, "BF16", (1,), 1000 if "_exps" in n else 10) for n in names]


def qwen3next_shape(layers: int, nextn: int = 0, **changes: int) -> MemoryShape:
    """Qwen3-Coder-Next's attention and linear-attention hyperparameters."""
    fields = dict(
        n_layer_all=layers + nextn, n_nextn=nextn,
        recurrent=tuple(il < layers and (il + 1) % 4 != 0 for il in range(layers + nextn)),
        n_head_kv=(2,) * (layers + nextn), key_length=256, value_length=256, ssm_conv_kernel=4,
        ssm_inner_size=4096, ssm_state_size=128, ssm_group_count=16, ctx_train=262144,
    )
    fields.update(changes)
    return MemoryShape(**fields)


def devices(plan) -> dict[str, str]:
    return {t.name: t.device for t in plan.tensors}


# --- presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind", "ngl"),
    [("attn", "attn", -1), ("all", "all", -1), ("none", "none", 0), ("12", "layers", 12), (0, "layers", 0),
     (None, "attn", -1), (" ALL ", "all", -1)],
)
def test_parse_preset(value, kind, ngl):
    preset = parse_preset(value)
    assert (preset.kind, preset.n_gpu_layers) == (kind, ngl)


@pytest.mark.parametrize("value", ["gpu", "-1", "1.5", "", "100001", "attn,all"])
def test_parse_preset_rejects(value):
    with pytest.raises(PlacementError, match="gpu_layers"):
        parse_preset(value)


@pytest.mark.parametrize("value", ["100001", "99999999", "9" * 5000])
def test_a_layer_count_over_the_bound_says_so(value):
    with pytest.raises(PlacementError, match="gpu_layers must be at most 100000"):
        parse_preset(value)


@pytest.mark.parametrize("value", [-1, 100_001, 1.5, True])
def test_parse_preset_rejects_cpu_moe_layers(value):
    with pytest.raises(PlacementError, match="cpu_moe_layers"):
        parse_preset("attn", value)


# --- llama.cpp's rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ngl", "on_gpu"),
    [
        (0, []),
        (1, [4]),  # -ngl 1 offloads only the output layer (index n_layer)
        (2, [3, 4]),  # then the last repeating layers, counted from the end
        (4, [1, 2, 3, 4]),
        (5, [0, 1, 2, 3, 4]),
        (99, [0, 1, 2, 3, 4]),
        (-1, [0, 1, 2, 3, 4]),
    ],
)
def test_layer_split_mirrors_llama_cpp(ngl, on_gpu):
    assert [il for il in range(5) if layer_on_gpu(il, 4, ngl, True)] == on_gpu
    assert not any(layer_on_gpu(il, 4, ngl, False) for il in range(5))


def test_expert_pattern_is_llama_cpps():
    # common/common.h: LLM_FFN_EXPS_REGEX and llm_ffn_block_regex
    assert EXPERT_PATTERN == r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
    (pattern,) = cpu_override_patterns(parse_preset("attn", 2), 48)
    matches = [n for n in ("blk.0.ffn_up_exps.weight", "blk.1.ffn_gate_up_exps.weight", "blk.1.ffn_down_chexps.weight",
                           "blk.11.ffn_up_exps.weight", "blk.2.ffn_up_exps.weight", "blk.1.ffn_up_shexp.weight",
                           "blk.10.ffn_gate_exps.weight")
               if re.search(pattern, n)]
    assert matches == ["blk.0.ffn_up_exps.weight", "blk.1.ffn_gate_up_exps.weight", "blk.1.ffn_down_chexps.weight"]


@pytest.mark.parametrize(
    ("name", "tclass"),
    [("token_embd.weight", "embedding"), ("output.weight", "output"), ("output_norm.weight", "norm"),
     ("blk.3.attn_q.weight", "attention"), ("blk.3.attn_k_norm.weight", "attention"),
     ("blk.0.attn_qkv.weight", "ssm"), ("blk.0.attn_gate.weight", "ssm"), ("blk.0.ssm_a", "ssm"),
     ("blk.0.ffn_up_exps.weight", "routed_expert"), ("blk.0.ffn_gate_inp_shexp.weight", "shared_expert"),
     ("blk.0.ffn_gate_inp.weight", "router"), ("blk.0.post_attention_norm.weight", "norm")],
)
def test_tensor_class(name, tclass):
    assert tensor_class(name) == tclass


# --- plans --------------------------------------------------------------------------------------


def test_attn_keeps_routed_experts_and_embeddings_in_ram():
    plan = plan_placement(qwen3next_tensors(8), qwen3next_shape(8), parse_preset("attn"), 4096, True)
    on_cpu = {n for n, d in devices(plan).items() if d == "cpu"}
    assert on_cpu == {"token_embd.weight"} | {f"blk.{i}.ffn_{p}_exps.weight" for i in range(8)
                                               for p in ("up", "gate", "down")}
    assert plan.by_class("cpu") == {"routed_expert": 24 * 1000, "embedding": 10}
    assert plan.overrides == (EXPERT_PATTERN,)
    assert all(c.device == "gpu" for c in plan.caches)  # every layer is offloaded, so are its caches


def test_all_and_none():
    tensors, shape = qwen3next_tensors(8), qwen3next_shape(8)
    everything = plan_placement(tensors, shape, parse_preset("all"), 4096, True)
    assert [n for n, d in devices(everything).items() if d == "cpu"] == ["token_embd.weight"]
    nothing = plan_placement(tensors, shape, parse_preset("none"), 4096, True)
    assert set(devices(nothing).values()) == {"cpu"} and nothing.gpu_bytes == 0
    assert nothing.cpu_bytes == everything.cpu_bytes + everything.gpu_bytes


def test_cpu_moe_layers_keeps_only_the_first_layers_experts():
    plan = plan_placement(qwen3next_tensors(8), qwen3next_shape(8), parse_preset("attn", 3), 4096, True)
    expert_layers = {int(n.split(".")[1]) for n, d in devices(plan).items() if "_exps" in n and d == "cpu"}
    assert expert_layers == {0, 1, 2}
    # 0 means "not given" (the settings default): attn keeps every layer's experts in RAM
    default = plan_placement(qwen3next_tensors(8), qwen3next_shape(8), parse_preset("attn", 0), 4096, True)
    assert default.overrides == (EXPERT_PATTERN,)


def test_layer_count_preset():
    plan = plan_placement(qwen3next_tensors(8), qwen3next_shape(8), parse_preset("3"), 4096, True)
    gpu = {n for n, d in devices(plan).items() if d == "gpu"}
    assert {"output.weight", "output_norm.weight"} <= gpu
    assert {int(n.split(".")[1]) for n in gpu if n.startswith("blk.")} == {6, 7}
    assert [c.layer for c in plan.caches if c.device == "gpu"] == [6, 7]
    assert plan.gpu_layer_count() == 3


def test_no_gpu_backend_falls_back_to_cpu():
    plan = plan_placement(qwen3next_tensors(4), qwen3next_shape(4), parse_preset("attn"), 4096, False)
    assert (plan.preset_requested, plan.preset_effective, plan.overrides) == ("attn", "none", ())
    assert plan.gpu_bytes == 0 and set(devices(plan).values()) == {"cpu"}
    assert "requested attn" in plan.render()


def test_cache_sizes_of_qwen3_coder_next():
    # 48 layers, every 4th full attention: 12 KV layers, 36 recurrent ones
    plan = plan_placement(qwen3next_tensors(48), qwen3next_shape(48), parse_preset("attn"), 262144, True)
    # K and V: 2 KV heads x 256 dims, F16, per full-attention layer and cell
    assert plan.cache_bytes("kv", "gpu") == 12 * 2 * (2 * 256) * 2 * 262144 == 6 << 30
    # conv state 3 x (4096 + 2*16*128) and SSM state 128 x 4096, F32, per linear-attention layer
    assert plan.cache_bytes("recurrent", "gpu") == 36 * 4 * (3 * 8192 + 128 * 4096)


def test_context_is_padded_like_llama_cpp():
    shape = qwen3next_shape(4)
    assert padded_ctx(1000, shape) == 1024
    assert padded_ctx(4096, shape) == 4096
    assert padded_ctx(0, shape) == 262144  # 0: the model's trained length
    for bad in (-1, 1 << 23, 2.5, None):
        with pytest.raises(PlacementError, match="ctx_size"):
            padded_ctx(bad, shape)


def test_mtp_layers_are_not_loaded():
    plan = plan_placement(qwen3next_tensors(4, nextn=1), qwen3next_shape(4, nextn=1), parse_preset("attn"), 512, True)
    assert plan.skipped and all(n.startswith("blk.4.") for n in plan.skipped)
    assert not any(t.layer == 4 for t in plan.tensors)
    assert [c.layer for c in plan.caches] == [0, 1, 2, 3]
    # llama.cpp counts the MTP layer in n_layer for -ngl: 1 offloads only the output layer
    one = plan_placement(qwen3next_tensors(4, nextn=1), qwen3next_shape(4, nextn=1), parse_preset("1"), 512, True)
    assert {t.name for t in one.tensors if t.device == "gpu"} == {"output.weight", "output_norm.weight"}


def test_tensor_beyond_block_count_is_an_error():
    with pytest.raises(PlacementError, match=r"blk\.4\..* 4 layers"):
        plan_placement(qwen3next_tensors(10), qwen3next_shape(4), parse_preset("attn"), 512, True)


def test_json_is_complete_and_consistent():
    plan = plan_placement(qwen3next_tensors(8), qwen3next_shape(8), parse_preset("attn"), 4096, True)
    data = json.loads(json.dumps(plan.to_json()))
    for device in ("gpu", "cpu"):
        tensor_sum = sum(t["bytes"] for t in data["tensors"] if t["device"] == device)
        assert tensor_sum == data["weights"][device]["total"]
        assert data[f"{device}_bytes"] == tensor_sum + data["kv_cache"][device] + data["recurrent_state"][device]
    assert {t["device"] for t in data["tensors"]} == {"gpu", "cpu"}
    assert len(data["tensors"]) == len(qwen3next_tensors(8))


def test_memory_shape_from_metadata():
    fields = {
        "general.architecture": "qwen3next", "qwen3next.block_count": 8, "qwen3next.embedding_length": 2048,
        "qwen3next.attention.head_count": 16, "qwen3next.attention.head_count_kv": [2] * 8,
        "qwen3next.attention.key_length": 256, "qwen3next.context_length": 262144,
    }
    shape = memory_shape_from_fields(fields)
    # no recurrent_layers key: llama.cpp's rule, every full_attention_interval-th layer (default 4) is full
    assert shape.recurrent == (True, True, True, False) * 2
    assert shape.n_head_kv == (2,) * 8 and shape.key_length == 256
    assert shape.value_length == 2048 // 16  # default: n_embd / n_head
    for broken, message in (
        ({"qwen3next.block_count": None}, "block_count"),
        ({"qwen3next.attention.head_count_kv": [2] * 7}, "head_count_kv"),
        ({"qwen3next.nextn_predict_layers": 8}, "nextn_predict_layers"),
        ({"general.architecture": None}, "architecture"),
        # fewer layers than the interval: no full-attention layer, which llama.cpp aborts on
        ({"qwen3next.block_count": 3, "qwen3next.attention.head_count_kv": [2] * 3}, "no full-attention layer"),
        ({"qwen3next.full_attention_interval": 9}, "no full-attention layer"),
    ):
        with pytest.raises(PlacementError, match=message):
            memory_shape_from_fields(fields | broken)


# --- a real GGUF --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(test_gguf: Path) -> Path:
    """The session's GGUF (tests/server/conftest.py): the reference model built by coder-quant when
    ../shared is present, else a synthetic "tiny" checkpoint; 4 layers either way."""
    return test_gguf


def test_read_gguf_header(tiny_gguf):
    from gguf import GGUFReader

    tensors, shape = read_gguf(tiny_gguf)
    reader = GGUFReader(tiny_gguf)
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    assert sum(t.nbytes for t in tensors) == sum(int(t.n_bytes) for t in reader.tensors)
    assert shape.n_layer_all == 4 and shape.recurrent == (True, True, True, False)


def test_plan_for_gguf_reads_settings(tiny_gguf):
    settings = SimpleNamespace(gpu_layers="attn", cpu_moe_layers=None, ctx_size=300)
    plan = plan_for_gguf(tiny_gguf, settings, gpu_backend=True)
    assert plan.ctx_size == 512
    experts = [t for t in plan.tensors if t.tclass == "routed_expert"]
    assert len(experts) == 12 and all(t.device == "cpu" for t in experts)
    assert plan.gpu_bytes > 0


def test_plan_for_missing_or_bad_file(tmp_path):
    settings = SimpleNamespace(gpu_layers="attn", ctx_size=512)
    with pytest.raises(PlacementError, match="not found"):
        plan_for_gguf(tmp_path / "absent.gguf", settings, gpu_backend=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(PlacementError, match="not a readable GGUF"):
        plan_for_gguf(junk, settings, gpu_backend=False)
