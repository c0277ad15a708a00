"""`coder-quant verify`: preserved tensors bit-identical, conversions exact, quantized ones measured
against a bound per type, stored types as the recorded recipe plans, hyper-parameters as config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from quantizer import arch as arch_registry
from quantizer import ggml
from quantizer import writer as writer_module
from quantizer.build import checkpoint_specs, rule_texts
from quantizer.cli import main
from quantizer.commands.plan import specs_for_source
from quantizer.errors import VerifyError
from quantizer.inspect import field_value
from quantizer.plan import make_plan
from quantizer.recipes import PRESETS, get_recipe
from quantizer.source import open_checkpoint
from quantizer.synthetic import write_checkpoint
from quantizer.verify import MAX_RELATIVE_RMS, verify_gguf
from quantizer.verify_metadata import parse_rule, planned_types
from quantizer.vocab import load_vocab
from quantizer.writer import KEY_RULES, Provenance, sidecar_path, write_gguf

PRESERVED = "blk.1.attn_gate.weight"  # Gated DeltaNet z projection: reordered from in_proj_qkvz
CONVERTED = "blk.0.attn_qkv.weight"  # stored as F32 by the extra rule below
QUANTIZED = "blk.2.ffn_down_exps.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("src") / "tiny", preset="tiny").path


@pytest.fixture(scope="module")
def built(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "tiny-q4k.gguf"
    argv = ["build", str(source), str(out), "--recipe", "attn-bf16-q4k", "--rule", "attn_qkv=f32", "--quiet"]
    assert main(argv) == 0
    return out


def corrupted_copy(gguf: Path, dest: Path, tensor: str, fill: int | None = None) -> Path:
    """A copy without its sidecar, with one byte of `tensor` flipped (or all its bytes set to `fill`)."""
    copy = dest / gguf.name
    shutil.copy(gguf, copy)
    info = next(t for t in GGUFReader(copy).tensors if t.name == tensor)
    start, size = int(info.data_offset), int(info.n_bytes)
    with copy.open("r+b") as f:
        if fill is None:
            f.seek(start + size // 2)
            byte = f.read(1)[0]
            f.seek(start + size // 2)
            f.write(bytes([byte ^ 0x01]))
        else:
            f.seek(start)
            f.write(bytes([fill]) * size)
    return copy


def overwritten_copy(gguf: Path, dest: Path, tensor: str, data: bytes, offset: int = 0) -> Path:
    """A copy without its sidecar, with `data` written over `tensor`'s bytes from `offset` on."""
    copy = dest / gguf.name
    shutil.copy(gguf, copy)
    info = next(t for t in GGUFReader(copy).tensors if t.name == tensor)
    assert offset + len(data) <= int(info.n_bytes)
    with copy.open("r+b") as f:
        f.seek(int(info.data_offset) + offset)
        f.write(data)
    return copy


def source_values(source: Path, tensor: str) -> np.ndarray:
    """Float32 values of a tensor as llama-quantize would read them."""
    checkpoint = open_checkpoint(source)
    try:
        spec = next(s for s in checkpoint_specs(checkpoint) if s.name == tensor)
        return arch_registry.get_arch(checkpoint.config).tensor_f32(checkpoint, spec)
    finally:
        checkpoint.close()


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("coder-quant: error:")]
    assert len(err) == 1
    return err[0]


def test_good_build_passes(source: Path, built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(source), str(built), "--quiet"]) == 0
    assert "sha256 sidecar ok" in capsys.readouterr().out
    report = verify_gguf(source, built)
    assert report.ok and report.sidecar == "ok"
    status = {c.name: c for c in report.checks}
    assert status[PRESERVED].status == "identical" and status[PRESERVED].type == "bf16"
    assert status[CONVERTED].status == "converted" and status[CONVERTED].type == "f32"
    assert status[QUANTIZED].status == "quantized" and status[QUANTIZED].type == "q4_k"
    quantized = [c for c in report.checks if c.status == "quantized"]
    assert {c.tclass for c in quantized} == {"routed_expert"}
    assert all(0.01 < c.relative_rms < 0.15 for c in quantized)
    assert sum(c.status == "identical" for c in report.checks) == len(report.checks) - len(quantized) - 3


