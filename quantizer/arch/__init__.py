"""Architecture registry: config.json -> the module that knows how to convert it.

Each architecture module exposes `GGUF_ARCH`, `HF_ARCHITECTURES`, `MODEL_TYPES`,
`hparams(config)` (config.json with the defaults the reference assumes),
`specs_from_config(config, source_names=None, source_order=None)`,
`build_tensor(checkpoint, spec)`, `tensor_f32(checkpoint, spec)` and
`add_hparams(writer, config, file_type)`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from quantizer.errors import CheckpointError

# Modules tried in order; the first whose names match config.json wins.
ARCH_MODULES = ("quantizer.arch.qwen3next",)


def _modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in ARCH_MODULES]


def supported_architectures() -> list[str]:
    return [arch for module in _modules() for arch in module.HF_ARCHITECTURES]


def get_arch(config: dict[str, Any]) -> ModuleType:
    """The architecture module for a checkpoint, chosen by `architectures` then `model_type`."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    modules = _modules()
    for module in modules:
        if any(name in module.HF_ARCHITECTURES for name in architectures):
            return module
    for module in modules:
        if model_type in module.MODEL_TYPES:
            return module
    described = ", ".join(architectures) or model_type or "none given"
    raise CheckpointError(
        f"unsupported architecture ({described}); supported: {', '.join(supported_architectures())}"
    )
