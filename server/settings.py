"""Every default of the server, in one place.

Values come from (highest first) the command line, `CODER_SERVE_*` environment
variables, then the defaults below. The CLI only maps its flags onto this model.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
               "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_size(value: str | int) -> int:
    """Bytes from "4GiB", "512MiB", "2G" (binary), "1.5GB" (decimal) or a plain number of bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (examples: 4GiB, 512MiB, 0)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def is_loopback_host(host: str) -> bool:
    """True when a bind address only accepts connections from this machine."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CODER_SERVE_", frozen=True, extra="forbid")

    # --- model and placement (read by server.loader / server.placement) ---
    model: Path | None = None  # GGUF to serve; None serves the built-in demo model
    alias: str | None = None  # model id clients see; defaults to the file name without .gguf
    gpu_layers: str = Field("attn", pattern=r"^(attn|all|none|auto|\d+)$")  # what goes to the GPU
    # cap on GPU memory `--gpu-layers auto` plans for (e.g. "24GiB"); 0: the GPU's free memory only
    vram_budget: int = Field(0, ge=0)
    cpu_moe_layers: int = Field(0, ge=0)  # keep routed experts of the first N layers on the CPU
    ctx_size: int = Field(32768, ge=0, le=1 << 22)  # tokens of context; 0 uses the model's trained length
    # decode threads; None: one per physical core this process may run on, within its CPU quota
    # (server.loader.default_threads)
    threads: int | None = Field(None, ge=1, le=1024)
    threads_batch: int | None = Field(None, ge=1, le=1024)  # prompt threads; None: as --threads, else every CPU (within the quota)
    # prompt tokens per llama_decode call (n_batch) and per compute pass (n_ubatch); None: 4096 and 4096 where
    # routed experts stay in RAM beside a GPU (long prompts then move each expert to the GPU once per 4096
    # tokens instead of once per 512), except under auto, whose plan sizes the compute buffer for 512;
    # else llama.cpp's 2048 and 512 (see docs/benchmarks.md)
    batch: int | None = Field(None, ge=1, le=65536)
    ubatch: int | None = Field(None, ge=1, le=65536)
    flash_attn: bool | None = None  # None leaves llama.cpp's default
    mmap: bool | None = None  # None: the loader decides (no mmap when experts stay in RAM beside a GPU)
    # llama.cpp's repacked CPU layouts (CPU_REPACK, AMX) for the weights in RAM; False keeps the file's
    # layout (a way out on CPUs whose repacked kernels fault)
    repack: bool = True
    # Weights in RAM beside a GPU go to the GPU's pinned host buffer (CUDA_Host), from which prompt batches
    # are multiplied on the GPU; False lets llama.cpp put them in its repacked CPU layouts instead (faster
    # decoding for types that have one; prompts then run on the CPU). llama.cpp's `no_host`, inverted.
    host_buffer: bool = True
    # bind llama.cpp's CPU threads one per core (OpenMP's OMP_PROC_BIND=close, OMP_PLACES=cores; server.affinity)
    pin_threads: bool = False
    verbose: bool = False  # pass llama.cpp's own log through
    seed: int = Field(0xFFFFFFFF, ge=0, le=0xFFFFFFFF)  # sampling seed when a request has none; max = random
    # RAM for prompt checkpoints of models with a recurrent state (e.g. "4GiB"); 0 turns the cache off.
    cache_ram: int = Field(4 << 30, ge=0)

    # --- HTTP ---
    host: str = "127.0.0.1"  # loopback by default: nothing else on the network can reach the server
    port: int = Field(8080, ge=0, le=65535)
    api_key: SecretStr | None = None  # when set, /v1/* and /metrics require "Authorization: Bearer KEY"
    cors_origins: list[str] = Field(default_factory=list)  # CORS stays off unless origins are given
    max_queue: int = Field(16, ge=0)  # requests allowed to wait behind the running one; more get 429
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # larger request bodies get 413
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- sampling defaults for fields a request leaves out (Qwen3-Coder's recommended values) ---
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.8, ge=0.0, le=1.0)
    top_k: int = Field(20, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.05, gt=0.0, le=10.0)
    repeat_last_n: int = Field(64, ge=0)  # tokens the penalties look back over

    # --- demo model ---
    cache_dir: Path | None = None  # where the demo GGUF is built; None: $XDG_CACHE_HOME or ~/.cache

    @field_validator("cache_ram", "vram_budget", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("api key must not be empty: an empty key would let every request through")
        return value

    @field_validator("host")
    @classmethod
    def _host_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("host must not be empty")
        return value

    @property
    def loopback_only(self) -> bool:
        return is_loopback_host(self.host)
