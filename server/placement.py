"""Where each tensor of a GGUF lives: a pure function from a tensor list and a preset to a plan.

Presets (`--gpu-layers`):
  attn  every layer offloaded, routed experts kept in system RAM (the default with a GPU backend)
  all   everything offloaded
  none  CPU only
  N     llama.cpp's `-ngl N`: the output layer and the last N-1 repeating layers are offloaded
  auto  attn plus as many layers' experts as fit in the GPU's free memory (server/placement_auto.py)
`--cpu-moe-layers K` keeps the routed experts of layers 0..K-1 in RAM, like llama.cpp's `--n-cpu-moe`.

The rules mirror llama.cpp's loader (src/llama-model.cpp `load_tensors`, src/llama-model-loader.cpp
`create_tensor`), and the cache sizes its memory modules (src/llama-kv-cache.cpp,
src/llama-memory-recurrent.cpp), so the plan agrees with the buffer sizes llama.cpp logs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

Device = Literal["gpu", "cpu"]
PresetKind = Literal["attn", "all", "none", "layers", "auto"]
PlacementClass = Literal[
    "attention", "ssm", "shared_expert", "routed_expert", "embedding", "output", "norm", "router", "other"
]
PLACEMENT_CLASSES: tuple[PlacementClass, ...] = (
    "attention", "ssm", "shared_expert", "routed_expert", "embedding", "output", "norm", "router", "other",
)
NAMED_PRESETS: tuple[str, ...] = ("attn", "all", "none", "auto")

# Bounds applied before any number reaches llama.cpp (its fields are int32 / uint32).
MAX_GPU_LAYERS = 100_000
MAX_CTX_SIZE = 1 << 22

# llama.cpp's routed-expert pattern (common/common.h LLM_FFN_EXPS_REGEX), the one `--cpu-moe` and
# `--n-cpu-moe` use, so our overrides place exactly the tensors theirs place.
EXPERT_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"

# Tensors of llama.cpp's input layer (src/llama-arch.cpp, LLM_TENSOR_LAYER_INPUT): always on the CPU.
INPUT_TENSORS = ("token_embd", "pos_embd", "token_types")

# Tensor class by GGUF name; ordered, first match wins.
CLASS_RULES: tuple[tuple[str, PlacementClass], ...] = (
    (r"^token_embd\.", "embedding"),
    (r"^output\.", "output"),
    (r"^output_norm\.", "norm"),
    (EXPERT_PATTERN + r"\.", "routed_expert"),
    (r"\.ffn_\w+_shexp\.", "shared_expert"),
    (r"\.ffn_gate_inp\.", "router"),
    (r"\.(ssm_\w+|attn_qkv\.|attn_gate\.)", "ssm"),  # linear attention (Gated DeltaNet) in qwen3next
    (r"\.attn_(q|k|v|output|q_norm|k_norm)\.", "attention"),
    (r"\.(attn_norm|post_attention_norm|ffn_norm)\.", "norm"),
)
_CLASS_RULES = tuple((re.compile(p), c) for p, c in CLASS_RULES)
_BLOCK = re.compile(r"^blk\.(\d+)\.")

# Hybrid architectures whose layers are either recurrent (linear attention) or full attention.
HYBRID_ARCHS = ("qwen3next",)


class PlacementError(ValueError):
    """A preset, a bound or a GGUF's metadata does not allow a placement."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF as its header describes it."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]  # GGUF order (ne0 first)
    nbytes: int


@dataclass(frozen=True)
class MemoryShape:
    """The hyperparameters that size llama.cpp's KV cache and recurrent state."""

    n_layer_all: int  # block_count, including MTP (nextn) layers
    n_nextn: int  # trailing MTP layers; llama.cpp skips their tensors unless asked to load them
    recurrent: tuple[bool, ...]  # per layer: linear attention (recurrent state) or full attention (KV)
    n_head_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    ssm_conv_kernel: int = 0
    ssm_inner_size: int = 0
    ssm_state_size: int = 0
    ssm_group_count: int = 0
    ctx_train: int = 0
    n_head: int = 0  # query heads (largest over layers); sizes attention scores without flash attention

    @property
    def n_layer(self) -> int:
        return self.n_layer_all - self.n_nextn

    def kv_bytes(self, il: int, n_ctx: int) -> int:
        """K and V of one full-attention layer, F16 (llama_kv_cache, default type_k/type_v)."""
        per_cell = self.key_length * self.n_head_kv[il] + self.value_length * max(self.n_head_kv)
        return 2 * per_cell * n_ctx

    def recurrent_bytes(self) -> int:
        """Conv state r and SSM state s of one linear-attention layer for one sequence, F32
        (llama_hparams::n_embd_r / n_embd_s)."""
        conv = max(self.ssm_conv_kernel - 1, 0) * (self.ssm_inner_size + 2 * self.ssm_group_count * self.ssm_state_size)
        state = self.ssm_state_size * self.ssm_inner_size
        return 4 * (conv + state)


