"""The in-process benchmarks run end to end on a small real model, as they will on a GPU machine where
every minute is counted: real llama.cpp, a real uvicorn server, a client process."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_http_overhead_reports_raw_engine_and_http_figures(test_gguf: Path, tmp_path: Path) -> None:
    done = run("bench/http_overhead.py", str(test_gguf), "--out", str(tmp_path), "--label", "smoke", "--rounds", "2",
               "--prompt", "16", "--decode", "8", "--", "--threads", "1", "--ctx-size", "512")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "http-overhead-smoke.json").read_text())
    assert len(report["rounds"]) == 2 and report["threads"] == {"decode": 1, "batch": 1}
    assert report["thread_binding"] is None
    for row in report["rounds"]:
        assert row["raw_tok_s"] > 0 and row["http_tok_s"] > 0 and row["raw_same_tokens_tok_s"] > 0
        assert row["completion_tokens"] == 8 and row["engine_eval_ms"] > 0
    assert "| median |" in (tmp_path / "http-overhead-smoke.md").read_text()


def test_omp_teams_reports_both_halves(test_gguf: Path) -> None:
    done = run("bench/omp_teams.py", str(test_gguf), "--rounds", "2", "--tokens", "8", "--",
               "--threads", "2", "--ctx-size", "512")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["threads"] == 2 and len(result["one_team_tok_s"]) == len(result["two_teams_tok_s"]) == 2
    assert result["median_one_team"] > 0 and result["median_two_teams"] > 0 and result["ratio"] > 0


def test_omp_teams_refuses_a_file_that_is_no_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    done = run("bench/omp_teams.py", str(bad))
    assert done.returncode == 2 and "not a readable GGUF" in done.stderr and "Traceback" not in done.stderr


def bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_http_overhead_median_row_takes_each_columns_median_over_the_rounds(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # it imports its sibling bench/gpu.py
    overhead = bench_module("http_overhead")
    report = json.loads((ROOT / "bench" / "results" / "gpu-h200-http-L48-threads-t16a-2026-11-29.json").read_text())
    rows = [line.split("|") for line in overhead.markdown(report).splitlines() if line.startswith("| ")]
    rounds = [r for r in rows if r[1].strip().isdigit()]
    median = next(r for r in rows if r[1].strip() == "median")
    rests = sorted(float(r[-2]) for r in rounds)
    assert len(rounds) == 5 and float(median[-2]) == rests[2]  # not rebuilt from the other columns' medians


def test_levers_table_has_one_column_per_prompt_length() -> None:
    levers = bench_module("gpu_levers")
    results = ROOT / "bench" / "results"
    for name, sizes in (("gpu-h200-levers-L48-cycles-2026-11-29.json", ["512"]),
                        ("gpu-h200-levers-2026-11-28.json", ["512", "4096"])):
        report = json.loads((results / name).read_text())
        report["results"].append({"label": "broken", "error": "exit 1"})
        table = [line for line in levers.markdown(report).splitlines() if line.startswith("|")]
        header = [c.strip() for c in table[0].split("|")]
        assert [c for c in header if c.startswith("pp")] == [f"pp{n} tok/s" for n in sizes]
        assert len({line.count("|") for line in table}) == 1, table


def test_raw_decoding_reports_the_first_tokens_apart(test_gguf: Path) -> None:
    spec = {"gguf": str(test_gguf), "gpu_layers": "attn", "cpu_moe_layers": None, "ctx_size": 512, "threads": 1,
            "batch": 512, "ubatch": 512, "vocab": bench_module("gpu").tokenizer_size(test_gguf), "prompts": [16, 32], "decode": 40, "repeat": 2}
    done = run("bench/gpu.py", "--raw", json.dumps(spec))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["prompts"]) == {"16", "32"} and all(p["prompt_tok_s"] > 0 for p in result["prompts"].values())
    assert result["decode_tok_s"] > 0 and result["decode_head_tok_s"] > 0 and result["decode_tail_tok_s"] > 0


def test_fused_experts_compute_the_same_logits(test_gguf: Path, tmp_path: Path) -> None:
    import llama_cpp
    import numpy as np
    from gguf import GGUFReader

    fused = tmp_path / "fused.gguf"
    done = run("bench/fuse_experts.py", str(test_gguf), str(fused))
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = GGUFReader(test_gguf), GGUFReader(fused)
    old = {t.name: t for t in before.tensors}
    new = {t.name: t for t in after.tensors}
    layers = sorted({n.split(".")[1] for n in old if n.endswith("ffn_gate_exps.weight")})
    assert layers and all(f"blk.{i}.ffn_gate_up_exps.weight" in new for i in layers)
    assert not any(n.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")) for n in new)
    for name, t in new.items():
        if name in old:
            assert np.array_equal(t.data, old[name].data) and t.tensor_type == old[name].tensor_type, name
    assert {k: f.contents() for k, f in after.fields.items() if not k.startswith("GGUF.")} == \
        {k: f.contents() for k, f in before.fields.items() if not k.startswith("GGUF.")}

    def logits(path: Path) -> tuple[np.ndarray, list[int]]:
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
        prompt = llm.tokenize(b"def add(a, b):\n    return", add_bos=False)
        llm.eval(prompt)
        scores = np.array(llm.scores[: len(prompt)])
        generated = []
        for _ in range(6):
            generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(generated[-1:])
        llm.close()
        return scores, generated

    (a, gen_a), (b, gen_b) = logits(test_gguf), logits(fused)
    assert np.array_equal(a, b) and gen_a == gen_b


def test_fuse_experts_refuses_bad_input_and_leaves_no_file(test_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    missing = run("bench/fuse_experts.py", str(tmp_path / "none.gguf"), str(out))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such file" in missing.stderr
    nowhere = run("bench/fuse_experts.py", str(test_gguf), str(tmp_path / "none" / "out.gguf"))
    assert nowhere.returncode == 2 and "no such folder" in nowhere.stderr
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(test_gguf.read_bytes()[:100])
    broken = run("bench/fuse_experts.py", str(truncated), str(out))
    assert broken.returncode == 1 and broken.stderr.count("\n") == 1 and "not a readable GGUF" in broken.stderr
    truncated.unlink()
    fused = tmp_path / "fused.gguf"
    assert run("bench/fuse_experts.py", str(test_gguf), str(fused)).returncode == 0
    again = run("bench/fuse_experts.py", str(fused), str(out))  # nothing left to fuse
    assert again.returncode == 1 and "no separate gate and up" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.gguf"]


def test_levers_report_cut_short_says_the_second_reading_is_missing() -> None:
    levers = bench_module("gpu_levers")
    report = json.loads((ROOT / "bench" / "results" / "gpu-h200-levers-L48-cycles-2026-11-29.json").read_text())
    finished = levers.markdown(report)
    assert f"the higher of {report['bandwidth_before_gb_s']:.1f} before" in finished
    for key in ("bandwidth_before_gb_s", "bandwidth_after_gb_s"):
        del report[key]  # as written after each variant, before the run's last reading
    cut = levers.markdown(report)
    assert "0.0 before" not in cut and "the reading after them was not taken" in cut


def test_decode_drift_pairs_each_block_with_its_own_bandwidth(test_gguf: Path, tmp_path: Path) -> None:
    done = run("bench/decode_drift.py", str(test_gguf), "--out", str(tmp_path), "--seconds", "1", "--decode", "8",
               "--prompt", "16", "--read-gib", "0.05", "--", "--threads", "1", "--ctx-size", "512")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "drift.json").read_text())
    blocks = report["blocks"]
    assert blocks and report["loader"]["threads"] == 1
    for b in blocks:
        assert b["gb_s"] > 0 and b["decode_tok_s"] > 0
        assert abs(b["bound_tok_s"] - b["gb_s"] * 1e9 / report["expert_bytes_per_token"]) < 1e-6 * b["bound_tok_s"]
        assert abs(b["of_bound"] - b["decode_tok_s"] / b["bound_tok_s"]) < 1e-9
    assert report["summary"]["decode_min"] == min(b["decode_tok_s"] for b in blocks)
    assert f"| {len(blocks)} |" in (tmp_path / "drift.md").read_text()


def test_decode_drift_refuses_bad_counts_and_files(test_gguf: Path, tmp_path: Path) -> None:
    done = run("bench/decode_drift.py", str(test_gguf), "--out", str(tmp_path), "--decode", "0")
    assert done.returncode == 2 and "must be positive" in done.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    done = run("bench/decode_drift.py", str(bad), "--out", str(tmp_path))
    assert done.returncode == 2 and "not a readable GGUF" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "drift.json").exists()


def test_large_request_reports_the_stream_gap_beside_the_request(server: Any) -> None:
    large = bench_module("large_request")
    result = large.measure(server.url, messages=2_000, max_tokens=64, lead=0.5)
    assert result["status"] == 400 and result["messages"] == 2_000  # refused for the context once read
    assert result["chunks"] > 0 and result["median_gap_s"] is not None
    assert 0 <= result["longest_gap_during_request_s"] <= result["request_s"] + 1