def test_table_lists_every_tensor(source: Path, built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(source), str(built)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(QUANTIZED))
    assert row.split()[2:4] == ["q4_k", "quantized"]
    assert float(row.split()[4]) > 0
    assert len([line for line in out.splitlines() if line.startswith(("blk.", "output", "token_embd"))]) == 73


@pytest.mark.parametrize("tensor", [PRESERVED, CONVERTED, "blk.3.attn_q_norm.weight"])
def test_one_flipped_byte_is_named(source: Path, built: Path, tmp_path: Path, tensor: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    copy = corrupted_copy(built, tmp_path, tensor)
    assert main(["verify", str(source), str(copy), "--quiet"]) == 1
    assert f"tensor {tensor}:" in error_line(capsys)
    report = verify_gguf(source, copy)
    assert [c.name for c in report.failures] == [tensor]
    assert report.sidecar == "absent"


def test_garbage_quantized_tensor_is_named(source: Path, built: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    copy = corrupted_copy(built, tmp_path, QUANTIZED, fill=0xFF)  # f16 block scales become NaN
    assert main(["verify", str(source), str(copy), "--quiet"]) == 1
    assert f"tensor {QUANTIZED}:" in error_line(capsys)


def test_quantized_error_bound_is_enforced(source: Path, built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(source), str(built), "--quiet", "--max-rms", "0.01"]) == 1
    assert "relative RMS error" in error_line(capsys)


def test_sidecar_mismatch(source: Path, built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / built.name
    shutil.copy(built, copy)
    side = sidecar_path(copy)
    side.write_text("0" * 64 + f"  {copy.name}\n")
    assert main(["verify", str(source), str(copy), "--quiet"]) == 1
    assert side.name in error_line(capsys)
    with pytest.raises(VerifyError, match="sha256"):
        verify_gguf(source, copy)
    # the right digest beside a modified file fails the same way
    shutil.copy(sidecar_path(built), side)
    with copy.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))
    with pytest.raises(VerifyError, match="does not match"):
        verify_gguf(source, copy)


