"""`coder-quant inspect` and the GGUF digest: classes, byte totals, provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from quantizer.arch import get_arch
from quantizer.cli import main
from quantizer.inspect import BIG_ARRAY, classify, digest, summarize
from quantizer.synthetic import PRESETS, config_json, write_checkpoint


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = write_checkpoint(tmp_path_factory.mktemp("src") / "tiny", preset="tiny").path
    out = tmp_path_factory.mktemp("out") / "tiny-q4k.gguf"
    assert main(["build", str(src), str(out), "--recipe", "attn-bf16-q4k", "--quiet"]) == 0
    return out


def test_classes_agree_with_the_architecture_table() -> None:
    config = config_json(PRESETS["coder-next"], "bf16")
    specs = get_arch(config).specs_from_config(config)
    assert [classify(s.name) for s in specs] == [s.tclass for s in specs]


def test_summary_groups_bytes_by_class(built: Path) -> None:
    s = summarize(built)
    assert s.architecture == "qwen3next" and len(s.tensors) == 73
    by_class = {c.tclass: c for c in s.classes}
    assert set(by_class) == {"attention", "ssm", "shared_expert", "routed_expert", "embedding", "output", "norm", "router"}
    assert dict(by_class["routed_expert"].by_type) == {"Q4_K": by_class["routed_expert"].nbytes}
    assert by_class["routed_expert"].n_tensors == 12
    assert set(dict(by_class["attention"].by_type)) == {"BF16"}
    assert sum(c.nbytes for c in s.classes) == s.tensor_bytes < s.file_bytes == built.stat().st_size
    provenance = dict(s.provenance)
    assert provenance["coder_quant.recipe"] == "attn-bf16-q4k"
    assert "tokenizer.json" in provenance["coder_quant.source.files"]


def test_cli_text_and_json(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(built), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "routed_expert" in text and "coder_quant.recipe: attn-bf16-q4k" in text
    assert "blk.0.ffn_up_exps.weight" in text
    assert main(["inspect", str(built), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tensor_bytes"] == sum(t["bytes"] for t in record["tensors"])
    assert {c["class"]: c["tensors"] for c in record["classes"]}["router"] == 4
    assert record["provenance"]["coder_quant.recipe"] == "attn-bf16-q4k"


def test_foreign_gguf_has_no_provenance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plain.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("test.ints", list(range(BIG_ARRAY + 1)))
    writer.add_array("test.small", [1, 2, 3])
    writer.add_string("test.text", "x" * 600)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(2, 16))
    writer.add_tensor("mystery", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "provenance: none" in out and "other" in out
    d = digest(path)
    assert d["tensors"][0] == {
        "name": "token_embd.weight", "type": "F32", "shape": [16, 2],
        "sha256": hashlib.sha256(np.arange(32, dtype=np.float32).tobytes()).hexdigest(),
    }
    assert d["metadata"]["test.small"] == {"type": "ARRAY[INT32]", "value": [1, 2, 3]}
    assert set(d["metadata"]["test.ints"]) == {"type", "sha256", "length"}
    assert d["metadata"]["test.text"]["length"] == 600


def test_not_a_gguf_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_text("hello")
    assert main(["inspect", str(bogus)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"coder-quant: error: {bogus}: not a readable GGUF file")
