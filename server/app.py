"""The application factory: `create_app(settings, engine=None)`.

Importing this module loads nothing. Without an injected engine, the lifespan starts one whose worker
thread loads the model (building the demo model first when no GGUF is given), so /health answers 503
until it is ready.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from server import __version__
from server.api import router
from server.demo import DEMO_MODEL_ID, DEMO_TRAINED_CTX, ensure_demo_model
from server.engine import Engine, ModelFactory
from server.errors import install_handlers
from server.metrics import RequestCounter
from server.prompt_cache import PromptCache
from server.security import APIKeyCheck, BodyLimit, HostCheck, JSONBodies
from server.settings import Settings
from server.state import ServerState

log = logging.getLogger(__name__)


def model_id(settings: Settings) -> str:
    if settings.alias:
        return settings.alias
    if settings.model is None:
        return DEMO_MODEL_ID
    name = Path(settings.model).name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def model_factory(settings: Settings) -> ModelFactory:
    """Loads the configured GGUF (or builds and loads the demo model) with server.loader."""

    def load() -> tuple[Any, dict[str, Any]]:
        from server.loader import open_model  # imported here: it loads llama.cpp's native library

        path, run_settings = settings.model, settings
        if path is None:
            path = ensure_demo_model(settings.cache_dir)
            log.info("serving the built-in DEMO model %s (pass a GGUF path to serve a real model)", path)
            # The demo was trained on 4096-token windows; a longer context only costs memory.
            if settings.ctx_size == 0 or settings.ctx_size > DEMO_TRAINED_CTX:
                run_settings = settings.model_copy(update={"ctx_size": DEMO_TRAINED_CTX})
        return open_model(str(path), run_settings)

    return load


def create_engine(settings: Settings) -> Engine:
    return Engine(model_factory(settings), max_queue=settings.max_queue, cache=PromptCache.create(settings.cache_ram))


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """An app serving `engine`, or one it creates from `settings` and closes on shutdown."""
    state = ServerState(settings=settings, model_id=model_id(settings), demo=settings.model is None, engine=engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = state.engine is None
        if owned:
            state.engine = create_engine(settings)
        state.engine.start()  # returns at once; loading runs on the engine's thread
        try:
            yield
        finally:
            if owned:
                await run_in_threadpool(state.engine.close)

    app = FastAPI(title="coder-serve", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_handlers(app)
    app.include_router(router)
    # Added innermost first: requests pass RequestCounter -> HostCheck -> CORS -> APIKeyCheck -> BodyLimit.
    app.add_middleware(JSONBodies)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(APIKeyCheck, key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            # any request header: OpenAI's JavaScript SDK sends its own (x-stainless-os, ...) with every call
            allow_headers=["*"],
        )
    if settings.loopback_only:
        app.add_middleware(HostCheck)
    app.add_middleware(RequestCounter, metrics=state.metrics)
    return app