def test_other_source_fails(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = write_checkpoint(tmp_path / "other", preset="tiny", seed=1).path
    assert main(["verify", str(other), str(built), "--quiet"]) == 1
    assert "tensor output.weight:" in error_line(capsys)  # the first tensor of the file
    smaller = write_checkpoint(tmp_path / "smaller", preset="tiny", layers=2).path
    with pytest.raises(VerifyError, match="no counterpart"):
        verify_gguf(smaller, built)
    report = verify_gguf(write_checkpoint(tmp_path / "more", preset="tiny", layers=8).path, built)
    missing = [c for c in report.failures if c.detail == "missing from the GGUF"]
    assert missing and all(int(c.name.split(".")[1]) >= 4 for c in missing)


def test_not_a_gguf(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    assert main(["verify", str(source), str(bogus)]) == 1
    assert "bogus.gguf" in error_line(capsys)


def test_reference_model_bf16_verifies(reference_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "reference-bf16.gguf"
    assert main(["build", str(reference_model), str(out), "--recipe", "bf16", "--quiet"]) == 0
    report = verify_gguf(reference_model, out)
    assert report.ok and {c.status for c in report.checks} == {"identical"} and len(report.checks) == 73


# ---- quantized error bounds ----


def test_bounds_cover_every_quantized_type() -> None:
    assert set(MAX_RELATIVE_RMS) == {t for t in ggml.TYPES if ggml.is_quantized(t)}
    assert all(0 < bound < 1.0 for bound in MAX_RELATIVE_RMS.values())  # zeroed data (1.0) always fails
    # the types the presets quantize to sit well below a halved tensor's 0.5
    assert all(MAX_RELATIVE_RMS[t] < 0.45 for t in ("iq4_xs", "iq3_s", "q4_k", "q5_k", "q6_k", "q8_0"))


def test_zeroed_quantized_tensor_fails(source: Path, built: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    name = "blk.0.ffn_up_exps.weight"
    copy = corrupted_copy(built, tmp_path, name, fill=0)  # q4_k scales 0: every value dequantizes to 0
    assert main(["verify", str(source), str(copy), "--quiet"]) == 1
    assert f"tensor {name}:" in error_line(capsys)
    (failure,) = verify_gguf(source, copy).failures
    assert failure.name == name and failure.relative_rms == pytest.approx(1.0) and "all zeros" in failure.detail
    # one bound for every type no longer lets zeros through either
    assert [c.name for c in verify_gguf(source, copy, max_relative_rms=1.0).failures] == [name]


def test_halved_quantized_tensor_fails(source: Path, built: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    halved = ggml.quantize(0.5 * source_values(source, QUANTIZED), "q4_k", threads=1)
    copy = overwritten_copy(built, tmp_path, QUANTIZED, halved.tobytes())
    assert main(["verify", str(source), str(copy), "--quiet"]) == 1
    assert f"tensor {QUANTIZED}: q4_k relative RMS error 0.5" in error_line(capsys)
    assert [c.name for c in verify_gguf(source, copy).failures] == [QUANTIZED]


def test_one_zeroed_expert_is_named(source: Path, built: Path, tmp_path: Path) -> None:
    info = next(t for t in GGUFReader(built).tensors if t.name == QUANTIZED)
    per_expert = int(info.n_bytes) // 8
    copy = overwritten_copy(built, tmp_path, QUANTIZED, bytes(per_expert), offset=3 * per_expert)
    (failure,) = verify_gguf(source, copy).failures
    assert failure.name == QUANTIZED and "expert 3: q4_k data dequantizes to all zeros" in failure.detail


# ---- hyper-parameters ----


def edited_source(source: Path, dest: Path, changes: dict[str, object]) -> Path:
    """A copy of the checkpoint with config.json keys changed (rope_theta where the config keeps it)."""
    copy = dest / source.name
    shutil.copytree(source, copy)
    config = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if key == "rope_theta" and "rope_theta" in (config.get("rope_parameters") or {}):
            config["rope_parameters"]["rope_theta"] = value
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return copy


@pytest.mark.parametrize(("key", "value", "gguf_key"), [
    ("rms_norm_eps", 1e-5, "qwen3next.attention.layer_norm_rms_epsilon"),
    ("rope_theta", 20000.0, "qwen3next.rope.freq_base"),
    ("num_experts_per_tok", 3, "qwen3next.expert_used_count"),
])  # fmt: skip
def test_changed_hyperparameter_is_named(source: Path, built: Path, tmp_path: Path, key: str, value: object,
                                         gguf_key: str, capsys: pytest.CaptureFixture[str]) -> None:
    edited = edited_source(source, tmp_path, {key: value})
    assert main(["verify", str(edited), str(built), "--quiet"]) == 1
    assert f"metadata {gguf_key}: " in error_line(capsys)
    report = verify_gguf(edited, built)
    assert [m.key for m in report.metadata_failures] == [gguf_key] and not report.failures


def test_every_changed_hyperparameter_is_reported(source: Path, built: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    edited = edited_source(source, tmp_path, {"rms_norm_eps": 1e-5, "rope_theta": 20000.0, "num_experts_per_tok": 3})
    assert main(["verify", str(edited), str(built)]) == 1
    out = capsys.readouterr()
    named = [line.split(":")[0] for line in out.out.splitlines() if line.startswith("metadata ")]
    assert sorted(named) == ["metadata qwen3next.attention.layer_norm_rms_epsilon",
                             "metadata qwen3next.expert_used_count", "metadata qwen3next.rope.freq_base"]
    assert "(3 metadata keys failed)" in out.err


def test_good_build_matches_its_config(source: Path, built: Path) -> None:
    report = verify_gguf(source, built)
    keys = {m.key: m for m in report.metadata}
    # float32 storage of 1e-6 reads back as 9.99999997e-07: within tolerance
    eps = keys["qwen3next.attention.layer_norm_rms_epsilon"]
    assert eps.ok and eps.stored != eps.expected
    assert keys["general.file_type"].ok and keys["qwen3next.attention.recurrent_layers"].ok
    assert len(report.metadata) >= 20 and not report.metadata_failures


# ---- stored types against the recorded recipe ----


def write_mislabelled(source: Path, out: Path, recorded: tuple[str, ...], rules: list[str]) -> Path:
    """A GGUF carrying out the plan of attn-bf16-q4k with `rules`, but recording `recorded` as its rules."""
    checkpoint = open_checkpoint(source)
    try:
        module = arch_registry.get_arch(checkpoint.config)
        plan = make_plan(checkpoint_specs(checkpoint), get_recipe("attn-bf16-q4k", rules))
        vocab = load_vocab(checkpoint.path, module.hparams(checkpoint.config))
        write_gguf(out, checkpoint, module, plan.entries, vocab, Provenance("attn-bf16-q4k", recorded, ()))
    finally:
        checkpoint.close()
    return out


def test_type_the_recipe_does_not_plan_fails(source: Path, built: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    recorded = tuple(field_value(GGUFReader(built).fields[KEY_RULES]))
    out = write_mislabelled(source, tmp_path / "mislabelled.gguf", recorded, ["attn_qkv=f32", r"attn_q\.=q8_0"])
    assert main(["verify", str(source), str(out), "--quiet"]) == 1
    line = error_line(capsys)
    assert "tensor blk.3.attn_q.weight: stored as q8_0, but recipe attn-bf16-q4k plans bf16" in line
    report = verify_gguf(source, out)
    assert [c.name for c in report.failures] == ["blk.3.attn_q.weight"] and report.recipe == "attn-bf16-q4k"
    # recorded honestly, the same tensors verify
    honest = write_mislabelled(source, tmp_path / "honest.gguf", (r"attn_q\.=q8_0 (--rule attn_q\.=q8_0)", *recorded),
                               ["attn_qkv=f32", r"attn_q\.=q8_0"])  # fmt: skip
    checks = {c.name: c for c in verify_gguf(source, honest).checks}
    assert checks["blk.3.attn_q.weight"].status == "quantized" and verify_gguf(source, honest).ok


def test_without_a_recorded_recipe_preserved_tensors_must_keep_their_type(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "_add_provenance", lambda _writer, _prov: None)  # a file from elsewhere
    out = write_mislabelled(source, tmp_path / "plain.gguf", (), [r"attn_q\.=q8_0", r"ssm_out=q8_0"])
    assert "coder_quant.recipe" not in GGUFReader(out).fields
    report = verify_gguf(source, out)
    assert report.recipe is None
    failed = {c.name for c in report.failures}
    assert failed == {"blk.3.attn_q.weight"} | {f"blk.{i}.ssm_out.weight" for i in range(3)}
    assert all("keeps its reference type bf16" in c.detail for c in report.failures)
    quantized = {c.name for c in report.checks if c.status == "quantized"}
    assert "blk.0.ffn_up_exps.weight" in quantized  # routed experts may hold any type


def test_preserved_classes_are_planned_at_their_reference_type(source: Path) -> None:
    specs = specs_for_source(source)
    planned = planned_types(specs, None)
    for spec in specs:
        if spec.tclass in ("attention", "ssm", "shared_expert", "norm", "router"):
            assert planned[spec.name][0] == spec.base_type
        elif spec.tclass == "routed_expert":
            assert spec.name not in planned


def test_recorded_rules_read_back() -> None:
    recipes = [*PRESETS.values(), get_recipe("attn-bf16-q4k", [r"a=b (c)=q8_0", "attn_qkv=F32"])]
    for recipe in recipes:
        for rule, text in zip(recipe.rules, rule_texts(recipe), strict=True):
            parsed = parse_rule(text)
            assert parsed is not None and (parsed.pattern, parsed.type) == (rule.pattern, rule.type), text
    assert parse_rule("no type here (label)") is None and parse_rule("x=q4_k") is None


def test_one_halved_expert_is_named(source: Path, built: Path, tmp_path: Path) -> None:
    """Halving one expert of eight leaves the tensor's error within the bound; that expert's own is not."""
    info = next(t for t in GGUFReader(built).tensors if t.name == QUANTIZED)
    per_expert = int(info.n_bytes) // 8
    halved = ggml.quantize(0.5 * source_values(source, QUANTIZED)[5], "q4_k", threads=1)
    copy = overwritten_copy(built, tmp_path, QUANTIZED, halved.tobytes(), offset=5 * per_expert)
    (failure,) = verify_gguf(source, copy).failures
    assert failure.relative_rms < MAX_RELATIVE_RMS["q4_k"]
    assert failure.detail.startswith("expert 5: q4_k relative RMS error 0.5")
