"""quantizer.synthetic: random Qwen3-Next checkpoints with the real layout, config and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from quantizer.arch.base import bf16_to_f32, f32_to_bf16
from quantizer.source import open_checkpoint
from quantizer.synthetic import (
    CHUNK_ELEMENTS,
    PRESETS,
    SyntheticTensor,
    chat_template,
    config_json,
    resolve_shape,
    tensor_list,
    tensor_values,
    write_checkpoint,
)
from quantizer.synthetic_tokenizer import ADDED_TOKENS, SPECIAL_TOKENS, bpe_vocab, byte_symbols


def values(folder: Path, name: str) -> np.ndarray:
    """A checkpoint tensor as float32, whatever its dtype."""
    ckpt = open_checkpoint(folder)
    raw = np.array(ckpt.raw(name))
    return bf16_to_f32(raw) if ckpt.dtype(name) == "BF16" else raw.astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "m", preset="tiny").path


def test_files_index_and_shapes(tiny: Path) -> None:
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    expected = {t.name: t.shape for t in tensor_list(PRESETS["tiny"])}
    seen = {}
    for shard in shards:
        with safe_open(tiny / shard, "np") as f:  # the reference library accepts the files
            for name in f.keys():
                seen[name] = tuple(f.get_slice(name).get_shape())
                assert f.get_slice(name).get_dtype() == "BF16"
    assert seen == expected
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == 2 * sum(int(np.prod(s)) for s in expected.values())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny / name).is_file()


def test_config_describes_the_tensors(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["Qwen3NextForCausalLM"]
    assert config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    ckpt = open_checkpoint(tiny)
    assert ckpt.shape("model.layers.0.linear_attn.in_proj_qkvz.weight") == (
        2 * config["linear_num_key_heads"] * config["linear_key_head_dim"]
        + 2 * config["linear_num_value_heads"] * config["linear_value_head_dim"],
        config["hidden_size"],
    )
    assert ckpt.shape("model.layers.3.self_attn.q_proj.weight")[0] == 2 * config["num_attention_heads"] * config["head_dim"]
    assert ckpt.shape("model.embed_tokens.weight") == (config["vocab_size"], config["hidden_size"])
    assert len([n for n in ckpt.names if n.startswith("model.layers.1.mlp.experts.")]) == 3 * config["num_experts"]


def test_values_are_finite_and_sensibly_scaled(tiny: Path) -> None:
    for name in open_checkpoint(tiny).names:
        assert np.isfinite(values(tiny, name)).all(), name
    assert abs(values(tiny, "model.layers.0.input_layernorm.weight").mean()) < 0.05  # converter adds 1
    assert abs(values(tiny, "model.layers.0.linear_attn.norm.weight").mean() - 1.0) < 0.05  # stored as is
    a_log = values(tiny, "model.layers.0.linear_attn.A_log")
    assert ((a_log >= 0) & (a_log <= np.log(16.0) + 0.01)).all()
    assert 0.01 < values(tiny, "model.layers.2.mlp.experts.5.up_proj.weight").std() < 0.03


def test_same_seed_same_bytes_other_seed_other_bytes(tiny: Path, tmp_path: Path) -> None:
    again = write_checkpoint(tmp_path / "again", preset="tiny").path
    other = write_checkpoint(tmp_path / "other", preset="tiny", seed=1).path
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes()
    assert (other / "model-00002-of-00002.safetensors").read_bytes() != (tiny / name).read_bytes()


def test_fused_experts_hold_the_same_values(tiny: Path, tmp_path: Path) -> None:
    fused = write_checkpoint(tmp_path / "fused", preset="tiny", fused_experts=True, shards=1).path
    assert not (fused / "model.safetensors.index.json").exists()
    s = PRESETS["tiny"]
    gate_up = values(fused, "model.layers.1.mlp.experts.gate_up_proj")
    down = values(fused, "model.layers.1.mlp.experts.down_proj")
    assert gate_up.shape == (s.n_experts, 2 * s.expert_ff, s.hidden)
    for e in (0, s.n_experts - 1):
        p = f"model.layers.1.mlp.experts.{e}."
        assert np.array_equal(gate_up[e, : s.expert_ff], values(tiny, p + "gate_proj.weight"))
        assert np.array_equal(gate_up[e, s.expert_ff :], values(tiny, p + "up_proj.weight"))
        assert np.array_equal(down[e], values(tiny, p + "down_proj.weight"))


def test_f32_and_f16_sources(tiny: Path, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.shared_expert.down_proj.weight"
    exact = write_checkpoint(tmp_path / "exact", preset="tiny", dtype="f32", bf16_values=True, shards=3).path
    assert len(open_checkpoint(exact).files) == 3
    assert np.array_equal(values(exact, name), values(tiny, name))
    f32 = write_checkpoint(tmp_path / "f32", preset="tiny", dtype="f32").path
    wide = values(f32, name)
    assert not np.array_equal(wide, values(tiny, name))
    # the bf16 checkpoint is the f32 one rounded to nearest even
    assert np.array_equal(f32_to_bf16(wide), open_checkpoint(tiny).raw(name))
    f16 = write_checkpoint(tmp_path / "f16", preset="tiny", dtype="f16").path
    assert open_checkpoint(f16).dtype(name) == "F16"
    assert np.allclose(values(f16, name), wide, rtol=1e-3, atol=1e-6)


def test_shape_overrides_and_fallback_widths(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "m", preset="tiny", expert_ff=72, layers=2, n_experts=4, vocab=600)
    assert ckpt.shape.expert_ff == 72 and ckpt.shape.vocab == 600
    opened = open_checkpoint(ckpt.path)
    assert opened.shape("model.layers.1.mlp.experts.3.down_proj.weight") == (256, 72)
    assert opened.shape("lm_head.weight") == (600, 256)
    assert json.loads((ckpt.path / "config.json").read_text())["layer_types"] == ["linear_attention"] * 2
    fewer = resolve_shape("coder-next", {"n_experts": 8, "vocab": 8192})
    assert (fewer.top_k, fewer.bpe_tokens, fewer.hidden) == (8, 8192 - 26, 2048)


def test_mtp_tensors_and_transformers4_config(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "m", preset="tiny", mtp_layers=1, config_style="v4")
    config = json.loads((ckpt.path / "config.json").read_text())
    assert "layer_types" not in config and config["full_attention_interval"] == 4
    assert config["rope_theta"] == 10000.0 and "rope_parameters" not in config
    names = open_checkpoint(ckpt.path).names
    assert {"mtp.fc.weight", "mtp.norm.weight", "mtp.layers.0.self_attn.q_proj.weight"} <= names


def test_blocks_bound_memory() -> None:
    big = SyntheticTensor("big", (3 * CHUNK_ELEMENTS // 1024 + 5, 1024), "linear")
    blocks = list(tensor_values(big, seed=0))
    assert len(blocks) == 4
    assert max(b.size for b in blocks) <= CHUNK_ELEMENTS
    assert sum(b.shape[0] for b in blocks) == big.shape[0]


def test_coder_next_preset_has_the_real_layer_shapes() -> None:
    s = PRESETS["coder-next"]
    shapes = {t.name: t.shape for t in tensor_list(s)}
    assert shapes["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (12288, 2048)
    assert shapes["model.layers.0.linear_attn.in_proj_ba.weight"] == (64, 2048)
    assert shapes["model.layers.0.linear_attn.conv1d.weight"] == (8192, 1, 4)
    assert shapes["model.layers.0.linear_attn.out_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (8192, 2048)
    assert shapes["model.layers.3.self_attn.k_proj.weight"] == (512, 2048)
    assert shapes["model.layers.3.self_attn.o_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.2.mlp.experts.511.gate_proj.weight"] == (512, 2048)
    assert shapes["model.layers.2.mlp.shared_expert.down_proj.weight"] == (2048, 512)
    assert shapes["lm_head.weight"] == (151936, 2048)
    config = config_json(s, "bf16")
    assert (config["num_experts"], config["num_experts_per_tok"], config["vocab_size"]) == (512, 10, 151936)
    assert s.tokenizer_size == 151669  # 151643 BPE tokens + 22 special + 4 added, as Qwen3-Coder


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preset"):
        write_checkpoint(tmp_path / "m", preset="huge")
    with pytest.raises(ValueError, match="kv_heads"):
        write_checkpoint(tmp_path / "m", heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="vocab"):
        write_checkpoint(tmp_path / "m", vocab=200)
    with pytest.raises(ValueError, match="shards"):
        write_checkpoint(tmp_path / "m", shards=0)
    assert not (tmp_path / "m").exists()


def test_tokenizer_files(tiny: Path) -> None:
    tok = json.loads((tiny / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    assert len(vocab) == PRESETS["tiny"].bpe_tokens
    assert list(vocab)[:256] == list(byte_symbols().values())
    for left, right in tok["model"]["merges"]:  # every merge joins existing tokens into a later one
        assert vocab[left + right] > max(vocab[left], vocab[right])
    added = {t["content"]: t for t in tok["added_tokens"]}
    assert list(added) == [*SPECIAL_TOKENS, *ADDED_TOKENS]
    assert [t["id"] for t in added.values()] == list(range(len(vocab), len(vocab) + len(added)))
    assert added["<tool_call>"]["special"] and not added["<think>"]["special"]
    config = json.loads((tiny / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["chat_template"] == chat_template()
    assert bpe_vocab(300)[0] == dict(list(vocab.items())[:300])


def test_template_is_the_published_one(qwen3_coder_template: str) -> None:
    assert chat_template() == qwen3_coder_template


def test_llama_cpp_runs_the_built_model(tiny: Path, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from quantizer.cli import main

    out = tmp_path / "tiny.gguf"
    assert main(["build", str(tiny), str(out), "--recipe", "bf16", "--quiet"]) == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, verbose=False, logits_all=True)
    text = "def add(a, b):\n    return a + b  # café <|im_end|>"
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [len(json.loads(
        (tiny / "tokenizer.json").read_text())["model"]["vocab"]) + SPECIAL_TOKENS.index("<|im_end|>")]
    assert llm.detokenize(tokens, special=True).decode() == text
    assert len(tokens) < len(text.encode())  # merges apply
    llm.eval(tokens)
    assert np.isfinite(np.array(llm.scores[: len(tokens)])).all()


def test_shards_written_in_parallel_are_the_same_files(tmp_path: Path) -> None:
    one = write_checkpoint(tmp_path / "one", preset="tiny", layers=2, shards=3)
    many = write_checkpoint(tmp_path / "many", preset="tiny", layers=2, shards=3, workers=3)
    assert len(one.files) == 3
    for name in one.files:
        assert (one.path / name).read_bytes() == (many.path / name).read_bytes(), name
