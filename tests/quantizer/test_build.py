"""`coder-quant build`: the bf16 output equals llama.cpp's own converter, tensor by tensor and key
by key (tests/data/reference-bf16-digest.json); quantized outputs load and generate in llama.cpp;
errors leave nothing behind."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantizer.arch import get_arch
from quantizer.arch.base import bf16_to_f32, f32_to_bf16
from quantizer.build import build_gguf, checkpoint_specs
from quantizer.cli import main
from quantizer.errors import CheckpointError
from quantizer.imatrix import write_imatrix_gguf
from quantizer.inspect import digest
from quantizer.source import open_checkpoint
from quantizer.writer import KEY_PREFIX, partial_paths, sidecar_path
from tests.quantizer.test_source import safetensors_bytes

DIGEST = Path(__file__).resolve().parent.parent / "data" / "reference-bf16-digest.json"
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def reference_digest() -> dict:
    return json.loads(DIGEST.read_text())


@pytest.fixture(scope="module")
def bf16_build(reference_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bf16") / "model-bf16.gguf"
    build_gguf(reference_model, out, recipe="bf16")
    return out


@pytest.fixture(scope="module")
def iq4xs_build(reference_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("iq4xs") / "model-iq4xs.gguf"
    build_gguf(reference_model, out, threads=2)  # default recipe: attn-bf16-iq4xs
    return out


def own_metadata(record: dict) -> dict:
    return {k: v for k, v in record["metadata"].items() if not k.startswith(KEY_PREFIX)}


# ---- pure parts: no weights read ----


def coder_next_config() -> dict:
    """Qwen3-Coder-Next's hyper-parameters (transformers 4.x style: no layer_types)."""
    return {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 2048,
        "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
        "intermediate_size": 5120, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
        "num_experts": 512, "num_experts_per_tok": 10, "vocab_size": 151936, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "partial_rotary_factor": 0.25,
        "rope_theta": 5000000, "tie_word_embeddings": False,
    }  # fmt: skip


def test_coder_next_specs_from_config_alone() -> None:
    specs = get_arch(coder_next_config()).specs_from_config(coder_next_config())
    assert len(specs) == 3 + 48 * 13 + 36 * 4 + 12 * 6  # globals, per layer, linear / full attention
    assert len({s.name for s in specs}) == len(specs)
    params = sum(math.prod(s.shape) for s in specs)
    assert 79.6e9 < params < 79.7e9
    kept = sum(math.prod(s.shape) * (2 if s.base_type == "bf16" else 4) for s in specs if s.tclass != "routed_expert")
    assert 4.7e9 < kept < 4.9e9
    gate = next(s for s in specs if s.name == "blk.0.ffn_gate_exps.weight")
    assert gate.shape == (512, 512, 2048) and len(gate.sources) == 512 and gate.tclass == "routed_expert"
    assert next(s for s in specs if s.name == "blk.3.attn_q.weight").shape == (2 * 16 * 256, 2048)
    assert next(s for s in specs if s.name == "blk.0.attn_qkv.weight").shape == (2 * 16 * 128 + 32 * 128, 2048)


