"""Conversion rules shared by every architecture, as llama.cpp's reference converter applies them.

Reference: convert_hf_to_gguf.py (ModelBase.prepare_tensors for tensor types, TextModel for the
generic hyper-parameters, gguf-py's Metadata for the general.* keys), run with `--outtype bf16`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_TENSOR

from quantizer.errors import CheckpointError

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


# config.json spellings of each generic hyper-parameter, first present wins (TextModel's find_hparam)
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length")
EMBEDDING_LENGTH_KEYS = ("hidden_size", "n_embd", "dim")
FEED_FORWARD_KEYS = ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim")
HEAD_COUNT_KEYS = ("num_attention_heads", "n_head", "n_heads")
HEAD_COUNT_KV_KEYS = ("num_key_value_heads", "n_kv_heads")
RMS_EPS_KEYS = ("rms_norm_eps", "norm_eps")
LAYER_NORM_EPS_KEYS = ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
EXPERT_USED_KEYS = ("num_experts_per_tok", "num_experts_per_token", "top_k_experts")
# top-level keys mirrored into the rope parameters (TextModel)
ROPE_MIRRORED_KEYS: dict[str, tuple[str, ...]] = {
    "rope_theta": ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"),
    "partial_rotary_factor": ("partial_rotary_factor", "rope_pct", "rope_percent"),
    "original_max_position_embeddings": ("original_max_position_embeddings",),
}
LOCAL_ROPE_THETA_KEYS = ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq")
YARN_FLOAT_KEYS = ("extrapolation_factor", "attention_factor", "attn_factor", "beta_fast", "beta_slow")


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """config's rope_parameters (or rope_scaling), with top-level rope keys mirrored in (TextModel)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in params or "sliding_attention" in params:
        return params
    local = find(config, LOCAL_ROPE_THETA_KEYS)
    if local is not None:
        params["sliding_attention"] = {"rope_theta": local}
    for key, candidates in ROPE_MIRRORED_KEYS.items():
        value = find(config, candidates)
        if key not in params and value is not None:
            params[key] = value
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


