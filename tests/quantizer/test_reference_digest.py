"""`coder-quant build --recipe bf16` against llama.cpp's own converter, tensor by tensor, key by key.

The digests in tests/data were made by llama.cpp's convert_hf_to_gguf.py (`--outtype bf16
--no-mtp`, see scripts/reference_digest.py): one of ../shared/reference-model, and some of
synthetic checkpoints that exercise what the reference model does not: an F32 source that needs
rounding, fused experts, a padded vocabulary, an F16 source, an expert width no block divides,
a transformers-4 style config.json and MTP tensors to drop.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from quantizer.cli import main
from quantizer.inspect import digest
from quantizer.synthetic import write_checkpoint

DATA = Path(__file__).resolve().parent.parent / "data"
SYNTHETIC_DIGESTS = sorted(DATA.glob("synthetic-*-bf16-digest.json"))

# Keys our build writes and the reference converter does not, and why. No reference key may
# differ or be missing.
EXTRA_KEY_PREFIXES = {
    "coder_quant.": "our provenance: tool version, recipe and rules, imatrix, source file hashes",
}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def source_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def build_bf16(source: Path, out: Path) -> dict:
    assert main(["build", str(source), str(out), "--recipe", "bf16", "--quiet"]) == 0
    return digest(out)


def assert_same_as_reference(mine: dict, reference: dict) -> None:
    assert mine["gguf_version"] == reference["gguf_version"]
    assert mine["alignment"] == reference["alignment"]
    theirs = {t["name"]: t for t in reference["tensors"]}
    ours = {t["name"]: t for t in mine["tensors"]}
    assert sorted(ours) == sorted(theirs), "tensor names differ"
    differing = [name for name in theirs if ours[name] != theirs[name]]
    assert not differing, f"tensors differ from the reference: {differing}"
    assert [t["name"] for t in mine["tensors"]] == [t["name"] for t in reference["tensors"]], "tensor order"

    extra = [k for k in mine["metadata"] if k not in reference["metadata"]]
    unexplained = [k for k in extra if not k.startswith(tuple(EXTRA_KEY_PREFIXES))]
    assert not unexplained, f"keys the reference does not write: {unexplained}"
    missing = [k for k in reference["metadata"] if k not in mine["metadata"]]
    assert not missing, f"reference keys missing: {missing}"
    changed = {k: (mine["metadata"][k], v) for k, v in reference["metadata"].items() if mine["metadata"][k] != v}
    assert not changed, f"keys whose value differs (ours, reference): {changed}"
    assert [k for k in mine["metadata"] if k in reference["metadata"]] == list(reference["metadata"]), "key order"


def test_reference_model_bf16_matches_llama_cpp(reference_model: Path, tmp_path: Path) -> None:
    reference = load(DATA / "reference-bf16-digest.json")
    if source_hashes(reference_model) != reference["source_sha256"]:
        pytest.skip("../shared/reference-model is not the checkpoint the digest was made from; regenerate it")
    mine = build_bf16(reference_model, tmp_path / "reference-bf16.gguf")
    assert_same_as_reference(mine, reference)
    assert set(mine["metadata"]) - set(reference["metadata"]), "provenance keys expected"


@pytest.mark.parametrize("digest_file", SYNTHETIC_DIGESTS, ids=lambda p: p.name.split("-bf16")[0])
def test_synthetic_bf16_matches_llama_cpp(digest_file: Path, tmp_path: Path) -> None:
    reference = load(digest_file)
    source = tmp_path / "synthetic-tiny"  # general.name derives from the folder name
    write_checkpoint(source, **reference["synthetic"])
    if source_hashes(source) != reference["source_sha256"]:
        pytest.skip(f"the generator no longer writes the checkpoint {digest_file.name} was made from")
    assert_same_as_reference(build_bf16(source, tmp_path / "out.gguf"), reference)


def test_digest_files_cover_the_promised_cases() -> None:
    args = [load(p)["synthetic"] for p in SYNTHETIC_DIGESTS]
    assert any(a.get("dtype") == "f32" and a.get("fused_experts") for a in args)
    assert any(a.get("dtype") == "f16" and a.get("expert_ff", 256) % 32 for a in args)
    assert any(a.get("config_style") == "v4" and a.get("mtp_layers") for a in args)
