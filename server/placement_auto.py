"""`--gpu-layers auto`: how many layers' routed experts fit on the GPU, and the BF16 speed warning.

Both are pure functions of plan inputs and a few numbers the loader reads from llama.cpp (the GPU's
free memory, the compute capability it logs); nothing here touches a device.

auto fills the GPU in this order: everything `attn` puts there (non-expert weights, KV cache,
recurrent state), then a reserve for llama.cpp's compute buffers and allocation slack, then the
routed experts of the LAST layers, as many as still fit. The answer is `--cpu-moe-layers K`
(llama.cpp's `--n-cpu-moe K`): the experts of layers 0..K-1 stay in RAM.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.placement import (
    MemoryShape,
    PlacementPlan,
    Preset,
    TensorInfo,
    format_bytes,
    padded_ctx,
    plan_placement,
    tensor_class,
    tensor_layer,
)

log = logging.getLogger(__name__)

# Compute buffer estimate, bytes per token of n_ubatch (see docs/placement.md, "--gpu-layers auto"):
#   4 x n_vocab               F32 logits of the ubatch
#   6 x n_ctx                 the KQ mask (F32, and its F16 copy for flash attention)
#   4 x ACTIVATION_WIDTHS x n_embd   F32 activations live at once in a layer
#   4 x n_head x n_ctx        attention scores, only when flash attention is off
# ACTIVATION_WIDTHS is fitted to one measurement: Qwen3-Coder-Next on an H200, ctx 8192, n_ubatch 512,
# default flash attention: CUDA0 compute buffer 678,418,186 bytes; the formula gives 680,263,680.
ACTIVATION_WIDTHS = 82
# Slack on top of the estimate: allocation rounding, cuBLAS workspaces, buffers the estimate misses.
HEADROOM_MIN = 256 << 20
HEADROOM_FRACTION = 0.03  # of the memory limit


@dataclass(frozen=True)
class AutoChoice:
    """What `auto` resolved to and why."""

    preset: Preset  # concrete: attn / all / a layer count, with cpu_moe_layers
    cpu_moe_layers: int  # layers whose experts stay in RAM (n_layer: all of them)
    fits: bool  # False: a fallback was taken (see reason)
    reason: str
    limit_bytes: int | None  # min(free memory, --vram-budget); None when neither is known
    reserve_bytes: int  # compute buffer estimate + headroom
    gpu_bytes: int  # weights + caches the chosen plan puts on the GPU (reserve not included)

    def to_json(self) -> dict[str, Any]:
        return {"resolved": self.preset.requested, "cpu_moe_layers": self.cpu_moe_layers, "fits": self.fits,
                "reason": self.reason, "limit_bytes": self.limit_bytes, "reserve_bytes": self.reserve_bytes,
                "gpu_bytes": self.gpu_bytes}


def model_widths(tensors: Sequence[TensorInfo]) -> tuple[int, int]:
    """(n_embd, n_vocab) from token_embd's shape (GGUF order: n_embd, n_vocab); (0, 0) without it."""
    for t in tensors:
        if t.name.startswith("token_embd.") and len(t.shape) == 2:
            return t.shape[0], t.shape[1]
    return 0, 0


def compute_buffer_estimate(n_embd: int, n_vocab: int, n_head: int, n_ctx: int, n_ubatch: int,
                            flash_attn: bool | None) -> int:
    """Bytes of llama.cpp's GPU compute buffer, estimated (None: llama.cpp's auto, which turns flash
    attention on where the GPU backend supports it, as CUDA does)."""
    per_token = 4 * n_vocab + 6 * n_ctx + 4 * ACTIVATION_WIDTHS * n_embd
    if flash_attn is False:
        per_token += 4 * n_head * n_ctx
    return n_ubatch * per_token


def expert_bytes_by_layer(tensors: Sequence[TensorInfo], n_layer: int) -> list[int]:
    out = [0] * n_layer
    for t in tensors:
        il = tensor_layer(t.name)
        if il is not None and il < n_layer and tensor_class(t.name) == "routed_expert":
            out[il] += t.nbytes
    return out


def _plan(tensors: Sequence[TensorInfo], shape: MemoryShape, preset: Preset, ctx_size: int) -> PlacementPlan:
    return plan_placement(tensors, shape, preset, ctx_size, gpu_backend=True)


def _experts_preset(k: int, n_layer: int) -> Preset:
    if k == 0:
        return Preset("all", "all", -1, None)
    if k >= n_layer:
        return Preset("attn", "attn", -1, None)
    return Preset("attn", "attn", -1, k)


