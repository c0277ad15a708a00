"""Checkpoint reader: header validation on tiny hand-made safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from quantizer.errors import CheckpointError
from quantizer.source import INDEX_NAME, open_checkpoint, read_header

CONFIG = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next"}


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], header: dict | None = None) -> bytes:
    """A safetensors file from (dtype, shape, data) per name, data laid out in order; `header`
    entries replace the computed ones (to build malformed files)."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, (dtype, shape, data) in tensors.items():
        meta[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    meta.update(header or {})
    raw = json.dumps(meta).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def write_checkpoint(folder: Path, shards: dict[str, bytes], index: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    if index is not None:
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return folder


def bf16(values: list[float]) -> bytes:
    return (np.array(values, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


TWO = {
    "b.weight": ("BF16", [2, 2], bf16([1.0, -2.0, 0.5, 3.0])),
    "a.weight": ("F32", [3], np.array([1.5, 2.5, -1.0], dtype="<f4").tobytes()),
    "c.weight": ("F16", [2], np.array([0.25, -4.0], dtype="<f2").tobytes()),
}


def test_reads_bf16_f16_f32_as_views(tmp_path: Path) -> None:
    ckpt = open_checkpoint(write_checkpoint(tmp_path, {"model.safetensors": safetensors_bytes(TWO)}))
    assert ckpt.order == ("a.weight", "b.weight", "c.weight")  # sorted, as the reference reads them
    words = ckpt.raw("b.weight")
    assert words.dtype == np.uint16 and words.shape == (2, 2)
    assert ((words.astype(np.uint32) << 16).view(np.float32) == [[1.0, -2.0], [0.5, 3.0]]).all()
    assert ckpt.raw("a.weight").tolist() == [1.5, 2.5, -1.0]
    assert ckpt.raw("c.weight").dtype == np.float16 and ckpt.raw("c.weight").tolist() == [0.25, -4.0]
    assert not ckpt.raw("a.weight").flags.writeable


def test_sharded_order_follows_index(tmp_path: Path) -> None:
    shard1 = safetensors_bytes({"z.weight": TWO["a.weight"]})
    shard2 = safetensors_bytes({"a.weight": TWO["a.weight"], "m.weight": TWO["c.weight"]})
    index = {"z.weight": "model-00001-of-00002.safetensors", "a.weight": "model-00002-of-00002.safetensors",
             "m.weight": "model-00002-of-00002.safetensors"}
    folder = write_checkpoint(tmp_path, {"model-00001-of-00002.safetensors": shard1,
                                         "model-00002-of-00002.safetensors": shard2}, index)
    assert open_checkpoint(folder).order == ("z.weight", "a.weight", "m.weight")


def test_truncated_shard(tmp_path: Path) -> None:
    data = safetensors_bytes(TWO)
    folder = write_checkpoint(tmp_path, {"model.safetensors": data[:-3]})
    with pytest.raises(CheckpointError, match="past the end of the file"):
        open_checkpoint(folder)


def test_truncated_header(tmp_path: Path) -> None:
    data = safetensors_bytes(TWO)
    path = tmp_path / "x.safetensors"
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)


def test_offsets_past_end(tmp_path: Path) -> None:
    bad = {"a.weight": {"dtype": "F32", "shape": [3], "data_offsets": [100, 112]}}
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(TWO, bad))
    with pytest.raises(CheckpointError, match="'a.weight'.*past the end"):
        read_header(path)


def test_overlapping_tensors(tmp_path: Path) -> None:
    bad = {"c.weight": {"dtype": "F16", "shape": [2], "data_offsets": [6, 10]}}  # inside b.weight
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(TWO, bad))
    with pytest.raises(CheckpointError, match="overlap"):
        read_header(path)


def test_length_must_match_dtype_and_shape(tmp_path: Path) -> None:
    bad = {"b.weight": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}}
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(TWO, bad))
    with pytest.raises(CheckpointError, match=r"8 bytes, but BF16 x \[2, 3\] needs 12"):
        read_header(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "bad shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "bad data_offsets"),
        ({"dtype": "F32", "shape": [1]}, "bad data_offsets"),
        ("nonsense", "not an object"),
    ],
)
def test_malformed_entries(tmp_path: Path, entry: object, message: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(TWO, {"a.weight": entry}))
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_bad_header_size(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"[1, ")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(path)


def test_missing_index_entry(tmp_path: Path) -> None:
    shard = safetensors_bytes(TWO)
    index = {"a.weight": "model-00001-of-00001.safetensors", "b.weight": "model-00001-of-00001.safetensors"}
    folder = write_checkpoint(tmp_path, {"model-00001-of-00001.safetensors": shard}, index)
    with pytest.raises(CheckpointError, match="'c.weight'.*no model.safetensors.index.json entry"):
        open_checkpoint(folder)


def test_index_entry_missing_from_shard(tmp_path: Path) -> None:
    shard = safetensors_bytes({"a.weight": TWO["a.weight"]})
    index = {"a.weight": "model-00001-of-00001.safetensors", "q.weight": "model-00001-of-00001.safetensors"}
    folder = write_checkpoint(tmp_path, {"model-00001-of-00001.safetensors": shard}, index)
    with pytest.raises(CheckpointError, match="'q.weight'.*lacks it"):
        open_checkpoint(folder)


def test_missing_shard_and_config(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "a", {}, {"a.weight": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00002.safetensors' is missing"):
        open_checkpoint(folder)
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        open_checkpoint(tmp_path / "b")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(write_checkpoint(tmp_path / "c", {}))


def test_unsupported_dtype_only_fails_when_read(tmp_path: Path) -> None:
    tensors = {**TWO, "ids": ("I64", [2], np.array([1, 2], dtype="<i8").tobytes())}
    ckpt = open_checkpoint(write_checkpoint(tmp_path, {"model.safetensors": safetensors_bytes(tensors)}))
    with pytest.raises(CheckpointError, match="dtype I64"):
        ckpt.raw("ids")
    with pytest.raises(CheckpointError, match="lacks tensor 'nope'"):
        ckpt.raw("nope")
