"""Records shared by the architecture modules, the planner and the writer.

A TensorSpec says what one GGUF tensor is made of; it carries names, shapes and
dtypes only, never weights, so planning stays a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TensorClass = Literal[
    "attention",  # full-attention q/k/v/o and their gates
    "ssm",  # linear-attention (Gated DeltaNet) projections, conv, A, dt, its norm
    "shared_expert",  # shared expert FFN and its gate
    "routed_expert",  # stacked *_exps tensors: the bulk of the weights
    "embedding",  # token_embd
    "output",  # lm head
    "norm",  # RMS norms outside the SSM block
    "router",  # ffn_gate_inp (expert router)
]

TENSOR_CLASSES: tuple[TensorClass, ...] = (
    "attention",
    "ssm",
    "shared_expert",
    "routed_expert",
    "embedding",
    "output",
    "norm",
    "router",
)


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor of the GGUF, as the architecture module defines it."""

    name: str  # GGUF tensor name, e.g. "blk.0.ffn_down_exps.weight"
    sources: tuple[str, ...]  # checkpoint tensor names it is built from
    shape: tuple[int, ...]  # numpy (row-major) shape; GGUF's ne is this reversed
    tclass: TensorClass
    base_type: str  # type the reference converter writes with --outtype bf16 ("bf16" or "f32")
    transform: str  # name of the value transform the arch module applies ("copy", "neg_exp", ...)
