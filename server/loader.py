"""Load a GGUF through llama.cpp with the placement of `server.placement` carried out.

llama.cpp places tensors by name pattern (`llama_model_params.tensor_buft_overrides`, what
llama-server's `-ot REGEX=BUFFER` fills). llama-cpp-python's `Llama` builds its model parameters
itself and has no argument for that field, so `open_model` hands it parameters with the override
array already set, pointing at the CPU buffer type of the very ggml library llama.cpp was linked
against. The returned summary reports the placement in effect, with the buffer sizes llama.cpp logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp

from server.placement import PlacementError, PlacementPlan, format_bytes, plan_for_gguf
from server.placement_auto import bf16_warning, parse_compute_capability

log = logging.getLogger(__name__)

MAX_THREADS = 1024
MAX_BATCH = 1 << 16
CGROUP_ROOT = Path("/sys/fs/cgroup")  # where cpu_quota reads the process's CPU limits
# llama.cpp's own batch sizes, and ours where routed experts stay in RAM beside a GPU: there llama.cpp
# copies each expert tensor to the GPU once per micro-batch of a long prompt, so larger micro-batches
# copy less (H200, 4 Coder-Next layers: prompt of 4096 tokens 3.6x faster; docs/benchmarks.md).
DEFAULT_BATCH = 2048
DEFAULT_UBATCH = 512
OFFLOAD_BATCH = 4096

# llama.cpp log lines that report buffer sizes, by what the buffer holds:
#   load_tensors:   CPU_Mapped model buffer size =    31.61 MiB
#   llama_kv_cache:        CPU KV buffer size =     0.50 MiB
#   llama_memory_recurrent:        CPU RS buffer size =     0.21 MiB
#   sched_reserve:        CPU compute buffer size =    14.57 MiB
BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|RS|compute) buffer size\s*=\s*([\d.]+) MiB")
BUFFER_KINDS = {"model": "model", "KV": "kv", "RS": "recurrent", "compute": "compute"}
OVERRIDE_LINE = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")

# Llama.__init__ reads llama_*_default_params() from this module; see _default_params_with.
_PARAMS_LOCK = threading.Lock()


class ModelLoadError(RuntimeError):
    """llama.cpp refused the model or its placement."""


class _TensorBuftOverride(ctypes.Structure):
    # struct llama_model_tensor_buft_override (include/llama.h)
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def is_host_buffer(name: str) -> bool:
    """Whether a llama.cpp buffer lives in system RAM: CPU, CPU_Mapped, CPU_REPACK, AMX, CUDA_Host..."""
    return name.startswith("CPU") or name.endswith("_Host") or name == "AMX"


def parse_buffer_sizes(text: str) -> dict[str, dict[str, int]]:
    """Buffer sizes from llama.cpp's log, {kind: {buffer name: bytes}}; MiB to 2 decimals, as logged."""
    out: dict[str, dict[str, int]] = {kind: {} for kind in BUFFER_KINDS.values()}
    for name, kind, mib in BUFFER_LINE.findall(text):
        bucket = out[BUFFER_KINDS[kind]]
        bucket[name] = bucket.get(name, 0) + round(float(mib) * (1 << 20))
    return out


def reported_bytes(buffers: dict[str, dict[str, int]], host: bool,
                   kinds: tuple[str, ...] = ("model", "kv", "recurrent")) -> int:
    return sum(b for kind in kinds for name, b in buffers.get(kind, {}).items() if is_host_buffer(name) == host)


