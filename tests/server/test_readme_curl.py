"""The README's curl examples, executed as written against a real server (only the port differs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT
from tests.server.conftest import LiveServer

README = ROOT / "README.md"
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def curl_examples() -> list[str]:
    return [block for block in BLOCK.findall(README.read_text()) if block.lstrip().startswith("curl ")]


def test_readme_has_curl_examples_for_chat_stream_and_completions() -> None:
    examples = curl_examples()
    assert any("/v1/chat/completions" in e and '"stream": true' in e for e in examples)
    assert any("/v1/chat/completions" in e and '"stream"' not in e for e in examples)
    assert any("/v1/completions" in e and '"suffix"' in e for e in examples)


@pytest.mark.parametrize("example", curl_examples(), ids=lambda e: re.search(r"/v1/\S+", e).group(0))
def test_readme_curl_example_runs(server: LiveServer, example: str) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    command = example.replace("http://127.0.0.1:8080", server.url)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if '"stream": true' in example:
        events = [line[len("data: "):] for line in done.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        body = json.loads(done.stdout)
        assert "error" not in body, body
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] >= 1
