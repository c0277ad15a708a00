"""Qwen3-Next (Qwen3-Coder-Next): tensor names, value transforms and metadata.

Written to match llama.cpp's reference converter exactly (convert_hf_to_gguf.py, class
Qwen3NextModel and its bases Qwen2MoeModel/TextModel/ModelBase, `--outtype bf16 --no-mtp`):
same tensor names, shapes, types, bytes and order, same metadata keys and values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR, TENSOR_NAMES

from quantizer.arch.base import (
    HyperParameterError,
    add_text_hparams,
    bf16_to_f32,
    check_int,
    check_text_hparams,
    f32_to_bf16,
    quiet_bf16,
    reference_type,
    rope_parameters,
)
from quantizer.errors import CheckpointError
from quantizer.spec import TensorClass, TensorSpec

logger = logging.getLogger(__name__)

GGUF_ARCH = gguf.MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3NEXT]
HF_ARCHITECTURES = ("Qwen3NextForCausalLM",)
MODEL_TYPES = ("qwen3_next",)

# gguf-py releases before the key existed lack the constant; the string is llama.cpp's LLM_KV name.
RECURRENT_LAYERS_KEY = getattr(gguf.Keys.Attention, "RECURRENT_LAYERS", "{arch}.attention.recurrent_layers")

# Per-layer checkpoint tensors: (name after "model.layers.N.", class, transform).
# Transforms mirror Qwen3NextModel.modify_tensors: A_log -> -exp(A_log), conv1d squeezed,
# every "*norm.weight" except linear_attn.norm gets +1.
COMMON_LAYER_TENSORS: tuple[tuple[str, TensorClass, str], ...] = (
    ("input_layernorm.weight", "norm", "add_one"),
    ("post_attention_layernorm.weight", "norm", "add_one"),
    ("mlp.gate.weight", "router", "copy"),
    ("mlp.shared_expert_gate.weight", "shared_expert", "copy"),
    ("mlp.shared_expert.gate_proj.weight", "shared_expert", "copy"),
    ("mlp.shared_expert.up_proj.weight", "shared_expert", "copy"),
    ("mlp.shared_expert.down_proj.weight", "shared_expert", "copy"),
)
LINEAR_ATTENTION_TENSORS: tuple[tuple[str, TensorClass, str], ...] = (
    ("linear_attn.A_log", "ssm", "neg_exp"),
    ("linear_attn.conv1d.weight", "ssm", "squeeze"),
    ("linear_attn.dt_bias", "ssm", "copy"),
    ("linear_attn.in_proj_ba.weight", "ssm", "copy"),
    ("linear_attn.norm.weight", "ssm", "copy"),
    ("linear_attn.out_proj.weight", "ssm", "copy"),
)
FULL_ATTENTION_TENSORS: tuple[tuple[str, TensorClass, str], ...] = (
    ("self_attn.q_proj.weight", "attention", "copy"),
    ("self_attn.k_proj.weight", "attention", "copy"),
    ("self_attn.v_proj.weight", "attention", "copy"),
    ("self_attn.o_proj.weight", "attention", "copy"),
    ("self_attn.q_norm.weight", "norm", "add_one"),
    ("self_attn.k_norm.weight", "norm", "add_one"),
)
GLOBAL_TENSORS: tuple[tuple[str, TensorClass, str], ...] = (
    ("lm_head.weight", "output", "copy"),
    ("model.embed_tokens.weight", "embedding", "copy"),
    ("model.norm.weight", "norm", "add_one"),
)
EXPERT_PROJECTIONS = ("down_proj", "gate_proj", "up_proj")  # the reference stacks them in this order
SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


# The reference reads config.json through transformers' Qwen3NextConfig, which fills in these
# defaults for absent keys (transformers/models/qwen3_next/configuration_qwen3_next.py).
# config.json keys that size tensors: a plan from config.json alone refuses a config without them,
# since CONFIG_DEFAULTS would size another model's tensors
SHAPE_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "linear_num_key_heads",
    "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
)  # fmt: skip
CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 48,
    "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "head_dim": 256, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "decoder_sparse_step": 1, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "num_experts_per_tok": 10, "num_experts": 512,
    "partial_rotary_factor": 0.25, "mlp_only_layers": [],
}  # fmt: skip


LAYER_TYPES = ("linear_attention", "full_attention")


def check_hparams(config: dict[str, Any]) -> None:
    """Types and ranges of the hyper-parameters (defaults filled in), each refused naming its key:
    the writer packs them as uint32/float32, and llama.cpp aborts on some (n_expert_used > n_expert)."""
    for key in (*SHAPE_KEYS, "full_attention_interval"):
        if key in config and (key != "head_dim" or config[key] is not None):  # head_dim may be null: derived
            check_int(key, config[key])
    if config.get("head_dim") is None and config["hidden_size"] // config["num_attention_heads"] < 1:
        raise HyperParameterError("num_attention_heads", f"({config['num_attention_heads']}) exceeds hidden_size "
                                  f"({config['hidden_size']}) and head_dim is not given")  # fmt: skip
    if config["linear_num_value_heads"] % config["linear_num_key_heads"]:
        raise HyperParameterError("linear_num_value_heads", f"({config['linear_num_value_heads']}) must be a multiple "
                                  f"of linear_num_key_heads ({config['linear_num_key_heads']})")  # fmt: skip
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise HyperParameterError("layer_types", f"must be a list, got {layer_types!r}")
        if len(layer_types) != config["num_hidden_layers"]:
            raise HyperParameterError("layer_types", f"has {len(layer_types)} entries; num_hidden_layers is "
                                      f"{config['num_hidden_layers']}")  # fmt: skip
        if bad := next((t for t in layer_types if t not in LAYER_TYPES), None):
            raise HyperParameterError("layer_types", f"entry {bad!r} is not one of {', '.join(LAYER_TYPES)}")
    check_text_hparams(config)


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as the reference sees it: transformers' defaults filled in, and layer_types
    derived from full_attention_interval when absent (as Qwen3NextConfig does). Bad values are
    refused here (check_hparams), before anything is sized or written from them."""
    out = {**CONFIG_DEFAULTS, **config}
    check_hparams(out)
    if out.get("layer_types") is None:
        interval = int(out.get("full_attention_interval", 4))
        out["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                              for i in range(int(out["num_hidden_layers"]))]
    if "rope_theta" not in out and "rope_theta" not in (out.get("rope_parameters") or out.get("rope_scaling") or {}):
        out["rope_theta"] = 10000.0  # transformers' default for standard RoPE
    return out


class Checkpoint(Protocol):
    """What the value transforms need from a source checkpoint (see quantizer.source)."""

    config: dict[str, Any]

    def raw(self, name: str) -> np.ndarray: ...

    def dtype(self, name: str) -> str: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def release(self, names: Iterable[str] | None = None) -> None: ...


@dataclass(frozen=True)
class Dims:
    """The hyper-parameters the tensor shapes depend on."""

    n_layer: int
    hidden: int
    vocab: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    expert_ff: int
    shared_ff: int
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int
    recurrent: tuple[bool, ...]
    tied_embeddings: bool

    @property
    def qkv_rows(self) -> int:
        return 2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim

    @property
    def z_rows(self) -> int:
        return self.v_heads * self.v_dim


def dims_from_config(config: dict[str, Any]) -> Dims:
    try:
        config = hparams(config)
        n_layer = int(config["num_hidden_layers"])
        n_head = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
        layer_types = config["layer_types"]
        if config.get("mlp_only_layers"):
            raise CheckpointError("config.json: dense mlp_only_layers are not supported for qwen3next")
        return Dims(
            n_layer=n_layer,
            hidden=int(config["hidden_size"]),
            vocab=int(config["vocab_size"]),
            n_head=n_head,
            n_head_kv=int(config["num_key_value_heads"]),
            head_dim=head_dim,
            n_expert=int(config["num_experts"]),
            expert_ff=int(config["moe_intermediate_size"]),
            shared_ff=int(config["shared_expert_intermediate_size"]),
            k_heads=int(config["linear_num_key_heads"]),
            v_heads=int(config["linear_num_value_heads"]),
            k_dim=int(config["linear_key_head_dim"]),
            v_dim=int(config["linear_value_head_dim"]),
            conv_kernel=int(config["linear_conv_kernel_dim"]),
            recurrent=tuple(t == "linear_attention" for t in layer_types),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as exc:
        raise CheckpointError(f"config.json: missing {exc.args[0]!r} needed for qwen3next") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: bad hyper-parameter value ({exc})") from None


def _shape_of(hf_suffix: str, d: Dims) -> tuple[int, ...]:
    """GGUF-side numpy shape of a per-layer or global tensor (after its transform)."""
    conv_dim = 2 * d.k_heads * d.k_dim + d.v_heads * d.v_dim
    shapes: dict[str, tuple[int, ...]] = {
        "lm_head.weight": (d.vocab, d.hidden),
        "model.embed_tokens.weight": (d.vocab, d.hidden),
        "model.norm.weight": (d.hidden,),
        "input_layernorm.weight": (d.hidden,),
        "post_attention_layernorm.weight": (d.hidden,),
        "mlp.gate.weight": (d.n_expert, d.hidden),
        "mlp.shared_expert_gate.weight": (1, d.hidden),
        "mlp.shared_expert.gate_proj.weight": (d.shared_ff, d.hidden),
        "mlp.shared_expert.up_proj.weight": (d.shared_ff, d.hidden),
        "mlp.shared_expert.down_proj.weight": (d.hidden, d.shared_ff),
        "linear_attn.A_log": (d.v_heads,),
        "linear_attn.conv1d.weight": (conv_dim, d.conv_kernel),
        "linear_attn.dt_bias": (d.v_heads,),
        "linear_attn.in_proj_ba.weight": (2 * d.v_heads, d.hidden),
        "linear_attn.norm.weight": (d.v_dim,),
        "linear_attn.out_proj.weight": (d.hidden, d.v_heads * d.v_dim),
        "self_attn.q_proj.weight": (2 * d.n_head * d.head_dim, d.hidden),  # queries and their gate
        "self_attn.k_proj.weight": (d.n_head_kv * d.head_dim, d.hidden),
        "self_attn.v_proj.weight": (d.n_head_kv * d.head_dim, d.hidden),
        "self_attn.o_proj.weight": (d.hidden, d.n_head * d.head_dim),
        "self_attn.q_norm.weight": (d.head_dim,),
        "self_attn.k_norm.weight": (d.head_dim,),
        "down_proj": (d.n_expert, d.hidden, d.expert_ff),
        "gate_proj": (d.n_expert, d.expert_ff, d.hidden),
        "up_proj": (d.n_expert, d.expert_ff, d.hidden),
    }
    return shapes[hf_suffix]


def _gguf_name(tensor_map: gguf.TensorNameMap, hf_name: str) -> tuple[MODEL_TENSOR, str]:
    # the reference renames dt_bias before mapping (modify_tensors)
    lookup = hf_name.removesuffix(".dt_bias") + ".dt_proj.bias" if hf_name.endswith(".dt_bias") else hf_name
    mapped = tensor_map.get_type_and_name(lookup, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise CheckpointError(f"no GGUF name for checkpoint tensor {hf_name!r}")
    return mapped


def _spec(tensor_map: gguf.TensorNameMap, lookup: str, sources: tuple[str, ...], shape: tuple[int, ...],
          tclass: TensorClass, transform: str) -> TensorSpec:
    kind, name = _gguf_name(tensor_map, lookup)
    return TensorSpec(name, sources, shape, tclass, reference_type(name, kind, len(shape)), transform)


def _fixed_name(kind: MODEL_TENSOR, bid: int, suffix: str = ".weight") -> tuple[MODEL_TENSOR, str]:
    return kind, TENSOR_NAMES[kind].format(bid=bid) + suffix


def _layer_specs(tensor_map: gguf.TensorNameMap, d: Dims, bid: int, fused: bool) -> list[TensorSpec]:
    prefix = f"model.layers.{bid}."
    table = COMMON_LAYER_TENSORS + (LINEAR_ATTENTION_TENSORS if d.recurrent[bid] else FULL_ATTENTION_TENSORS)
    specs = [
        _spec(tensor_map, prefix + suffix, (prefix + suffix,), _shape_of(suffix, d), tclass, transform)
        for suffix, tclass, transform in table
    ]
    if d.recurrent[bid]:
        qkvz = prefix + "linear_attn.in_proj_qkvz.weight"
        for kind, rows, transform in ((MODEL_TENSOR.ATTN_QKV, d.qkv_rows, "qkvz_qkv"),
                                      (MODEL_TENSOR.ATTN_GATE, d.z_rows, "qkvz_z")):
            _, name = _fixed_name(kind, bid)
            specs.append(TensorSpec(name, (qkvz,), (rows, d.hidden), "ssm", reference_type(name, kind, 2), transform))
    experts = prefix + "mlp.experts."
    if fused:
        down = (experts + "down_proj",)
        specs.append(_spec(tensor_map, experts + "down_proj.weight", down, _shape_of("down_proj", d), "routed_expert", "copy"))
        for proj, transform in (("gate_proj", "gate_half"), ("up_proj", "up_half")):
            specs.append(_spec(tensor_map, experts + proj + ".weight", (experts + "gate_up_proj",),
                               _shape_of(proj, d), "routed_expert", transform))
    else:
        for proj in EXPERT_PROJECTIONS:
            sources = tuple(f"{experts}{x}.{proj}.weight" for x in range(d.n_expert))
            specs.append(_spec(tensor_map, experts + proj + ".weight", sources, _shape_of(proj, d),
                               "routed_expert", "stack"))
    return specs


def _resolve_fused_names(specs: list[TensorSpec], names: set[str]) -> list[TensorSpec]:
    """Fused expert tensors may be stored with or without a ".weight" suffix."""
    out = []
    for spec in specs:
        sources = tuple(s + ".weight" if s not in names and s + ".weight" in names else s for s in spec.sources)
        out.append(TensorSpec(spec.name, sources, spec.shape, spec.tclass, spec.base_type, spec.transform))
    return out


def specs_from_config(config: dict[str, Any], source_names: set[str] | None = None,
                      source_order: Sequence[str] | None = None) -> list[TensorSpec]:
    """Every GGUF tensor of the reference's bf16 conversion, in the reference's order.

    `source_names` (the checkpoint's tensor names) selects the expert layout (per-expert or
    fused gate_up_proj) and whether lm_head exists; None means the standard per-expert layout.
    `source_order` is the order the reference reads tensors in (shards sorted, names sorted per
    shard); it decides the output order. Default: all names sorted, as for one shard.
    """
    d = dims_from_config(config)
    tensor_map = gguf.get_tensor_name_map(MODEL_ARCH.QWEN3NEXT, d.n_layer)
    names = set(source_names) if source_names is not None else None
    specs: list[TensorSpec] = []
    for hf_name, tclass, transform in GLOBAL_TENSORS:
        if hf_name == "lm_head.weight" and (names is not None and hf_name not in names
                                            or names is None and d.tied_embeddings):
            continue  # tied embeddings: llama.cpp reuses token_embd
        specs.append(_spec(tensor_map, hf_name, (hf_name,), _shape_of(hf_name, d), tclass, transform))
    for bid in range(d.n_layer):
        fused = names is not None and any(
            f"model.layers.{bid}.mlp.experts.gate_up_proj{s}" in names for s in ("", ".weight"))
        specs.extend(_layer_specs(tensor_map, d, bid, fused))
    if names is not None:
        specs = _resolve_fused_names(specs, names)
        _check_names(specs, names)
    order = list(source_order) if source_order is not None else sorted({s for sp in specs for s in sp.sources})
    return _emission_order(specs, order)


def _check_names(specs: list[TensorSpec], names: set[str]) -> None:
    used = {s for spec in specs for s in spec.sources}
    missing = sorted(used - names)
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(n for n in names - used if not n.endswith(SKIPPED_SUFFIXES))
    mtp = [n for n in extra if n.startswith(("mtp.", "model.mtp."))]
    if mtp:
        logger.info("skipping %d multi-token-prediction (mtp.*) tensors, as the reference does with --no-mtp", len(mtp))
    unknown = [n for n in extra if n not in mtp]
    if unknown:
        raise CheckpointError(f"checkpoint tensor {unknown[0]!r} has no qwen3next mapping")


def _emission_order(specs: list[TensorSpec], order: Sequence[str]) -> list[TensorSpec]:
    """Sort specs the way the reference emits them: each when its last source has been read.

    Stacked experts of a layer all wait for the last expert tensor of that layer (down, gate, up).
    """
    position = {name: i for i, name in enumerate(order)}
    layer_experts: dict[str, int] = {}
    for spec in specs:
        if spec.transform == "stack":
            key = spec.name.split(".")[1]
            layer_experts[key] = max(layer_experts.get(key, -1), max(position.get(s, -1) for s in spec.sources))

    def trigger(spec: TensorSpec) -> int:
        if spec.transform == "stack":
            return layer_experts[spec.name.split(".")[1]]
        return max(position.get(s, -1) for s in spec.sources)

    return sorted(specs, key=trigger)  # stable: ties keep the table order (down, gate, up; qkv, z)


def add_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], file_type: int) -> None:
    """Hyper-parameters in the reference's order (TextModel, Qwen2MoeModel, Qwen3NextModel)."""
    d = dims_from_config(config)
    config = hparams(config)
    add_text_hparams(writer, config, d.n_layer, file_type)
    if (moe_ff := config.get("moe_intermediate_size")) is not None:
        writer.add_expert_feed_forward_length(moe_ff)
    if (shared_ff := config.get("shared_expert_intermediate_size")) is not None:
        writer.add_expert_shared_feed_forward_length(shared_ff)
    writer.add_ssm_conv_kernel(d.conv_kernel)
    writer.add_ssm_state_size(d.k_dim)
    writer.add_ssm_group_count(d.k_heads)
    writer.add_ssm_time_step_rank(d.v_heads)
    writer.add_ssm_inner_size(d.v_dim * d.v_heads)
    writer.add_array(RECURRENT_LAYERS_KEY.format(arch=writer.arch), list(d.recurrent))
    writer.add_full_attention_interval(config.get("full_attention_interval", 4))
    rope_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_rope_dimension_count(int(rope_dim * rope_parameters(config).get("partial_rotary_factor", 0.25)))


# ---- values --------------------------------------------------------------------------------

MOVE_ONLY = frozenset({"copy", "squeeze", "stack", "qkvz_qkv", "qkvz_z", "gate_half", "up_half"})


def _work(checkpoint: Checkpoint, name: str) -> np.ndarray:
    """A source tensor as the reference computes with it: BF16 widened to F32, F16 and F32 kept."""
    raw = checkpoint.raw(name)
    return bf16_to_f32(raw) if checkpoint.dtype(name) == "BF16" else raw


def _qkvz(data: np.ndarray, d: Dims, part: str) -> np.ndarray:
    # HF rows are grouped per key head as [q, k, v, z]; llama.cpp wants all q, all k, all v (and z).
    ratio = d.v_heads // d.k_heads
    split = np.cumsum([d.k_dim, d.k_dim, ratio * d.v_dim])
    grouped = data.reshape(d.k_heads, -1, data.shape[-1])
    q, k, v, z = np.split(grouped, split, axis=1)
    if part == "z":
        return z.reshape(-1, data.shape[-1])
    return np.concatenate([t.reshape(-1, data.shape[-1]) for t in (q, k, v)], axis=0)


def _apply(spec: TensorSpec, load: Any, d: Dims) -> np.ndarray:
    transform = spec.transform
    if transform == "stack":
        first = load(spec.sources[0])
        out = np.empty((len(spec.sources), *first.shape), dtype=first.dtype)
        out[0] = first
        for i, source in enumerate(spec.sources[1:], start=1):
            out[i] = load(source)
        return out
    data = load(spec.sources[0])
    if transform == "copy":
        return data
    if transform == "squeeze":
        return data.squeeze()
    if transform in ("qkvz_qkv", "qkvz_z"):
        return _qkvz(data, d, transform[-1])
    if transform in ("gate_half", "up_half"):
        half = data.shape[-2] // 2
        return data[..., :half, :] if transform == "gate_half" else data[..., half:, :]
    if transform == "add_one":
        return data + data.dtype.type(1)
    if transform == "neg_exp":
        if data.dtype == np.float16:
            return -np.exp(data)
        return -np.exp(data.astype(np.float64)).astype(np.float32)  # F32 exp, correctly rounded
    raise ValueError(f"unknown transform {transform!r} for {spec.name}")


def build_tensor(checkpoint: Checkpoint, spec: TensorSpec) -> np.ndarray:
    """The exact values the reference's bf16 GGUF holds: uint16 words for bf16, float32 for f32."""
    d = dims_from_config(checkpoint.config)
    raw_path = spec.base_type == "bf16" and spec.transform in MOVE_ONLY and all(
        checkpoint.dtype(s) == "BF16" for s in spec.sources)
    if raw_path:  # bf16 -> f32 -> bf16 is the identity (bar NaN quieting): move the words only
        values = quiet_bf16(np.ascontiguousarray(_apply(spec, checkpoint.raw, d)))
    else:
        work = _apply(spec, lambda name: _work(checkpoint, name), d)
        values = work.astype(np.float32) if spec.base_type == "f32" else f32_to_bf16(work)
    if values.shape != spec.shape:
        raise CheckpointError(f"{spec.name}: built shape {values.shape} from {spec.sources[0]!r}, expected {spec.shape}")
    return np.ascontiguousarray(values)


def tensor_f32(checkpoint: Checkpoint, spec: TensorSpec) -> np.ndarray:
    """Float32 values of a tensor as the bf16 GGUF holds them: what llama-quantize would read.

    Stacked experts are widened one expert at a time, so only the float32 result is large."""
    if spec.transform == "stack":
        out = np.empty(spec.shape, dtype=np.float32)
        for i, source in enumerate(spec.sources):
            part = TensorSpec(spec.name, (source,), spec.shape[1:], spec.tclass, spec.base_type, "copy")
            out[i] = tensor_f32(checkpoint, part)
            checkpoint.release((source,))
        return out
    values = build_tensor(checkpoint, spec)
    return bf16_to_f32(values) if spec.base_type == "bf16" else values


def expected_source_shapes(spec: TensorSpec, config: dict[str, Any]) -> Iterable[tuple[str, tuple[int, ...]]]:
    """(source name, shape it must have) pairs, to validate a checkpoint before writing."""
    d = dims_from_config(config)
    if spec.transform == "stack":
        return [(s, spec.shape[1:]) for s in spec.sources]
    if spec.transform == "squeeze":
        return [(spec.sources[0], (spec.shape[0], 1, spec.shape[1]))]
    if spec.transform in ("qkvz_qkv", "qkvz_z"):
        return [(spec.sources[0], (d.qkv_rows + d.z_rows, d.hidden))]
    if spec.transform in ("gate_half", "up_half"):
        return [(spec.sources[0], (d.n_expert, 2 * d.expert_ff, d.hidden))]
    return [(spec.sources[0], spec.shape)]