def test_unknown_architecture_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="unsupported architecture .*LlamaForCausalLM"):
        get_arch({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


def test_bf16_rounding_is_nearest_even_with_quiet_nans() -> None:
    one = np.float32(1.0).view(np.uint32)
    bits = np.array([one + 0x7FFF, one + 0x8000, one + 0x18000, one + 0x8001, 0x7F800001, 0x7F7FFFFF], np.uint32)
    words = f32_to_bf16(bits.view(np.float32))
    assert words.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x7FC0, 0x7F80]
    assert bf16_to_f32(np.array([0x3F80, 0xC000], np.uint16)).tolist() == [1.0, -2.0]


def test_specs_follow_the_reference_order(reference_model: Path, reference_digest: dict) -> None:
    specs = checkpoint_specs(open_checkpoint(reference_model))
    assert [(s.name, s.base_type.upper(), list(reversed(s.shape))) for s in specs] == [
        (t["name"], t["type"], t["shape"]) for t in reference_digest["tensors"]
    ]


# ---- the bf16 preset is llama.cpp's converter, byte for byte ----


def test_bf16_matches_reference_converter(bf16_build: Path, reference_digest: dict) -> None:
    mine = digest(bf16_build)
    assert mine["tensors"] == reference_digest["tensors"]
    assert list(own_metadata(mine).items()) == list(reference_digest["metadata"].items())


def test_provenance_and_sidecar(bf16_build: Path, reference_model: Path) -> None:
    meta = digest(bf16_build)["metadata"]
    assert meta[KEY_PREFIX + "recipe"]["value"] == "bf16"
    assert meta[KEY_PREFIX + "recipe.rules"]["value"] == [".=keep (keep source precision)"]
    files = meta[KEY_PREFIX + "source.files"]["value"]
    hashes = dict(zip(files, meta[KEY_PREFIX + "source.sha256"]["value"], strict=True))
    assert {"model-00002-of-00003.safetensors", "tokenizer.json"} <= set(hashes)
    import hashlib

    shard = reference_model / "model-00002-of-00003.safetensors"
    assert hashes[shard.name] == hashlib.sha256(shard.read_bytes()).hexdigest()
    side = sidecar_path(bf16_build).read_text()
    assert side == f"{hashlib.sha256(bf16_build.read_bytes()).hexdigest()}  {bf16_build.name}\n"
    assert partial_paths(bf16_build) == []


def _relayout(reference_model: Path, dest: Path, *, fused: bool, dtype: str, mtp: bool = False) -> Path:
    """The reference weights in another layout: one shard, fused experts and/or F32 values."""
    ckpt = open_checkpoint(reference_model)
    n_expert = ckpt.config["num_experts"]
    tensors: dict[str, tuple[str, list[int], bytes]] = {}

    def put(name: str, words: np.ndarray) -> None:
        if dtype == "F32":
            tensors[name] = ("F32", list(words.shape), bf16_to_f32(words).astype("<f4").tobytes())
        else:
            tensors[name] = ("BF16", list(words.shape), words.astype("<u2").tobytes())

    for name in ckpt.order:
        if fused and ".mlp.experts." in name:
            continue
        put(name, ckpt.raw(name))
    if fused:
        for bid in range(ckpt.config["num_hidden_layers"]):
            p = f"model.layers.{bid}.mlp.experts."
            stack = {proj: np.stack([ckpt.raw(f"{p}{x}.{proj}.weight") for x in range(n_expert)])
                     for proj in ("gate_proj", "up_proj", "down_proj")}
            put(p + "gate_up_proj", np.concatenate([stack["gate_proj"], stack["up_proj"]], axis=1))
            put(p + "down_proj", stack["down_proj"])
    if mtp:
        put("mtp.fc.weight", ckpt.raw("model.layers.0.linear_attn.out_proj.weight"))
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(safetensors_bytes(tensors))
    for name in SIDE_FILES:
        shutil.copy(reference_model / name, dest / name)
    return dest


@pytest.mark.parametrize(
    ("fused", "dtype", "mtp"),
    [(True, "BF16", False), (False, "F32", True)],
    ids=["fused-experts", "f32-source-with-mtp"],
)
def test_other_layouts_give_the_same_tensors(
    reference_model: Path, reference_digest: dict, tmp_path: Path, fused: bool, dtype: str, mtp: bool
) -> None:
    # folder named like the original: general.name derives from it
    source = _relayout(reference_model, tmp_path / "src" / "reference-model", fused=fused, dtype=dtype, mtp=mtp)
    out = tmp_path / "out.gguf"
    build_gguf(source, out, recipe="bf16")
    mine = digest(out)
    assert mine["tensors"] == reference_digest["tensors"]
    assert own_metadata(mine) == reference_digest["metadata"]


# ---- quantized presets ----


def test_default_recipe_quantizes_only_routed_experts(iq4xs_build: Path, reference_digest: dict) -> None:
    reference = {t["name"]: t for t in reference_digest["tensors"]}
    mine = digest(iq4xs_build)
    for tensor in mine["tensors"]:
        if "_exps." in tensor["name"]:
            assert tensor["type"] == "IQ4_XS", tensor["name"]
        else:
            assert tensor == reference[tensor["name"]]  # copied bit for bit
    assert mine["metadata"]["general.file_type"]["value"] == 30  # LLAMA_FTYPE_MOSTLY_IQ4_XS
    assert mine["metadata"][KEY_PREFIX + "recipe"]["value"] == "attn-bf16-iq4xs"


@pytest.mark.parametrize("which", ["bf16_build", "iq4xs_build"])
def test_llama_cpp_loads_and_generates(which: str, request: pytest.FixtureRequest) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = request.getfixturevalue(which)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    try:
        out = llm("import os\n\ndef ", max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0
        assert out["choices"][0]["text"].strip()
    finally:
        llm.close()


def test_imatrix_is_used_and_recorded(reference_model: Path, iq4xs_build: Path, tmp_path: Path) -> None:
    specs = checkpoint_specs(open_checkpoint(reference_model))
    rng = np.random.default_rng(3)
    experts = [s for s in specs if s.tclass == "routed_expert"]
    sums = {s.name: rng.uniform(0.0, 4.0, (s.shape[0], s.shape[-1])).astype(np.float32) for s in experts}
    counts = {s.name: np.full(s.shape[0], 64.0, dtype=np.float32) for s in experts}
    imatrix = tmp_path / "model.imatrix.gguf"
    write_imatrix_gguf(imatrix, sums, counts, ["random"], 1, 64)
    out = tmp_path / "with-imatrix.gguf"
    build_gguf(reference_model, out, imatrix=imatrix, threads=2)
    with_imat, without = digest(out), digest(iq4xs_build)
    assert with_imat["metadata"][KEY_PREFIX + "imatrix.file"]["value"] == imatrix.name
    changed = {a["name"] for a, b in zip(with_imat["tensors"], without["tensors"], strict=True) if a != b}
    assert changed == {s.name for s in experts}


# ---- errors: one line, non-zero exit, nothing written ----


def test_refuses_to_overwrite_without_force(bf16_build: Path, reference_model: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    before = bf16_build.read_bytes()
    code = main(["build", str(reference_model), str(bf16_build), "--recipe", "bf16", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "--force" in err and "\n" not in err
    assert bf16_build.read_bytes() == before


def test_interrupt_leaves_nothing(reference_model: Path, tmp_path: Path) -> None:
    def interrupt(phase: str, done: int, total: int) -> None:
        if phase == "write":
            raise KeyboardInterrupt

    out = tmp_path / "x.gguf"
    with pytest.raises(KeyboardInterrupt):
        build_gguf(reference_model, out, recipe="bf16", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def _broken_copy(reference_model: Path, dest: Path, breakage: str) -> Path:
    dest.mkdir()
    for item in reference_model.iterdir():
        (dest / item.name).symlink_to(item)
    if breakage == "truncated":
        shard = dest / "model-00003-of-00003.safetensors"
        data = shard.read_bytes()
        shard.unlink()
        shard.write_bytes(data[: len(data) - 1000])
    elif breakage == "no-tokenizer":
        (dest / "tokenizer.json").unlink()
    elif breakage == "unknown-arch":
        (dest / "config.json").unlink()
        (dest / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    return dest


@pytest.mark.parametrize(
    ("breakage", "message"),
    [("truncated", "past the end of the file"), ("no-tokenizer", "missing tokenizer.json"),
     ("unknown-arch", "unsupported architecture")],
)
def test_checkpoint_errors_are_one_line(reference_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        breakage: str, message: str) -> None:
    source = _broken_copy(reference_model, tmp_path / "src", breakage)
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    code = main(["build", str(source), str(out), "--recipe", "bf16", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("coder-quant: error:") and message in err and "\n" not in err
    assert list(out.parent.iterdir()) == []
