"""`coder-serve`: flags onto Settings, one-line errors, --plan, and a real serve in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.cli import build_parser, main, settings_from_args

ROOT = Path(__file__).resolve().parents[2]


def settings_for(argv: list[str]):
    return settings_from_args(build_parser().parse_args(argv))


def test_flags_map_onto_settings(tmp_path: Path) -> None:
    s = settings_for([str(tmp_path / "m.gguf"), "--host", "0.0.0.0", "--port", "9000", "--gpu-layers", "12",
                      "--cpu-moe-layers", "3", "--ctx-size", "8192", "--threads", "4", "--batch", "256",
                      "--alias", "coder", "--api-key", "k", "--cors-origin", "http://a", "http://b",
                      "--max-queue", "2"])
    assert (s.host, s.port, s.gpu_layers, s.cpu_moe_layers, s.ctx_size, s.threads, s.batch, s.alias) == (
        "0.0.0.0", 9000, "12", 3, 8192, 4, 256, "coder")
    assert s.api_key.get_secret_value() == "k" and s.cors_origins == ["http://a", "http://b"] and s.max_queue == 2
    assert not s.loopback_only


def test_speed_flags_map_onto_settings(tmp_path: Path) -> None:
    s = settings_for([str(tmp_path / "m.gguf"), "--threads-batch", "16", "--ubatch", "2048", "--no-mmap",
                      "--no-repack", "--flash-attn", "--no-host-buffer"])
    assert (s.threads_batch, s.ubatch, s.mmap, s.repack, s.flash_attn) == (16, 2048, False, False, True)
    assert s.host_buffer is False
    s = settings_for([str(tmp_path / "m.gguf")])
    assert (s.threads_batch, s.mmap, s.repack, s.flash_attn, s.host_buffer) == (None, None, True, None, True)


def test_defaults_are_safe_and_env_fills_what_flags_leave_out(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_for([])
    assert s.model is None and s.host == "127.0.0.1" and s.loopback_only and s.api_key is None and s.cors_origins == []
    monkeypatch.setenv("CODER_SERVE_MAX_QUEUE", "3")
    monkeypatch.setenv("CODER_SERVE_API_KEY", "from-env")
    assert settings_for([]).max_queue == 3 and settings_for([]).api_key.get_secret_value() == "from-env"
    assert settings_for(["--max-queue", "5"]).max_queue == 5  # the flag wins


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["--port", "70000"], 2, "--port"),
        (["--gpu-layers", "some"], 2, "--gpu-layers"),
        (["--max-queue", "-1"], 2, "--max-queue"),
        (["--json"], 2, "--plan"),
        (["no/such/model.gguf"], 1, "not found"),
        (["--api-key", " "], 2, "--api-key"),  # an empty key compared equal to an empty Bearer token
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(argv: list[str], code: int, fragment: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("coder-serve: error:") and "\n" not in err and fragment in err


def test_a_port_in_use_is_refused_before_the_model_loads(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["--port", str(taken.getsockname()[1])]) == 1  # the demo model: no file to check first
    err = capsys.readouterr().err.strip()
    assert err.startswith("coder-serve: error: cannot listen on 127.0.0.1:") and "\n" not in err


def test_a_setting_without_a_flag_is_named_by_its_variable(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CODER_SERVE_TEMPERATURE", "5")
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("coder-serve: error: CODER_SERVE_TEMPERATURE: ")


def test_a_list_variable_that_is_not_json_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CODER_SERVE_CORS_ORIGINS", "http://a.example")
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("coder-serve: error:") and "\n" not in err and "cors_origins" in err


def test_placement_flags_the_model_cannot_take_are_refused_before_serving(test_gguf: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(test_gguf), "--gpu-layers", "auto", "--cpu-moe-layers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("coder-serve: error:") and "\n" not in err and "auto" in err


def test_plan_prints_the_placement_without_loading(test_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(test_gguf), "--plan", "--json", "--gpu-layers", "none"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["preset_requested"] == "none"
    assert main([str(test_gguf), "--plan"]) == 0
    assert capsys.readouterr().out.strip()


def test_plan_of_a_file_that_is_not_a_gguf_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf")
    assert main([str(bad), "--plan"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("coder-serve: error:") and "\n" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(argv: list[str]) -> subprocess.Popen[str]:
    # without OpenMP settings from outside: the tests decide whether threads are bound
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OMP_")}, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "server.cli", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_healthy(proc: subprocess.Popen[str], port: int) -> httpx.Response:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            if health.status_code == 200:
                return health
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become healthy"
        time.sleep(0.1)


def test_serves_over_http_then_stops_cleanly(test_gguf: Path) -> None:
    port = _free_port()
    proc = _serve([str(test_gguf), "--port", str(port), "--threads", "1", "--ctx-size", "512", "--alias", "cli-model"])
    try:
        health = _wait_healthy(proc, port)
        assert health.json()["model"] == "cli-model"
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"model": "cli-model", "prompt": "x", "max_tokens": 2, "temperature": 0}, timeout=60)
        assert reply.status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then lets SIGTERM take its default course (exit status -15)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Traceback" not in out


def test_a_model_that_fails_to_load_stops_the_server(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    proc = _serve([str(bad), "--port", str(_free_port())])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "coder-serve: error:" in out


def _thread_cpus(pid: int) -> dict[int, str]:
    """Each thread of a process and the CPUs it may run on (Cpus_allowed_list)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        out[int(task.name)] = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                                   if line.startswith("Cpus_allowed_list"))
    return out


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="binding threads one per core needs Linux and two CPUs")
@pytest.mark.parametrize("pin", [True, False])
def test_pin_threads_binds_llama_threads_one_per_core_and_leaves_the_server_free(test_gguf: Path, pin: bool) -> None:
    port = _free_port()
    flags = ["--pin-threads"] if pin else []
    proc = _serve([str(test_gguf), "--port", str(port), "--threads", "2", "--ctx-size", "512", "--alias", "m", *flags])
    try:
        placement = _wait_healthy(proc, port).json()["placement"]
        assert placement["threads"] == 2 and placement["thread_binding"] == ("close" if pin else None)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"model": "m", "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert reply.status_code == 200
        cpus = _thread_cpus(proc.pid)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    everything = _thread_cpus(os.getpid())[threading.get_native_id()]
    single = sorted(c for c in cpus.values() if c.isdigit())
    assert cpus[proc.pid] == everything, out  # the main thread (uvicorn's) keeps every CPU
    if pin:
        # the engine's thread and llama.cpp's worker: one core each, not the same one
        assert len(single) >= 2 and len(set(single)) >= 2, cpus
        assert "bound one per core (OMP_PROC_BIND=close, OMP_PLACES=cores)" in out
    else:
        assert not single, cpus


def test_pin_threads_once_llama_cpp_is_loaded_is_refused_in_one_line(test_gguf: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import llama_cpp  # noqa: F401  (loaded, as in this test process: OpenMP has read its settings already)

    assert main([str(test_gguf), "--pin-threads"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "before llama.cpp is loaded" in err
