"""Fixtures for the server tests: a GGUF built by coder-quant, and real servers on loopback ports.

The GGUF is the reference model (../shared) when present, else a synthetic checkpoint; either way it is
built by `coder-quant build`. Servers are real uvicorn instances serving `create_app` on a socket bound
to 127.0.0.1 port 0, run in a thread so tests can read the engine's state.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from quantizer.cli import main as coder_quant
from server.app import create_app
from server.engine import Engine
from server.settings import Settings
from tests.conftest import REFERENCE_MODEL

LOAD_TIMEOUT = 120.0  # seconds a test waits for a tiny model to load; generous for busy machines


@pytest.fixture(scope="session")
def bigvocab_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model with a 32,768-token vocabulary: enough for logits to dominate buffers and for
    the sampler's block search to run (Qwen3-Coder's 151,936 would only make the file larger)."""
    from quantizer.synthetic import write_checkpoint

    folder = tmp_path_factory.mktemp("bigvocab")
    write_checkpoint(folder / "hf", preset="tiny", layers=4, vocab=32768)
    out = folder / "model.gguf"
    assert coder_quant(["build", str(folder / "hf"), str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def test_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    source = REFERENCE_MODEL
    if not (source / "config.json").is_file():
        from quantizer.synthetic import write_checkpoint

        source = tmp_path_factory.mktemp("synthetic")
        write_checkpoint(source, preset="tiny")
    assert coder_quant(["build", str(source), str(out), "--quiet"]) == 0
    return out


@dataclass
class LiveServer:
    url: str
    port: int
    app: Any
    uvicorn: uvicorn.Server

    @property
    def engine(self) -> Engine:
        return self.app.state.server.engine

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=LOAD_TIMEOUT, **kwargs)

    def wait_until(self, condition: Any, what: str) -> None:
        """Poll `condition` (a state check, not a timing assertion) up to a generous deadline."""
        deadline = time.monotonic() + LOAD_TIMEOUT
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for: {what}")
            time.sleep(0.01)


@contextmanager
def live_server(settings: Settings, engine: Engine | None = None, wait_loaded: bool = True) -> Iterator[LiveServer]:
    app = create_app(settings, engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", port, app, server)
    try:
        live.wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert server.started, "uvicorn did not start"
        if wait_loaded:
            assert live.engine.wait_loaded(LOAD_TIMEOUT) == "ready"
        yield live
    finally:
        server.should_exit = True
        thread.join(LOAD_TIMEOUT)
        sock.close()


def make_settings(gguf: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"model": gguf, "ctx_size": 4096, "threads": 1, "max_queue": 4}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def server(test_gguf: Path) -> Iterator[LiveServer]:
    """The shared server: default settings, the test GGUF, a 4096-token context."""
    with live_server(make_settings(test_gguf)) as live:
        yield live


@pytest.fixture
def start_server(test_gguf: Path) -> Iterator[Any]:
    """A factory for servers with other settings; all are stopped when the test ends."""
    stack: list[Any] = []

    def start(engine: Engine | None = None, wait_loaded: bool = True, **overrides: Any) -> LiveServer:
        cm = live_server(make_settings(test_gguf, **overrides), engine, wait_loaded)
        live = cm.__enter__()
        stack.append(cm)
        return live

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def no_eog_bias(engine: Engine) -> dict[str, float]:
    """logit_bias that forbids the end-of-turn tokens, so a generation runs to its token limit."""
    return {str(t): -100.0 for t in engine.info.eog_tokens}
