"""With no GGUF the server serves the shipped trained demo model (or, without it, builds a random one
into the cache once), and says it is a demo."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from server.demo import (
    BUNDLED_DEMO,
    DEMO_FILE,
    DEMO_MODEL_ID,
    bundled_demo_model,
    cache_root,
    ensure_demo_model,
)


def test_cache_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "coder-serve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "coder-serve"
    assert cache_root(tmp_path / "x") == tmp_path / "x"


def test_bundled_demo_must_match_its_sha256(tmp_path: Path) -> None:
    assert bundled_demo_model() == BUNDLED_DEMO
    copy = tmp_path / BUNDLED_DEMO.name
    shutil.copy(BUNDLED_DEMO, copy)
    assert bundled_demo_model(copy) is None  # no sidecar
    (tmp_path / (copy.name + ".sha256")).write_text("0" * 64 + f"  {copy.name}\n")
    assert bundled_demo_model(copy) is None  # wrong digest


def test_trained_demo_is_served_and_writes_python(start_server: Any, tmp_path: Path) -> None:
    live = start_server(model=None, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing built: the shipped model is served as it is
    with live.client() as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["id"] == DEMO_MODEL_ID and card["meta"]["demo"] is True and "demo" in card["meta"]["note"]
        assert client.get("/health").json()["demo"] is True
        reply = client.post("/v1/completions", json={
            "model": DEMO_MODEL_ID, "prompt": "import os\n\n\ndef list_python_files(root):\n",
            "max_tokens": 12, "temperature": 0})
        assert reply.status_code == 200
        text = reply.json()["choices"][0]["text"]
        # A trained model indents the function body; random weights write arbitrary bytes.
        assert text.startswith("    ") and "\ufffd" not in text, text


def test_random_demo_is_built_once_when_no_trained_one_is_installed(tmp_path: Path) -> None:
    built = ensure_demo_model(tmp_path, prefer_bundled=False)
    assert built == tmp_path / DEMO_FILE and built.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("demo-build-")] == []  # no leftovers
    stamp = built.stat().st_mtime_ns
    assert ensure_demo_model(tmp_path, prefer_bundled=False) == built
    assert built.stat().st_mtime_ns == stamp  # reused, not rebuilt
