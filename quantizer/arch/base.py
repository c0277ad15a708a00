"""Conversion rules shared by every architecture, as llama.cpp's reference converter applies them.

Reference: convert_hf_to_gguf.py (ModelBase.prepare_tensors for tensor types, TextModel for the
generic hyper-parameters, gguf-py's Metadata for the general.* keys), run with `--outtype bf16`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_TENSOR

logger = logging.getLogger(__name__)

# Tensors the reference always writes as F32 whatever the outtype (prepare_tensors' fixed list,
# restricted to the kinds gguf-py knows here); 1-D tensors and "*_norm.weight" are F32 too.
F32_TENSOR_KINDS: frozenset[MODEL_TENSOR] = frozenset(
    kind
    for kind in (
        getattr(MODEL_TENSOR, name, None)
        for name in (
            "FFN_GATE_INP",
            "FFN_GATE_INP_SHEXP",
            "POS_EMBD",
            "TOKEN_TYPES",
            "SSM_CONV1D",
            "SHORTCONV_CONV",
            "TIME_MIX_FIRST",
            "TIME_MIX_W1",
            "TIME_MIX_W2",
            "TIME_MIX_DECAY_W1",
            "TIME_MIX_DECAY_W2",
            "TIME_MIX_LERP_FUSED",
        )
    )
    if kind is not None
)


def reference_type(gguf_name: str, kind: MODEL_TENSOR, n_dims: int) -> str:
    """The type the reference converter gives a tensor with `--outtype bf16`."""
    if n_dims <= 1 or gguf_name.endswith("_norm.weight"):
        return "f32"
    if kind in F32_TENSOR_KINDS or not gguf_name.endswith(".weight"):
        return "f32"
    return "bf16"


BLOCK = 1 << 22  # elements per step of the bit-level conversions, to keep temporaries small


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 words, nearest-even, NaN made quiet (ggml_compute_fp32_to_bf16)."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32)
    out = np.empty(flat.shape, dtype=np.uint16)
    for lo in range(0, flat.size, BLOCK):
        bits = flat[lo : lo + BLOCK]
        nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        if nan.any():
            bits = np.where(nan, (bits & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), bits)
        # no uint32 overflow: only NaN patterns lie within 0x8000 of 2**32, and they were cleared
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        out[lo : lo + BLOCK] = rounded >> np.uint32(16)
    return out.reshape(np.shape(values))


def quiet_bf16(words: np.ndarray) -> np.ndarray:
    """bf16 -> f32 -> bf16 as the reference does it: the identity except NaNs get the quiet bit.

    `words` must be C-contiguous; it is changed in place if writeable and holding NaNs."""
    flat = words.reshape(-1)
    for lo in range(0, flat.size, BLOCK):
        nan = (flat[lo : lo + BLOCK] & np.uint16(0x7FFF)) > np.uint16(0x7F80)
        if nan.any():
            if not flat.flags.writeable:
                flat = flat.copy()
            flat[lo : lo + BLOCK][nan] |= np.uint16(0x0040)
    return flat.reshape(words.shape)


def bf16_to_f32(words: np.ndarray) -> np.ndarray:
    out = np.empty(np.shape(words), dtype=np.uint32)
    np.left_shift(words, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """config's rope_parameters (or rope_scaling), with top-level rope keys mirrored in (TextModel)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in params or "sliding_attention" in params:
        return params
    mirrored = {
        "rope_theta": ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"),
        "partial_rotary_factor": ("partial_rotary_factor", "rope_pct", "rope_percent"),
        "original_max_position_embeddings": ("original_max_position_embeddings",),
    }
    local = find(config, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"))
    if local is not None:
        params["sliding_attention"] = {"rope_theta": local}
    for key, candidates in mirrored.items():
        value = find(config, candidates)
        if key not in params and value is not None:
            params[key] = value
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


def find(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """First of `keys` present in config (the reference's find_hparam(optional=True))."""
    return next((config[key] for key in keys if key in config), None)


def add_text_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], block_count: int, file_type: int) -> None:
    """Generic hyper-parameters, in the reference's order (TextModel.set_gguf_parameters)."""
    writer.add_block_count(block_count)
    scalar_keys = (
        (writer.add_context_length, ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length")),
        (writer.add_embedding_length, ("hidden_size", "n_embd", "dim")),
        (writer.add_feed_forward_length, ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim")),
        (writer.add_head_count, ("num_attention_heads", "n_head", "n_heads")),
        (writer.add_head_count_kv, ("num_key_value_heads", "n_kv_heads")),
    )
    for add, keys in scalar_keys:
        if (value := find(config, keys)) is not None:
            add(value)
    if config.get("is_causal") is False:
        writer.add_causal_attention(False)
    rope = rope_parameters(config)
    rope_full = rope.get("full_attention", rope)
    _add_rope_scaling(writer, rope_full)
    if (theta := rope_full.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (theta_swa := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(theta_swa)
    if (eps := find(config, ("rms_norm_eps", "norm_eps"))) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (eps := find(config, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        writer.add_layer_norm_eps(eps)
    if (n_expert := find(config, ("num_local_experts", "num_experts", "n_routed_experts"))) is not None:
        writer.add_expert_count(n_expert)
    if (n_used := find(config, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))) is not None:
        writer.add_expert_used_count(n_used)
    if (head_dim := config.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)


def _add_rope_scaling(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        optional = (
            (writer.add_rope_scaling_yarn_ext_factor, rope.get("extrapolation_factor")),
            (writer.add_rope_scaling_yarn_attn_factor, rope.get("attention_factor", rope.get("attn_factor"))),
            (writer.add_rope_scaling_yarn_beta_fast, rope.get("beta_fast")),
            (writer.add_rope_scaling_yarn_beta_slow, rope.get("beta_slow")),
        )
        for add, value in optional:
            if value is not None:
                add(value)
    elif rope_type in ("su", "longrope"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif rope_type not in (None, "default", "dynamic", "llama3"):
        logger.warning("unknown RoPE type %r: no rope scaling written", rope_type)


def add_general_metadata(writer: gguf.GGUFWriter, model_dir: Path) -> None:
    """general.type/name/size_label/... exactly as the reference derives them (gguf-py Metadata).

    Needs every tensor info already added to `writer` (the size label counts parameters).
    """
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, model_dir, None, total)
    if metadata.name is None:
        metadata.name = model_dir.name
    if metadata.sampling_penalty_repeat is None:
        # newer gguf-py also reads the Hugging Face spelling of the repeat penalty
        metadata.sampling_penalty_repeat = _generation_config(model_dir).get("repetition_penalty")
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)


def _generation_config(model_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