def compare_buffers(plan: dict[str, Any], buffers: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Planned bytes (PlacementPlan.to_json()) per device next to the buffer sizes llama.cpp logged.

    Allowed difference: the log's rounding to 0.01 MiB per buffer, plus alignment padding per
    tensor (GGUF data: 32 bytes, CUDA buffers: 128). A CPU_Mapped buffer spans its tensors' range in
    the file; where the CPU backend also repacked some of them (CPU_REPACK, AMX) it covers those
    bytes twice, so there the log may only exceed the plan.
    """
    n_tensors = {d: sum(1 for t in plan["tensors"] if t["device"] == d) for d in ("gpu", "cpu")}
    planned = {"model": plan["weights"], "kv": plan["kv_cache"], "recurrent": plan["recurrent_state"]}
    names = set(buffers.get("model", {}))
    overlap = "CPU_Mapped" in names and bool(names & {"CPU_REPACK", "AMX"})
    rows: dict[str, Any] = {}
    for kind, per_device in planned.items():
        for device in ("gpu", "cpu"):
            want = per_device[device]["total"] if kind == "model" else per_device[device]
            got = reported_bytes(buffers, host=device == "cpu", kinds=(kind,))
            slack = (1 << 20) // 200 + 1
            slack *= max(1, len(buffers.get(kind, {})))
            slack += 128 * n_tensors[device] if kind == "model" else 0
            ok = got >= want if (kind, device) == ("model", "cpu") and overlap else abs(got - want) <= slack
            rows[f"{kind}_{device}"] = {"planned": want, "reported": got, "diff": got - want, "ok": ok}
    note = "CPU_Mapped overlaps repacked tensors" if overlap else None
    return {"ok": all(r["ok"] for r in rows.values()), "rows": rows, "note": note}


@contextlib.contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log text while forwarding it to the logger that was installed before."""
    previous = llama_cpp.llama_log_callback()
    previous_data = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunks.append(text.decode("utf-8", errors="replace"))
        if previous:
            previous(level, text, previous_data)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield chunks
    finally:
        llama_cpp.llama_log_set(previous, previous_data)


def _ggml_function(name: str, restype: Any, argtypes: list[Any]) -> Any:
    """A ggml function of the ggml that libllama uses.

    Wheels copy the versioned shared libraries instead of linking them, so opening a libggml file by
    name can load a second copy; resolving the symbol through the loaded libllama finds the one in use.
    """
    candidates: list[Any] = [llama_cpp.llama_cpp._lib]
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for stem in ("ggml-base", "ggml-cpu", "ggml"):
        for file in (f"lib{stem}.so.0", f"lib{stem}.dylib", f"{stem}.dll", f"lib{stem}.so"):
            path = os.path.join(lib_dir, file)
            if os.path.exists(path):
                candidates.append(path)
    for candidate in candidates:
        lib = ctypes.CDLL(candidate) if isinstance(candidate, str) else candidate
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = restype, argtypes
            return fn
    raise ModelLoadError(f"{name} not found in the llama_cpp package's libraries")


@functools.cache
def cpu_buffer_type() -> int:
    """ggml_backend_cpu_buffer_type() of the ggml that libllama uses (llama.cpp compares the pointer)."""
    buft = _ggml_function("ggml_backend_cpu_buffer_type", ctypes.c_void_p, [])()
    if not buft:
        raise ModelLoadError("ggml_backend_cpu_buffer_type returned NULL")
    return int(buft)


GGML_BACKEND_DEVICE_TYPE_GPU = 1  # enum ggml_backend_dev_type (ggml/include/ggml-backend.h): CPU, GPU, IGPU, ...


def gpu_free_bytes() -> int | None:
    """Free memory of the first discrete GPU ggml knows (ggml_backend_dev_memory); None without one.
    Asks the backend only: no model is loaded."""
    try:
        count = _ggml_function("ggml_backend_dev_count", ctypes.c_size_t, [])
        get = _ggml_function("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t])
        dev_type = _ggml_function("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p])
        memory = _ggml_function("ggml_backend_dev_memory", None,
                                [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)])
    except ModelLoadError as exc:
        log.warning("cannot ask llama.cpp for the GPU's free memory: %s", exc)
        return None
    for i in range(count()):
        dev = get(i)
        if dev and dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU:
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            memory(dev, ctypes.byref(free), ctypes.byref(total))
            return int(free.value)  # single-device placement: llama.cpp's first GPU
    return None


@functools.cache
def _backend_init_log() -> str:
    """llama.cpp's log of its first backend initialisation (where ggml-cuda names each device and its
    compute capability); empty when something initialised it before this module was asked."""
    with capture_llama_log() as chunks:
        llama_cpp.llama_supports_gpu_offload()
    return "".join(chunks)


def build_overrides(patterns: tuple[str, ...]) -> tuple[Any, list[bytes]] | None:
    """A NULL-terminated override array sending every pattern to the CPU buffer type, and the byte
    strings it points into (both must outlive the model)."""
    if not patterns:
        return None
    if len(patterns) >= llama_cpp.llama_max_tensor_buft_overrides():
        raise PlacementError(f"{len(patterns)} tensor overrides exceed llama.cpp's limit")
    buft = cpu_buffer_type()
    encoded = [p.encode("ascii") for p in patterns]
    array = (_TensorBuftOverride * (len(encoded) + 1))()
    for slot, pattern in zip(array, encoded, strict=False):
        slot.pattern = pattern
        slot.buft = buft
    return array, encoded  # the last slot stays {NULL, NULL}: the terminator


@contextlib.contextmanager
def _default_params_with(overrides: Any, repack: bool = True, n_outputs_max: int = 0,
                         host_buffer: bool = True) -> Iterator[None]:
    """Let `Llama.__init__` start from default parameters that carry what it has no argument for: the
    model's tensor-override array, `use_extra_bufts` (llama.cpp's switch for its repacked CPU buffer
    types) and `no_host` (skip the GPU's pinned host buffer for weights in RAM), and the context's
    `n_outputs_max` (0: n_batch).

    `Llama` loads the model and creates the context inside its constructor, so for the duration of
    that call the two parameter factories return defaults with those fields set.
    """
    module = llama_cpp.llama_cpp
    model_defaults, context_defaults = module.llama_model_default_params, module.llama_context_default_params

    def model_params() -> Any:
        params = model_defaults()
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p) if overrides is not None else None
        params.use_extra_bufts = repack
        params.no_host = not host_buffer
        return params

    def context_params() -> Any:
        params = context_defaults()
        params.n_outputs_max = n_outputs_max
        return params

    with _PARAMS_LOCK:
        module.llama_model_default_params, module.llama_context_default_params = model_params, context_params
        try:
            yield
        finally:
            module.llama_model_default_params, module.llama_context_default_params = model_defaults, context_defaults


@functools.cache
def _warn_no_gpu_once(requested: str) -> None:
    log.warning("--gpu-layers %s: this llama.cpp build has no GPU backend; running on the CPU", requested)


def _int_setting(settings: Any, name: str, default: int | None, low: int, high: int) -> int | None:
    value = getattr(settings, name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PlacementError(f"{name} must be an integer between {low} and {high}, got {value!r}")
    return value


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cgroup_dirs(base: Path, path: str) -> Iterator[Path]:
    """`base`/`path` and each of its parents up to `base`."""
    parts = [p for p in path.strip("/").split("/") if p]
    for n in range(len(parts), -1, -1):
        yield base.joinpath(*parts[:n])


def cpu_quota(proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time this process's cgroups allow (a container's `--cpus`), the tightest limit along
    its cgroup path, cgroup v2 or v1; None where nothing limits it or nothing can be read."""
    try:
        text = Path("/proc/self/cgroup").read_text() if proc_cgroup is None else proc_cgroup
    except OSError:
        return None
    limits = []
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2: "quota period" or "max period" in cpu.max
            for d in _cgroup_dirs(root, path):
                with contextlib.suppress(OSError, ValueError):
                    quota, period = (d / "cpu.max").read_text().split()
                    if quota != "max" and int(period) > 0:
                        limits.append(int(quota) / int(period))
        elif "cpu" in controllers.split(","):  # v1: quota -1 is unlimited
            for base in dict.fromkeys((root / controllers, root / "cpu")):
                for d in _cgroup_dirs(base, path):
                    with contextlib.suppress(OSError, ValueError):
                        quota = int((d / "cpu.cfs_quota_us").read_text())
                        period = int((d / "cpu.cfs_period_us").read_text())
                        if quota > 0 and period > 0:
                            limits.append(quota / period)
    return min(limits) if limits else None


def usable_cpu_count() -> int:
    """CPUs this process may run on (its affinity), fewer where its cgroup's CPU quota allows less time:
    threads beyond the quota are descheduled in turn, and llama.cpp's threads wait for the slowest."""
    cpus = len(_usable_cpus())
    quota = cpu_quota()
    return max(1, min(cpus, int(quota))) if quota else cpus


def default_threads() -> int:
    """One thread per physical core this process may run on, within its CPU quota: hyperthread siblings
    share one core's load and store units, and decoding with experts in RAM is bound by memory traffic."""
    cpus = _usable_cpus()
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores = set(cpus)
            break
    return max(1, min(len(cores), usable_cpu_count()))


def batch_sizes(settings: Any, plan: PlacementPlan) -> tuple[int, int]:
    """(n_batch, n_ubatch): the settings' values, or the defaults for this placement. `auto` keeps
    llama.cpp's defaults, for which it estimated the GPU's compute buffer."""
    offload = plan.gpu_backend and bool(plan.overrides) and plan.preset_requested != "auto"
    batch = _int_setting(settings, "batch", None, 1, MAX_BATCH) or (OFFLOAD_BATCH if offload else DEFAULT_BATCH)
    ubatch = _int_setting(settings, "ubatch", None, 1, MAX_BATCH) or (OFFLOAD_BATCH if offload else DEFAULT_UBATCH)
    return batch, min(ubatch, batch)


def llama_arguments(settings: Any, plan: PlacementPlan, mmap: bool) -> dict[str, Any]:
    """Keyword arguments for llama_cpp.Llama, every number bounded."""
    batch, ubatch = batch_sizes(settings, plan)
    kwargs: dict[str, Any] = {
        "n_gpu_layers": plan.n_gpu_layers,
        "n_ctx": plan.ctx_size,
        "n_batch": batch,
        "n_ubatch": ubatch,
        "use_mmap": mmap,
        "verbose": bool(getattr(settings, "verbose", False)),
    }
    threads = _int_setting(settings, "threads", None, 1, MAX_THREADS)
    threads_batch = _int_setting(settings, "threads_batch", None, 1, MAX_THREADS)
    cpus = usable_cpu_count()
    kwargs["n_threads"] = threads or default_threads()
    kwargs["n_threads_batch"] = threads_batch or threads or cpus
    if max(kwargs["n_threads"], kwargs["n_threads_batch"]) > cpus:
        # Beyond the affinity libgomp cuts its idle threads' spinning to a few iterations, so every
        # computation starts by waking sleeping threads; beyond a quota threads are descheduled in turn
        # (docs/benchmarks.md: 3 threads on 2 CPUs decoded 3x slower than 2; 2 on a 1-CPU quota 1.5x slower)
        log.warning("%d threads for decoding and %d for prompts, but this process may use %d CPUs: "
                    "llama.cpp's threads would mostly sleep and wake; use at most %d",
                    kwargs["n_threads"], kwargs["n_threads_batch"], cpus, cpus)
    flash_attn = getattr(settings, "flash_attn", None)
    if flash_attn is not None:
        kwargs["flash_attn"] = bool(flash_attn)
    return kwargs


def choose_mmap(settings: Any, plan: PlacementPlan) -> bool:
    """mmap unless weights are overridden to the CPU while a GPU is used: then llama.cpp advises
    loading without it, so those weights land in pinned host memory (src/llama-model-loader.cpp)."""
    value = getattr(settings, "mmap", None)
    if value is not None:
        return bool(value)
    return not (plan.gpu_backend and plan.overrides)


class PlacedLlama(llama_cpp.Llama):
    """A Llama loaded with tensor-buffer overrides; it owns the override array llama.cpp points into.

    Its context returns logits for one position per llama_decode call (`n_outputs_max` 1), the last
    one, which is all the server asks for: llama.cpp otherwise reserves logits for every token of a
    micro-batch, 2.4 GB of compute buffer at 4,096 tokens and a 151,936-token vocabulary.
    """

    def __init__(self, model_path: str, *, cpu_patterns: tuple[str, ...] = (), repack: bool = True,
                 n_outputs_max: int = 1, host_buffer: bool = True, **kwargs: Any) -> None:
        # Set before loading: the native loader reads the array during __init__, the model keeps it.
        self.placement_overrides = build_overrides(cpu_patterns)
        array = self.placement_overrides[0] if self.placement_overrides else None
        with _default_params_with(array, repack, n_outputs_max, host_buffer):
            super().__init__(model_path, **kwargs)


def _load_or_fail(path: str, plan: PlacementPlan, layouts: dict[str, bool], kwargs: dict[str, Any]) -> PlacedLlama:
    try:
        return PlacedLlama(str(path), cpu_patterns=plan.overrides, **layouts, **kwargs)
    except ValueError as exc:
        raise ModelLoadError(f"llama.cpp could not load {path}: {exc}") from exc


def open_model(path: str, settings: Any, **llama_kwargs: Any) -> tuple[llama_cpp.Llama, dict[str, Any]]:
    """Load `path` with the placement `settings` asks for; returns the model and a summary of the
    placement in effect (for /health and the startup log). Extra keyword arguments go to Llama."""
    init_log = _backend_init_log()
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    # Free memory is asked for only when `auto` needs it: the other presets touch no device before loading.
    wants_free = gpu and str(getattr(settings, "gpu_layers", "")) == "auto"
    plan = plan_for_gguf(path, settings, gpu_backend=gpu, free_bytes=gpu_free_bytes() if wants_free else None)
    if not gpu and plan.preset_requested != "none":
        _warn_no_gpu_once(plan.preset_requested)
    warning = bf16_warning(parse_compute_capability(init_log) if gpu else None,
                           {t.ggml_type for t in plan.tensors if t.device == "gpu"})
    if warning:
        log.warning("%s", warning)
    if getattr(settings, "pin_threads", False) and not os.environ.get("OMP_PROC_BIND"):
        # the CLI sets OpenMP's binding before llama.cpp loads; an app built from Settings elsewhere cannot
        log.warning("pin_threads has no effect here: OMP_PROC_BIND must be set before llama.cpp is loaded "
                    "(coder-serve --pin-threads does that)")
    mmap = choose_mmap(settings, plan)
    repack = bool(getattr(settings, "repack", True))
    host_buffer = bool(getattr(settings, "host_buffer", True))
    layouts = {"repack": repack, "host_buffer": host_buffer}
    kwargs = llama_arguments(settings, plan, mmap) | llama_kwargs
    log.info("loading %s\n%s", path, plan.render())
    # Our larger default micro-batch needs a larger GPU compute buffer; where that is what did not fit,
    # llama.cpp's own sizes may.
    may_fall_back = (kwargs["n_ubatch"] == OFFLOAD_BATCH and not getattr(settings, "ubatch", None)
                     and "n_ubatch" not in llama_kwargs)
    with capture_llama_log() as chunks:
        try:
            model = _load_or_fail(path, plan, layouts, kwargs)
        except ModelLoadError as exc:
            if not may_fall_back:
                raise
            log.warning("%s with %d-token micro-batches; retrying with llama.cpp's %d/%d",
                        exc, OFFLOAD_BATCH, DEFAULT_BATCH, DEFAULT_UBATCH)
            kwargs |= {"n_batch": _int_setting(settings, "batch", None, 1, MAX_BATCH) or DEFAULT_BATCH,
                       "n_ubatch": DEFAULT_UBATCH}
            model = _load_or_fail(path, plan, layouts, kwargs)
    text = "".join(chunks)
    buffers = parse_buffer_sizes(text)
    summary = {
        "preset_requested": plan.preset_requested,
        "preset_effective": plan.preset_effective,
        "gpu_backend": gpu,
        "n_gpu_layers": plan.n_gpu_layers,
        "gpu_layers_offloaded": plan.gpu_layer_count(),
        "layers_total": plan.n_layer_all + 1,
        "overrides": list(plan.overrides),
        "overridden_tensors": len(OVERRIDE_LINE.findall(text)),
        "mmap": mmap,
        "repack": repack,
        "host_buffer": host_buffer,
        "batch": kwargs["n_batch"],
        "ubatch": kwargs["n_ubatch"],
        "threads": kwargs["n_threads"],
        "threads_batch": kwargs["n_threads_batch"],
        # OpenMP's binding as llama.cpp's threads run it (`--pin-threads` sets "close"); None: not bound
        "thread_binding": os.environ.get("OMP_PROC_BIND"),
        "ctx_size": plan.ctx_size,
        "gpu_bytes": plan.gpu_bytes,
        "cpu_bytes": plan.cpu_bytes,
        "reported_gpu_bytes": reported_bytes(buffers, host=False),
        "reported_cpu_bytes": reported_bytes(buffers, host=True),
        "buffers": buffers,
        "auto": plan.auto,
    }
    log.info(
        "placement %s: %d/%d layers on GPU; planned %s GPU, %s CPU; llama.cpp reports %s GPU, %s CPU",
        plan.preset_effective, summary["gpu_layers_offloaded"], summary["layers_total"],
        format_bytes(plan.gpu_bytes), format_bytes(plan.cpu_bytes),
        format_bytes(summary["reported_gpu_bytes"]), format_bytes(summary["reported_cpu_bytes"]),
    )
    return model, summary