def find(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """First of `keys` present in config (the reference's find_hparam(optional=True))."""
    return next((config[key] for key in keys if key in config), None)


def found_key(config: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """Which of `keys` find() reads, to name it in an error."""
    return next((key for key in keys if key in config), None)


# ---- checks: the writer packs these as uint32 / float32, and llama.cpp asserts on some ranges ----

UINT32_MAX = 2**32 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


class HyperParameterError(CheckpointError):
    """A config.json hyper-parameter of the wrong type or out of range; `key` names it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config.json: {key} {problem}")
        self.key = key


def check_int(key: str, value: Any, minimum: int = 1, maximum: int = UINT32_MAX) -> int:
    """An integer (not a bool, not 2048.0: the writer packs it as uint32) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise HyperParameterError(key, f"must be an integer, got {value!r}")
    if value < minimum:
        raise HyperParameterError(key, f"must be at least {minimum}, got {value}")
    if value > maximum:
        raise HyperParameterError(key, f"must be at most {maximum}, got {value}")
    return value


def check_float(key: str, value: Any, *, positive: bool = True, at_most: float = FLOAT32_MAX) -> float:
    """A finite number that fits a float32, above 0 when `positive`, at most `at_most`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HyperParameterError(key, f"must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise HyperParameterError(key, f"must be above 0, got {value!r}")
    if value > at_most:
        raise HyperParameterError(key, f"must be at most {at_most:g}, got {value!r}")
    if value < -FLOAT32_MAX:
        raise HyperParameterError(key, f"must fit a float32, got {value!r}")
    return float(value)


def _check_signed(key: str, value: Any) -> float:
    return check_float(key, value, positive=False)


def _check_fraction(key: str, value: Any) -> float:
    return check_float(key, value, at_most=1.0)


# RoPE values by meaning: theta and scale factors positive, partial_rotary_factor in (0, 1]
ROPE_CHECKS: dict[str, Callable[[str, Any], object]] = {
    "rope_theta": check_float,
    "partial_rotary_factor": _check_fraction,
    "original_max_position_embeddings": check_int,
    "factor": check_float,
    **{key: _check_signed for key in YARN_FLOAT_KEYS},
}


def check_text_hparams(config: dict[str, Any]) -> None:
    """Every generic hyper-parameter add_text_hparams writes has a type and range GGUF and llama.cpp take.

    Called where config.json is read, so plan, build and verify refuse a bad value before any tensor."""
    for keys, minimum in ((CONTEXT_LENGTH_KEYS, 1), (EMBEDDING_LENGTH_KEYS, 1), (FEED_FORWARD_KEYS, 0),
                          (HEAD_COUNT_KEYS, 1), (HEAD_COUNT_KV_KEYS, 1), (EXPERT_COUNT_KEYS, 0)):  # fmt: skip
        if (value := find(config, keys)) is not None:
            check_int(str(found_key(config, keys)), value, minimum)
    if (head_dim := config.get("head_dim")) is not None:
        check_int("head_dim", head_dim)
    for keys in (RMS_EPS_KEYS, LAYER_NORM_EPS_KEYS):
        if (eps := find(config, keys)) is not None:
            check_float(str(found_key(config, keys)), eps)
    if (n_used := find(config, EXPERT_USED_KEYS)) is not None:
        # llama.cpp: GGML_ASSERT(n_expert_used <= n_expert), and n_expert_used > 0 when n_expert > 0
        n_expert = find(config, EXPERT_COUNT_KEYS) or 0
        used_key = str(found_key(config, EXPERT_USED_KEYS))
        check_int(used_key, n_used, 1 if n_expert else 0)
        if n_used > n_expert:
            raise HyperParameterError(used_key, f"must be at most {found_key(config, EXPERT_COUNT_KEYS) or 'the expert count'} "
                                                f"({n_expert}), got {n_used}")
    check_rope(config)


def _check_rope_section(where: str, section: Any) -> None:
    if not isinstance(section, dict):
        raise HyperParameterError(where, f"must be an object, got {section!r}")
    for key, check in ROPE_CHECKS.items():
        if (value := section.get(key)) is not None:
            check(f"{where}.{key}", value)


def check_rope(config: dict[str, Any]) -> None:
    """RoPE values wherever rope_parameters() may read them: the rope object, its per-attention
    sections, and the top-level spellings mirrored into it."""
    container = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    if (params := config.get(container)) is not None:
        _check_rope_section(container, params)
        for sub in ("full_attention", "sliding_attention"):
            if sub in params:
                _check_rope_section(f"{container}.{sub}", params[sub])
    top_level = [*((key, meaning) for meaning, keys in ROPE_MIRRORED_KEYS.items() for key in keys),
                 *((key, "rope_theta") for key in LOCAL_ROPE_THETA_KEYS)]  # fmt: skip
    for key, meaning in top_level:
        if (value := config.get(key)) is not None:
            ROPE_CHECKS[meaning](key, value)
    rope = rope_parameters(config)
    full = rope.get("full_attention", rope)
    if full.get("rope_type") == "yarn" and full.get("factor") is not None and full.get("original_max_position_embeddings") is None:
        raise HyperParameterError(f"{container}.original_max_position_embeddings", "is needed for yarn rope scaling")


def add_text_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], block_count: int, file_type: int) -> None:
    """Generic hyper-parameters, in the reference's order (TextModel.set_gguf_parameters)."""
    writer.add_block_count(block_count)
    scalar_keys = (
        (writer.add_context_length, CONTEXT_LENGTH_KEYS),
        (writer.add_embedding_length, EMBEDDING_LENGTH_KEYS),
        (writer.add_feed_forward_length, FEED_FORWARD_KEYS),
        (writer.add_head_count, HEAD_COUNT_KEYS),
        (writer.add_head_count_kv, HEAD_COUNT_KV_KEYS),
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
    if (eps := find(config, RMS_EPS_KEYS)) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (eps := find(config, LAYER_NORM_EPS_KEYS)) is not None:
        writer.add_layer_norm_eps(eps)
    if (n_expert := find(config, EXPERT_COUNT_KEYS)) is not None:
        writer.add_expert_count(n_expert)
    if (n_used := find(config, EXPERT_USED_KEYS)) is not None:
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