@dataclass(frozen=True)
class Preset:
    """A parsed `--gpu-layers` / `--cpu-moe-layers` request."""

    requested: str  # as given: "attn", "all", "none" or a number
    kind: PresetKind
    n_gpu_layers: int  # llama.cpp's n_gpu_layers; -1 = every layer and the output
    cpu_moe_layers: int | None


@dataclass(frozen=True)
class TensorPlacement:
    name: str
    tclass: PlacementClass
    layer: int | None  # None for input/output tensors
    device: Device
    nbytes: int
    ggml_type: str = ""


@dataclass(frozen=True)
class CacheBlock:
    kind: Literal["kv", "recurrent"]
    layer: int
    device: Device
    nbytes: int


def parse_preset(gpu_layers: str | int | None, cpu_moe_layers: int | None = None) -> Preset:
    """Parse `--gpu-layers` ("attn" | "all" | "none" | N) and `--cpu-moe-layers`; bounds checked."""
    text = "attn" if gpu_layers is None else str(gpu_layers).strip().lower()
    if cpu_moe_layers is not None:
        if isinstance(cpu_moe_layers, bool) or not isinstance(cpu_moe_layers, int):
            raise PlacementError(f"cpu_moe_layers must be an integer, got {cpu_moe_layers!r}")
        if not 0 <= cpu_moe_layers <= MAX_GPU_LAYERS:
            raise PlacementError(f"cpu_moe_layers must be between 0 and {MAX_GPU_LAYERS}, got {cpu_moe_layers}")
    if text == "auto" and cpu_moe_layers:
        raise PlacementError("cpu_moe_layers cannot be combined with gpu_layers auto, which chooses it")
    if text in ("attn", "all", "auto"):  # auto: resolved by plan_for_gguf / placement_auto.choose_auto
        return Preset(text, text, -1, cpu_moe_layers)  # type: ignore[arg-type]
    if text == "none":
        return Preset(text, "none", 0, cpu_moe_layers)
    if not re.fullmatch(r"[0-9]+", text):
        raise PlacementError(f"gpu_layers must be one of {', '.join(NAMED_PRESETS)} or a layer count, got {gpu_layers!r}")
    if len(text) > 7 or int(text) > MAX_GPU_LAYERS:  # (the length first: int() of a huge string is slow)
        raise PlacementError(f"gpu_layers must be at most {MAX_GPU_LAYERS}, got {text}")
    n = int(text)
    return Preset(text, "layers", n, cpu_moe_layers)


def cpu_override_patterns(preset: Preset, n_layer_all: int) -> tuple[str, ...]:
    """Regexes whose tensors llama.cpp must keep in a CPU buffer (tensor_buft_overrides)."""
    if preset.kind == "none":
        return ()
    if preset.cpu_moe_layers:  # None and 0 both mean "not given"
        k = min(preset.cpu_moe_layers, n_layer_all)
        # One alternation instead of llama.cpp's k patterns `blk\.i<EXPERTS>`: the same tensors match.
        return (rf"^blk\.({'|'.join(str(i) for i in range(k))})" + EXPERT_PATTERN,)
    if preset.kind == "attn":
        return (EXPERT_PATTERN,)
    return ()


def layer_on_gpu(il: int, n_layer_all: int, n_gpu_layers: int, gpu_backend: bool) -> bool:
    """llama.cpp's layer split: layers i_gpu_start..n_layer_all (the last being the output layer)
    go to the GPU (src/llama-model.cpp `load_tensors`, single device)."""
    if not gpu_backend:
        return False
    ngl = n_layer_all + 1 if n_gpu_layers < 0 else n_gpu_layers
    i_gpu_start = max(n_layer_all + 1 - ngl, 0)
    act_gpu_layers = min(ngl, n_layer_all + 1)
    return i_gpu_start <= il < i_gpu_start + act_gpu_layers


def tensor_class(name: str) -> PlacementClass:
    for pattern, tclass in _CLASS_RULES:
        if pattern.search(name):
            return tclass
    return "other"