def choose_auto(tensors: Sequence[TensorInfo], shape: MemoryShape, ctx_size: int, free_bytes: int | None,
                budget_bytes: int | None, n_ubatch: int = 512, flash_attn: bool | None = None) -> AutoChoice:
    """The placement `auto` means for this model on a GPU with `free_bytes` free, capped at
    `budget_bytes` (None or 0: no cap).

    Fallbacks, each with fits=False: no limit known -> `attn`; not even `attn` fits -> the largest
    `-ngl N` whose non-expert part fits, experts all in RAM; not even N = 1 -> `none`.
    """
    n_layer = shape.n_layer
    limits = [b for b in (free_bytes, budget_bytes or None) if b is not None]
    limit = min(limits) if limits else None
    n_embd, n_vocab = model_widths(tensors)
    n_ctx = padded_ctx(ctx_size, shape)
    compute = compute_buffer_estimate(n_embd, n_vocab, shape.n_head, n_ctx, n_ubatch, flash_attn)
    reserve = compute + max(HEADROOM_MIN, int(HEADROOM_FRACTION * (limit or 0)))
    attn = _experts_preset(n_layer, n_layer)
    base = _plan(tensors, shape, attn, ctx_size).gpu_bytes
    if limit is None:
        return AutoChoice(attn, n_layer, False, "GPU free memory unknown and no --vram-budget: attn",
                          None, reserve, base)
    room = limit - reserve - base
    if room >= 0:
        experts = expert_bytes_by_layer(tensors, n_layer)
        k = n_layer
        while k > 0 and experts[k - 1] <= room:  # the last layers' experts go first
            room -= experts[k - 1]
            k -= 1
        preset = _experts_preset(k, n_layer)
        reason = (f"{n_layer - k}/{n_layer} layers' experts on the GPU; limit {format_bytes(limit)}, "
                  f"reserve {format_bytes(reserve)}")
        return AutoChoice(preset, k, True, reason, limit, reserve, _plan(tensors, shape, preset, ctx_size).gpu_bytes)
    for ngl in range(shape.n_layer_all, 0, -1):  # fewer GPU layers, experts in RAM
        preset = Preset(str(ngl), "layers", ngl, shape.n_layer_all)
        gpu = _plan(tensors, shape, preset, ctx_size).gpu_bytes
        if gpu + reserve <= limit:
            reason = (f"non-expert weights and caches ({format_bytes(base)}) + reserve exceed the limit "
                      f"{format_bytes(limit)}: {ngl} layers offloaded, experts in RAM")
            return AutoChoice(preset, n_layer, False, reason, limit, reserve, gpu)
    reason = f"not even the output layer fits in {format_bytes(limit)} with the reserve: CPU only"
    return AutoChoice(Preset("none", "none", 0, None), n_layer, False, reason, limit, reserve, 0)


# --- BF16 on older GPUs ------------------------------------------------------------------------------

# ggml-cuda logs each device at init: "Device 0: NVIDIA H200, compute capability 9.0, VMM: yes, ..."
COMPUTE_CAPABILITY = re.compile(r"compute capability (\d+)\.(\d+)")
BF16_FAST_SINCE = (8, 0)  # Ampere: native BF16 tensor-core math
VOLTA = (7, 0)  # the first tensor cores (F16)
BF16_RECIPE_HINT = "coder-quant build SRC OUT.gguf --recipe attn-f16-iq4xs (or attn-q8-iq4xs, smaller)"


def parse_compute_capability(log_text: str) -> tuple[int, int] | None:
    """The lowest compute capability among the CUDA devices llama.cpp logged; None if none was."""
    found = [(int(a), int(b)) for a, b in COMPUTE_CAPABILITY.findall(log_text)]
    return min(found) if found else None


def bf16_warning(compute_capability: tuple[int, int] | None, gpu_types: set[str]) -> str | None:
    """A warning when BF16 tensors go to a CUDA GPU older than compute capability 8.0, else None.

    `compute_capability` is None when the GPU is not CUDA (or its init log was not seen);
    `gpu_types` are the ggml type names of the tensors placed on the GPU.
    """
    if compute_capability is None or compute_capability >= BF16_FAST_SINCE:
        return None
    if "BF16" not in {t.upper() for t in gpu_types}:
        return None
    major, minor = compute_capability
    # the pinned llama.cpp sends BF16 products of more tokens than this through cuBLAS in F32
    batch = 8 if compute_capability >= VOLTA else 128
    return (
        f"this GPU (compute capability {major}.{minor}) has no fast BF16 math: llama.cpp multiplies the BF16 "
        f"tensors on it in F32, without tensor cores, for batches of more than {batch} tokens, so prompts "
        f"are processed slowly (decoding one token at a time is not affected). Rebuild the GGUF with the "
        f"preserved tensors in F16 or Q8_0: {BF16_RECIPE_HINT}; the result is then no longer bit-for-bit "
        "with the original weights."
    )


def resolve_auto(tensors: Sequence[TensorInfo], shape: MemoryShape, settings: Any,
                 free_bytes: int | None) -> AutoChoice:
    """choose_auto with the numbers taken from `settings`; logs a warning when a fallback was taken."""
    batch = getattr(settings, "batch", 2048) or 2048
    ubatch = min(getattr(settings, "ubatch", 512) or 512, batch)
    choice = choose_auto(tensors, shape, getattr(settings, "ctx_size", 4096), free_bytes,
                         getattr(settings, "vram_budget", None), ubatch, getattr(settings, "flash_attn", None))
    if choice.fits:
        log.info("--gpu-layers auto: %s (%s)", choice.preset.requested, choice.reason)
    else:
        log.warning("--gpu-layers auto: %s", choice.reason)
    return choice
