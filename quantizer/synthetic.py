"""Synthetic Qwen3-Next checkpoints in Hugging Face layout, from numpy alone.

For tests, the server's offline demo model and benchmarks: random weights with the real
architecture's tensor names, shapes and config keys, a real byte-level BPE tokenizer and the
Qwen3-Coder chat template. Tensors are generated and written one at a time (large ones in row
blocks), so a layer of Qwen3-Coder-Next's size never sits in memory whole.

Values depend only on (seed, tensor name, chunk), never on file layout: the same seed gives the
same model whether experts are stored one by one or fused, in any number of shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from quantizer.safetensors_stream import StreamedTensor, shard_names, split_shards, write_safetensors
from quantizer.synthetic_tokenizer import ADDED_TOKENS, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, added_token_ids
from quantizer.synthetic_tokenizer import tokenizer_config as make_tokenizer_config
from quantizer.synthetic_tokenizer import tokenizer_json as make_tokenizer_json

logger = logging.getLogger(__name__)

Dtype = Literal["bf16", "f16", "f32"]
ConfigStyle = Literal["v4", "v5"]  # transformers 4.x keys (rope_theta, no layer_types) or 5.x

SAFETENSORS_DTYPE = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
TORCH_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4}
CHUNK_ELEMENTS = 1 << 22  # rows are generated in blocks of about this many values (16 MiB as f32)
INIT_STD = 0.02  # transformers' initializer_range for Qwen3-Next: linear and embedding weights


@dataclass(frozen=True)
class SyntheticShape:
    """Hyper-parameters of a synthetic model; field names are the arguments of write_checkpoint."""

    layers: int
    hidden: int
    n_experts: int
    top_k: int
    expert_ff: int  # moe_intermediate_size
    shared_ff: int  # shared_expert_intermediate_size
    heads: int  # full-attention query heads
    kv_heads: int
    head_dim: int
    lin_k_heads: int  # Gated DeltaNet key heads
    lin_v_heads: int
    lin_head_dim: int  # key and value head dim of the linear attention
    conv_kernel: int
    vocab: int  # embedding rows (vocab_size); at least the tokenizer's size
    bpe_tokens: int  # byte tokens + merges; special and added tokens follow
    full_attention_interval: int = 4
    dense_ff: int = 512  # intermediate_size: in config only (no dense layers in this family)
    context: int = 4096
    rope_theta: float = 10000.0
    mtp_layers: int = 0  # multi-token-prediction block(s), as mtp.* tensors
    config_style: ConfigStyle = "v5"

    @property
    def tokenizer_size(self) -> int:
        return self.bpe_tokens + len(SPECIAL_TOKENS) + len(ADDED_TOKENS)

    def is_full_attention(self, layer: int) -> bool:
        return (layer + 1) % self.full_attention_interval == 0


PRESETS: dict[str, SyntheticShape] = {
    # Seconds to build; 256-wide rows so every k-quant and i-quant applies to the experts.
    "tiny": SyntheticShape(
        layers=4, hidden=256, n_experts=8, top_k=2, expert_ff=256, shared_ff=256, heads=2, kv_heads=1,
        head_dim=64, lin_k_heads=1, lin_v_heads=2, lin_head_dim=64, conv_kernel=4, vocab=512, bpe_tokens=486,
    ),
    # The server's offline demo model: the reference model's shapes, random weights (~15 M params).
    "demo": SyntheticShape(
        layers=4, hidden=256, n_experts=16, top_k=4, expert_ff=256, shared_ff=256, heads=4, kv_heads=2,
        head_dim=64, lin_k_heads=2, lin_v_heads=4, lin_head_dim=64, conv_kernel=4, vocab=2048, bpe_tokens=2022,
    ),
    # Qwen3-Coder-Next's layer shapes and vocabulary (ids past the tokenizer are padding, as there).
    "coder-next": SyntheticShape(
        layers=4, hidden=2048, n_experts=512, top_k=10, expert_ff=512, shared_ff=512, heads=16, kv_heads=2,
        head_dim=256, lin_k_heads=16, lin_v_heads=32, lin_head_dim=128, conv_kernel=4, vocab=151936,
        bpe_tokens=151643, dense_ff=5120, context=262144, rope_theta=5_000_000.0, config_style="v4",
    ),
}


@dataclass(frozen=True)
class SyntheticTensor:
    name: str
    shape: tuple[int, ...]
    init: str  # key of INIT: how values are drawn


@dataclass(frozen=True)
class SyntheticCheckpoint:
    path: Path
    shape: SyntheticShape
    dtype: Dtype
    files: tuple[str, ...]  # safetensors files, in order
    n_params: int


def _rng(seed: int, name: str, chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), chunk])


def _normal(std: float, mean: float = 0.0) -> Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]:
    def draw(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
        return values + np.float32(mean) if mean else values

    return draw


def _a_log(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Qwen3-Next initialises A uniformly in (0, 16) and stores log(A); the converter writes -exp(A_log).
    return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)


# Draws by kind. Norm weights the converter shifts by +1 (zero-centred RMSNorm) sit near 0; the
# gated norm of the linear attention is stored as is, so it sits near 1.
INIT: dict[str, Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]] = {
    "linear": _normal(INIT_STD),
    "offset_norm": _normal(INIT_STD),
    "norm": _normal(INIT_STD, mean=1.0),
    "a_log": _a_log,
    "dt_bias": _normal(0.1, mean=1.0),
    "conv": _normal(0.25),
}


def _attention(p: str, s: SyntheticShape) -> list[SyntheticTensor]:
    q_out = s.heads * s.head_dim * 2  # query and its output gate, interleaved per head
    kv_out = s.kv_heads * s.head_dim
    return [
        SyntheticTensor(f"{p}self_attn.q_proj.weight", (q_out, s.hidden), "linear"),
        SyntheticTensor(f"{p}self_attn.k_proj.weight", (kv_out, s.hidden), "linear"),
        SyntheticTensor(f"{p}self_attn.v_proj.weight", (kv_out, s.hidden), "linear"),
        SyntheticTensor(f"{p}self_attn.o_proj.weight", (s.hidden, s.heads * s.head_dim), "linear"),
        SyntheticTensor(f"{p}self_attn.q_norm.weight", (s.head_dim,), "offset_norm"),
        SyntheticTensor(f"{p}self_attn.k_norm.weight", (s.head_dim,), "offset_norm"),
    ]


def _linear_attention(p: str, s: SyntheticShape) -> list[SyntheticTensor]:
    key_dim = s.lin_k_heads * s.lin_head_dim
    value_dim = s.lin_v_heads * s.lin_head_dim
    return [
        SyntheticTensor(f"{p}linear_attn.A_log", (s.lin_v_heads,), "a_log"),
        SyntheticTensor(f"{p}linear_attn.conv1d.weight", (2 * key_dim + value_dim, 1, s.conv_kernel), "conv"),
        SyntheticTensor(f"{p}linear_attn.dt_bias", (s.lin_v_heads,), "dt_bias"),
        SyntheticTensor(f"{p}linear_attn.in_proj_ba.weight", (2 * s.lin_v_heads, s.hidden), "linear"),
        SyntheticTensor(f"{p}linear_attn.in_proj_qkvz.weight", (2 * key_dim + 2 * value_dim, s.hidden), "linear"),
        SyntheticTensor(f"{p}linear_attn.norm.weight", (s.lin_head_dim,), "norm"),
        SyntheticTensor(f"{p}linear_attn.out_proj.weight", (s.hidden, value_dim), "linear"),
    ]


def _moe(p: str, s: SyntheticShape) -> list[SyntheticTensor]:
    experts = []
    for e in range(s.n_experts):
        experts += [
            SyntheticTensor(f"{p}mlp.experts.{e}.down_proj.weight", (s.hidden, s.expert_ff), "linear"),
            SyntheticTensor(f"{p}mlp.experts.{e}.gate_proj.weight", (s.expert_ff, s.hidden), "linear"),
            SyntheticTensor(f"{p}mlp.experts.{e}.up_proj.weight", (s.expert_ff, s.hidden), "linear"),
        ]
    return [
        *experts,
        SyntheticTensor(f"{p}mlp.gate.weight", (s.n_experts, s.hidden), "linear"),
        SyntheticTensor(f"{p}mlp.shared_expert.down_proj.weight", (s.hidden, s.shared_ff), "linear"),
        SyntheticTensor(f"{p}mlp.shared_expert.gate_proj.weight", (s.shared_ff, s.hidden), "linear"),
        SyntheticTensor(f"{p}mlp.shared_expert.up_proj.weight", (s.shared_ff, s.hidden), "linear"),
        SyntheticTensor(f"{p}mlp.shared_expert_gate.weight", (1, s.hidden), "linear"),
    ]


def _layer(p: str, s: SyntheticShape, full_attention: bool) -> list[SyntheticTensor]:
    mixer = _attention(p, s) if full_attention else _linear_attention(p, s)
    return [
        SyntheticTensor(f"{p}input_layernorm.weight", (s.hidden,), "offset_norm"),
        *mixer,
        *_moe(p, s),
        SyntheticTensor(f"{p}post_attention_layernorm.weight", (s.hidden,), "offset_norm"),
    ]


def tensor_list(s: SyntheticShape) -> list[SyntheticTensor]:
    """Every checkpoint tensor, one entry per expert matrix, in file order."""
    tensors = [
        SyntheticTensor("lm_head.weight", (s.vocab, s.hidden), "linear"),
        SyntheticTensor("model.embed_tokens.weight", (s.vocab, s.hidden), "linear"),
    ]
    for layer in range(s.layers):
        tensors += _layer(f"model.layers.{layer}.", s, s.is_full_attention(layer))
    tensors.append(SyntheticTensor("model.norm.weight", (s.hidden,), "offset_norm"))
    if s.mtp_layers:
        tensors += [
            SyntheticTensor("mtp.fc.weight", (s.hidden, 2 * s.hidden), "linear"),
            SyntheticTensor("mtp.pre_fc_norm_embedding.weight", (s.hidden,), "offset_norm"),
            SyntheticTensor("mtp.pre_fc_norm_hidden.weight", (s.hidden,), "offset_norm"),
            SyntheticTensor("mtp.norm.weight", (s.hidden,), "offset_norm"),
        ]
        for layer in range(s.mtp_layers):
            tensors += _layer(f"mtp.layers.{layer}.", s, full_attention=True)
    return tensors


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as stored in the checkpoint: one synthetic tensor, or experts fused along axis 0."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[SyntheticTensor, ...]  # concatenated in order to form the stored values


def stored_tensors(s: SyntheticShape, fused_experts: bool) -> list[StoredTensor]:
    """File layout: per-expert matrices, or transformers 5's fused `experts.gate_up_proj`/`down_proj`."""
    out: list[StoredTensor] = []
    experts: dict[str, dict[int, dict[str, SyntheticTensor]]] = {}
    for t in tensor_list(s):
        prefix, sep, rest = t.name.partition(".mlp.experts.")
        if not (fused_experts and sep):
            out.append(StoredTensor(t.name, t.shape, (t,)))
            continue
        expert, proj = rest.split(".")[:2]
        block = experts.setdefault(prefix, {})
        block.setdefault(int(expert), {})[proj] = t
        if len(block) == s.n_experts and len(block[s.n_experts - 1]) == 3:
            gate_up = tuple(p for e in range(s.n_experts) for p in (block[e]["gate_proj"], block[e]["up_proj"]))
            down = tuple(block[e]["down_proj"] for e in range(s.n_experts))
            base = f"{prefix}.mlp.experts."
            out.append(StoredTensor(base + "gate_up_proj", (s.n_experts, 2 * s.expert_ff, s.hidden), gate_up))
            out.append(StoredTensor(base + "down_proj", (s.n_experts, s.hidden, s.expert_ff), down))
    return out


