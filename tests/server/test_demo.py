"""With no GGUF the server builds the demo model into the cache once, serves it, and says it is a demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.demo import DEMO_FILE, DEMO_MODEL_ID, cache_root, ensure_demo_model


def test_cache_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "coder-serve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "coder-serve"
    assert cache_root(tmp_path / "x") == tmp_path / "x"


def test_demo_model_is_built_once_and_served_as_a_demo(start_server: Any, tmp_path: Path) -> None:
    live = start_server(model=None, cache_dir=tmp_path)  # the engine builds it while /health says 503
    built = tmp_path / DEMO_FILE
    assert built.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("demo-build-")] == []  # no leftovers
    stamp = built.stat().st_mtime_ns
    assert ensure_demo_model(tmp_path) == built and built.stat().st_mtime_ns == stamp  # reused, not rebuilt

    with live.client() as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["id"] == DEMO_MODEL_ID and card["meta"]["demo"] is True and "demo" in card["meta"]["note"]
        assert client.get("/health").json()["demo"] is True
        reply = client.post("/v1/chat/completions", json={
            "model": DEMO_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