def tensor_layer(name: str) -> int | None:
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class PlacementPlan:
    """Per-tensor devices plus cache memory for one model, preset and context size."""

    preset_requested: str
    preset_effective: str
    gpu_backend: bool
    n_gpu_layers: int  # as passed to llama.cpp (-1 = all)
    overrides: tuple[str, ...]  # patterns sent to llama.cpp's CPU buffer type
    n_layer_all: int
    ctx_size: int  # cells per sequence after llama.cpp's padding to 256
    tensors: tuple[TensorPlacement, ...]
    skipped: tuple[str, ...]  # tensors llama.cpp does not load (MTP layers)
    caches: tuple[CacheBlock, ...]
    auto: dict[str, Any] | None = None  # AutoChoice.to_json() when `auto` was requested

    def weight_bytes(self, device: Device) -> int:
        return sum(t.nbytes for t in self.tensors if t.device == device)

    def cache_bytes(self, kind: Literal["kv", "recurrent"], device: Device) -> int:
        return sum(c.nbytes for c in self.caches if c.kind == kind and c.device == device)

    def device_bytes(self, device: Device) -> int:
        return self.weight_bytes(device) + self.cache_bytes("kv", device) + self.cache_bytes("recurrent", device)

    @property
    def gpu_bytes(self) -> int:
        return self.device_bytes("gpu")

    @property
    def cpu_bytes(self) -> int:
        return self.device_bytes("cpu")

    def by_class(self, device: Device) -> dict[str, int]:
        out = {c: 0 for c in PLACEMENT_CLASSES}
        for t in self.tensors:
            if t.device == device:
                out[t.tclass] += t.nbytes
        return {c: b for c, b in out.items() if b}

    def gpu_layer_count(self) -> int:
        """Offloaded layers counted as llama.cpp's `offloaded N/M layers` does (output included)."""
        return sum(layer_on_gpu(il, self.n_layer_all, self.n_gpu_layers, self.gpu_backend)
                   for il in range(self.n_layer_all + 1))

    def to_json(self) -> dict[str, Any]:
        return {
            "preset_requested": self.preset_requested,
            "preset_effective": self.preset_effective,
            "gpu_backend": self.gpu_backend,
            "n_gpu_layers": self.n_gpu_layers,
            "gpu_layers_offloaded": self.gpu_layer_count(),
            "layers_total": self.n_layer_all + 1,
            "overrides": list(self.overrides),
            "ctx_size": self.ctx_size,
            "gpu_bytes": self.gpu_bytes,
            "cpu_bytes": self.cpu_bytes,
            "weights": {d: {"total": self.weight_bytes(d), **self.by_class(d)} for d in ("gpu", "cpu")},
            "kv_cache": {d: self.cache_bytes("kv", d) for d in ("gpu", "cpu")},
            "recurrent_state": {d: self.cache_bytes("recurrent", d) for d in ("gpu", "cpu")},
            "tensors": [
                {"name": t.name, "device": t.device, "bytes": t.nbytes, "class": t.tclass, "layer": t.layer}
                for t in self.tensors
            ],
            "skipped": list(self.skipped),
            "auto": self.auto,
        }

    def render(self) -> str:
        """A short table for the terminal."""
        requested = self.preset_requested
        if self.auto is not None:
            note = f" (auto: {self.auto['reason']})"
        else:
            note = "" if requested == self.preset_effective else f" (requested {requested}; no GPU backend)"
        lines = [
            f"placement: {self.preset_effective}{note}",
            f"  layers on GPU: {self.gpu_layer_count()}/{self.n_layer_all + 1} (output layer counted, as llama.cpp does)",
        ]
        if self.overrides:
            lines.append("  kept in RAM: " + ", ".join(self.overrides))
        lines.append(f"  {'':<24}{'GPU':>12}{'CPU':>12}")
        for tclass in PLACEMENT_CLASSES:
            gpu, cpu = self.by_class("gpu").get(tclass, 0), self.by_class("cpu").get(tclass, 0)
            if gpu or cpu:
                lines.append(f"  {tclass:<24}{format_bytes(gpu):>12}{format_bytes(cpu):>12}")
        rows = (
            ("weights", self.weight_bytes("gpu"), self.weight_bytes("cpu")),
            (f"KV cache ({self.ctx_size} ctx)", self.cache_bytes("kv", "gpu"), self.cache_bytes("kv", "cpu")),
            ("recurrent state", self.cache_bytes("recurrent", "gpu"), self.cache_bytes("recurrent", "cpu")),
            ("total", self.gpu_bytes, self.cpu_bytes),
        )
        for label, gpu, cpu in rows:
            lines.append(f"  {label:<24}{format_bytes(gpu):>12}{format_bytes(cpu):>12}")
        if self.skipped:
            lines.append(f"  not loaded: {len(self.skipped)} MTP tensors")
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    if n == 0:
        return "0"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def padded_ctx(ctx_size: int, shape: MemoryShape) -> int:
    """Cells per sequence as llama.cpp allocates them: 0 means the training context; padded to 256
    (src/llama-context.cpp)."""
    if isinstance(ctx_size, bool) or not isinstance(ctx_size, int) or not 0 <= ctx_size <= MAX_CTX_SIZE:
        raise PlacementError(f"ctx_size must be an integer between 0 and {MAX_CTX_SIZE}, got {ctx_size!r}")
    n = ctx_size or shape.ctx_train
    if n <= 0:
        raise PlacementError("ctx_size is 0 and the GGUF has no context_length")
    return -(-n // 256) * 256


def plan_placement(
    tensors: Sequence[TensorInfo], shape: MemoryShape, preset: Preset, ctx_size: int, gpu_backend: bool
) -> PlacementPlan:
    """The placement llama.cpp will carry out for these tensors: pure, no I/O."""
    if preset.kind == "auto" and gpu_backend:
        raise PlacementError("gpu_layers auto must be resolved first (server.placement_auto.choose_auto)")
    effective = preset if gpu_backend else Preset(preset.requested, "none", 0, None)
    overrides = cpu_override_patterns(effective, shape.n_layer_all)
    compiled = [re.compile(p) for p in overrides]
    n_layer_all = shape.n_layer_all

    def device_of_layer(il: int) -> Device:
        return "gpu" if layer_on_gpu(il, n_layer_all, effective.n_gpu_layers, gpu_backend) else "cpu"

    placed: list[TensorPlacement] = []
    skipped: list[str] = []
    for t in tensors:
        il = tensor_layer(t.name)
        if il is not None and il >= n_layer_all:
            raise PlacementError(f"tensor {t.name} names layer {il}, but the GGUF has {n_layer_all} layers")
        if il is not None and il >= shape.n_layer:
            skipped.append(t.name)  # MTP block: loaded only on request (llama_model_params.load_mtp)
            continue
        if t.name.split(".")[0] in INPUT_TENSORS:
            device: Device = "cpu"
        elif il is None:
            device = device_of_layer(n_layer_all)  # the output layer
        else:
            device = device_of_layer(il)
        if device == "gpu" and any(p.search(t.name) for p in compiled):
            device = "cpu"
        placed.append(TensorPlacement(t.name, tensor_class(t.name), il, device, t.nbytes, t.ggml_type))

    n_ctx = padded_ctx(ctx_size, shape)
    caches = []
    for il in range(shape.n_layer):
        if shape.recurrent[il]:
            caches.append(CacheBlock("recurrent", il, device_of_layer(il), shape.recurrent_bytes()))
        else:
            caches.append(CacheBlock("kv", il, device_of_layer(il), shape.kv_bytes(il, n_ctx)))
    return PlacementPlan(
        preset_requested=preset.requested,
        preset_effective=effective.requested if gpu_backend else "none",
        gpu_backend=gpu_backend,
        n_gpu_layers=effective.n_gpu_layers,
        overrides=overrides,
        n_layer_all=n_layer_all,
        ctx_size=n_ctx,
        tensors=tuple(placed),
        skipped=tuple(skipped),
        caches=tuple(caches),
    )


# --- reading a GGUF header (the only I/O in this module) -------------------------------------------


def _per_layer(value: Any, n: int, key: str) -> tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n:
            raise PlacementError(f"GGUF key {key} has {len(value)} entries for {n} layers")
        return tuple(int(v) for v in value)
    return (int(value),) * n


def memory_shape_from_fields(fields: dict[str, Any]) -> MemoryShape:
    """Build the cache hyperparameters from GGUF metadata (key -> value)."""
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise PlacementError("GGUF has no general.architecture")

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    n_layer_all = get("block_count")
    if not isinstance(n_layer_all, int) or not 0 < n_layer_all <= 4096:
        raise PlacementError(f"GGUF has no usable {arch}.block_count: {n_layer_all!r}")
    n_nextn = int(get("nextn_predict_layers", 0))
    if not 0 <= n_nextn < n_layer_all:
        raise PlacementError(f"{arch}.nextn_predict_layers ({n_nextn}) does not fit {n_layer_all} layers")
    n_layer = n_layer_all - n_nextn
    n_head = _per_layer(get("attention.head_count", 0), n_layer_all, "attention.head_count")
    n_head_kv = _per_layer(get("attention.head_count_kv", n_head[0]), n_layer_all, "attention.head_count_kv")
    n_embd = int(get("embedding_length", 0))
    head_dim = n_embd // n_head[0] if n_head[0] else 0
    recurrent = get("attention.recurrent_layers")
    if recurrent is not None:
        recurrent_t = tuple(bool(v) for v in recurrent)
        if len(recurrent_t) != n_layer_all:
            raise PlacementError(f"{arch}.attention.recurrent_layers has {len(recurrent_t)} entries")
    elif arch in HYBRID_ARCHS:
        interval = int(get("full_attention_interval", 4))  # llama.cpp's default for qwen3next
        recurrent_t = tuple(i < n_layer and (i + 1) % interval != 0 for i in range(n_layer_all))
    else:
        recurrent_t = (False,) * n_layer_all
    if arch in HYBRID_ARCHS and n_layer and all(recurrent_t[:n_layer]):
        # llama.cpp builds a KV cache with no layers for such a model and aborts the process on its first
        # decode (an unallocated input tensor), so it is refused here instead.
        raise PlacementError(f"the model has no full-attention layer among its {n_layer} layers; "
                             f"llama.cpp cannot run a {arch} model without one")
    return MemoryShape(
        n_layer_all=n_layer_all,
        n_nextn=n_nextn,
        recurrent=recurrent_t,
        n_head_kv=n_head_kv,
        key_length=int(get("attention.key_length", head_dim)),
        value_length=int(get("attention.value_length", head_dim)),
        ssm_conv_kernel=int(get("ssm.conv_kernel", 0)),
        ssm_inner_size=int(get("ssm.inner_size", 0)),
        ssm_state_size=int(get("ssm.state_size", 0)),
        ssm_group_count=int(get("ssm.group_count", 0)),
        ctx_train=int(get("context_length", 0)),
        n_head=max(n_head),
    )


def read_gguf(path: str | Path) -> tuple[list[TensorInfo], MemoryShape]:
    """Tensor list and cache hyperparameters from a GGUF header (tensor data is not read)."""
    from gguf import GGUFReader  # imported here: only this reader needs it

    path = Path(path)
    if not path.is_file():
        raise PlacementError(f"model file not found: {path}")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise PlacementError(f"{path}: not a readable GGUF ({exc})") from exc
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("tokenizer.", "GGUF."))}
    tensors = [
        TensorInfo(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes))
        for t in reader.tensors
    ]
    return tensors, memory_shape_from_fields(fields)