def tensor_values(t: SyntheticTensor, seed: int) -> Iterator[np.ndarray]:
    """Values of one synthetic tensor as float32 row blocks (the same blocks whatever the layout)."""
    row_elems = int(np.prod(t.shape[1:], dtype=np.int64))
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(row_elems, 1))
    for chunk, start in enumerate(range(0, t.shape[0], rows_per_chunk)):
        rows = min(rows_per_chunk, t.shape[0] - start)
        yield INIT[t.init](_rng(seed, t.name, chunk), (rows, *t.shape[1:]))


def to_bf16_words(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (values here are finite)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def encode(values: np.ndarray, dtype: Dtype, bf16_values: bool) -> bytes:
    if bf16_values and dtype != "bf16":
        values = (to_bf16_words(values).astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype == "bf16":
        return to_bf16_words(values).tobytes()
    return values.astype(np.float16 if dtype == "f16" else np.float32).tobytes()


def nbytes(t: StoredTensor, dtype: Dtype) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) * ITEMSIZE[dtype]


def streamed(t: StoredTensor, dtype: Dtype, seed: int, bf16_values: bool) -> StreamedTensor:
    def blocks() -> Iterator[bytes]:
        for part in t.parts:
            for values in tensor_values(part, seed):
                yield encode(values, dtype, bf16_values)

    return StreamedTensor(t.name, SAFETENSORS_DTYPE[dtype], t.shape, nbytes(t, dtype), blocks)


def config_json(s: SyntheticShape, dtype: Dtype) -> dict[str, object]:
    """config.json as transformers writes it for Qwen3NextForCausalLM (4.x or 5.x key style)."""
    ids = added_token_ids(s.bpe_tokens)
    config: dict[str, object] = {
        "architectures": ["Qwen3NextForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids[PAD_TOKEN],
        "decoder_sparse_step": 1,
        "eos_token_id": ids[EOS_TOKEN],
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": s.dense_ff,
        "linear_conv_kernel_dim": s.conv_kernel,
        "linear_key_head_dim": s.lin_head_dim,
        "linear_num_key_heads": s.lin_k_heads,
        "linear_num_value_heads": s.lin_v_heads,
        "linear_value_head_dim": s.lin_head_dim,
        "max_position_embeddings": s.context,
        "mlp_only_layers": [],
        "model_type": "qwen3_next",
        "moe_intermediate_size": s.expert_ff,
        "norm_topk_prob": True,
        "num_attention_heads": s.heads,
        "num_experts": s.n_experts,
        "num_experts_per_tok": s.top_k,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "output_router_logits": False,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": s.shared_ff,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": s.vocab,
    }
    if s.config_style == "v5":
        config["layer_types"] = [
            "full_attention" if s.is_full_attention(i) else "linear_attention" for i in range(s.layers)
        ]
        config["pad_token_id"] = ids[PAD_TOKEN]
        config["rope_parameters"] = {"partial_rotary_factor": 0.25, "rope_theta": s.rope_theta, "rope_type": "default"}
        config["dtype"] = TORCH_DTYPE[dtype]
        config["transformers_version"] = "5.17.0"
    else:
        config["full_attention_interval"] = s.full_attention_interval
        config["rope_scaling"] = None
        config["rope_theta"] = s.rope_theta
        config["torch_dtype"] = TORCH_DTYPE[dtype]
        config["transformers_version"] = "4.57.0"
    return dict(sorted(config.items()))


def chat_template() -> str:
    """The Qwen3-Coder chat template, shipped as package data."""
    return resources.files("quantizer").joinpath("data/qwen3-coder.jinja").read_text(encoding="utf-8")


def resolve_shape(preset: str | None, overrides: dict[str, object]) -> SyntheticShape:
    """The preset's shape (default "tiny") with the given fields replaced, checked for consistency."""
    name = preset or "tiny"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "vocab" in changes and "bpe_tokens" not in changes:  # fill the vocabulary with merges
        changes["bpe_tokens"] = min(PRESETS[name].bpe_tokens, int(changes["vocab"]) - len(SPECIAL_TOKENS) - len(ADDED_TOKENS))
    if "n_experts" in changes and "top_k" not in changes:  # fewer experts than the preset routes to
        changes["top_k"] = min(PRESETS[name].top_k, int(changes["n_experts"]))
    shape = dataclasses.replace(PRESETS[name], **changes)
    checks = (
        (shape.layers >= 1, "layers must be at least 1"),
        (shape.heads % shape.kv_heads == 0, "heads must be a multiple of kv_heads"),
        (shape.lin_v_heads % shape.lin_k_heads == 0, "lin_v_heads must be a multiple of lin_k_heads"),
        (1 <= shape.top_k <= shape.n_experts, "top_k must be between 1 and n_experts"),
        (shape.bpe_tokens >= 256, f"vocab must hold 256 byte tokens and {shape.tokenizer_size - shape.bpe_tokens} "
         "special and added tokens"),
        (shape.tokenizer_size <= shape.vocab, f"vocab must hold the {shape.tokenizer_size} tokenizer tokens"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(f"synthetic checkpoint: {message}")
    return shape


def write_checkpoint(
    out_dir: Path | str,
    *,
    preset: str | None = None,
    layers: int | None = None,
    hidden: int | None = None,
    n_experts: int | None = None,
    top_k: int | None = None,
    expert_ff: int | None = None,
    shared_ff: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    lin_k_heads: int | None = None,
    lin_v_heads: int | None = None,
    lin_head_dim: int | None = None,
    conv_kernel: int | None = None,
    vocab: int | None = None,
    bpe_tokens: int | None = None,
    mtp_layers: int | None = None,
    config_style: ConfigStyle | None = None,
    shards: int = 2,
    dtype: Dtype = "bf16",
    fused_experts: bool = False,
    bf16_values: bool = False,
    seed: int = 0,
    workers: int = 1,
) -> SyntheticCheckpoint:
    """Write a random Qwen3-Next checkpoint (config, tokenizer, safetensors shards) into out_dir.

    Shape arguments left as None come from `preset` ("tiny", "demo" or "coder-next"; default
    "tiny"). `bf16_values` draws values exactly representable in bfloat16, so an f32 source
    converts to the same BF16 GGUF as a bf16 one. `shards=1` writes a single model.safetensors
    without an index, as transformers does for small models. `workers` > 1 writes that many shards
    at a time in separate processes; every value depends only on the seed, the tensor's name and its
    position, so the files are the same either way.
    """
    shape = resolve_shape(preset, {k: v for k, v in locals().items() if k in SyntheticShape.__dataclass_fields__})
    if dtype not in SAFETENSORS_DTYPE:
        raise ValueError(f"dtype must be one of {', '.join(SAFETENSORS_DTYPE)}, got {dtype!r}")
    tensors = stored_tensors(shape, fused_experts)
    placement = split_shards([nbytes(t, dtype) for t in tensors], shards)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = shard_names(shards)
    jobs = [(out / file_name, [t for t, p in zip(tensors, placement, strict=True) if p == shard], dtype, seed,
             bf16_values) for shard, file_name in enumerate(files)]
    if workers > 1 and len(jobs) > 1:
        # spawn: a fresh interpreter per worker, whatever threads or native libraries this process holds
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_write_shard, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            _write_shard(*job)
    n_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in tensors)
    if shards > 1:
        weight_map = {t.name: files[p] for t, p in zip(tensors, placement, strict=True)}
        index = {
            "metadata": {"total_parameters": n_params, "total_size": sum(nbytes(t, dtype) for t in tensors)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        _write_json(out / "model.safetensors.index.json", index)
    _write_metadata_files(out, shape, dtype)
    return SyntheticCheckpoint(out, shape, dtype, tuple(files), n_params)


def _write_shard(path: Path, tensors: list[StoredTensor], dtype: Dtype, seed: int, bf16_values: bool) -> None:
    logger.info("writing %s (%d tensors)", path.name, len(tensors))
    write_safetensors(path, [streamed(t, dtype, seed, bf16_values) for t in tensors])


def _write_metadata_files(out: Path, shape: SyntheticShape, dtype: Dtype) -> None:
    ids = added_token_ids(shape.bpe_tokens)
    _write_json(out / "config.json", config_json(shape, dtype))
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": ids[PAD_TOKEN], "eos_token_id": ids[EOS_TOKEN], "pad_token_id": ids[PAD_TOKEN]},
    )
    _write_json(out / "tokenizer.json", make_tokenizer_json(shape.bpe_tokens), indent=None)
    _write_json(out / "tokenizer_config.json", make_tokenizer_config(shape.bpe_tokens, chat_template(), shape.context))


def _write_json(path: Path, value: object, indent: int | None = 2) -> None:
    path.write_text(json.dumps(value, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
