"""Write safetensors files whose tensors are produced block by block, never held whole.

The format is an 8-byte little-endian header length, a JSON header (names, dtypes, shapes and
byte offsets, padded with spaces to a multiple of 8) and the tensors' bytes back to back
(https://github.com/huggingface/safetensors#format). Knowing every size up front, the header can
go first and each tensor be streamed after it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StreamedTensor:
    name: str
    dtype: str  # safetensors dtype name: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    nbytes: int
    blocks: Callable[[], Iterable[bytes]]  # yields exactly nbytes bytes, in order


def write_safetensors(path: Path, tensors: list[StreamedTensor], metadata: dict[str, str] | None = None) -> None:
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with Path(path).open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            start = f.tell()
            for block in t.blocks():
                f.write(block)
            if f.tell() - start != t.nbytes:
                raise RuntimeError(f"{path}: tensor {t.name} produced {f.tell() - start} bytes, expected {t.nbytes}")


def shard_names(shards: int) -> list[str]:
    """transformers' file names: one model.safetensors, or model-0000i-of-0000n.safetensors."""
    if shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]


def split_shards(sizes: list[int], shards: int) -> list[int]:
    """Shard index of each tensor: consecutive groups of about equal bytes, none empty."""
    if not 1 <= shards <= len(sizes):
        raise ValueError(f"shards must be between 1 and {len(sizes)}, got {shards}")
    total = max(1, sum(sizes))
    placement: list[int] = []
    index, done = 0, 0
    for i, size in enumerate(sizes):
        wanted = min(done * shards // total, index + 1)  # never skip a shard
        index = max(index, wanted, shards - (len(sizes) - i))  # leave a tensor for every later shard
        placement.append(index)
        done += size
    return placement