def gpu_backend_available() -> bool:
    import llama_cpp  # loads the native library; kept out of module import

    return bool(llama_cpp.llama_supports_gpu_offload())


def preset_from_settings(settings: Any) -> Preset:
    return parse_preset(getattr(settings, "gpu_layers", "attn"), getattr(settings, "cpu_moe_layers", None))


def plan_for_gguf(path: str | Path, settings: Any, gpu_backend: bool | None = None,
                  free_bytes: int | None = None) -> PlacementPlan:
    """Plan the placement of the GGUF at `path` for `settings` (gpu_layers, cpu_moe_layers, ctx_size,
    vram_budget), without loading it. `gpu_backend` defaults to what the installed llama.cpp build
    supports; then `auto` also asks llama.cpp for the GPU's free memory unless `free_bytes` is given."""
    tensors, shape = read_gguf(path)
    probe = gpu_backend is None
    if gpu_backend is None:
        gpu_backend = gpu_backend_available()
    preset = preset_from_settings(settings)
    ctx_size = getattr(settings, "ctx_size", 4096)
    if preset.kind != "auto" or not gpu_backend:
        return plan_placement(tensors, shape, preset, ctx_size, gpu_backend)
    from server.placement_auto import resolve_auto  # it builds on this module

    if free_bytes is None and probe:
        from server.loader import gpu_free_bytes  # the backend query loads llama.cpp, not the model

        free_bytes = gpu_free_bytes()
    choice = resolve_auto(tensors, shape, settings, free_bytes)
    plan = plan_placement(tensors, shape, choice.preset, ctx_size, gpu_backend)
    return replace(plan, preset_requested="auto", auto=choice.to_json())
