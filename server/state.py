"""What the routes share: settings, the engine, metrics, the model's public name and its chat template."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from server.engine import Engine
from server.metrics import Metrics
from server.responses import ModelCard
from server.settings import Settings
from server.templates import ChatTemplate, TemplateError

log = logging.getLogger(__name__)

DEMO_NOTE = "demo model: a tiny Qwen3-Next (16.5 M parameters) for trying the server; pass a GGUF to serve a real one"


@dataclass
class ServerState:
    settings: Settings
    model_id: str
    demo: bool
    engine: Engine | None = None
    metrics: Metrics = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))
    _template: ChatTemplate | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine)

    def template(self) -> ChatTemplate:
        """The model's chat template, compiled once (the engine must be ready)."""
        with self._lock:
            if self._template is None:
                info = self.engine.info if self.engine else None
                if info is None:
                    raise RuntimeError("template() before the engine exists")
                try:
                    self._template = ChatTemplate(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
                except TemplateError as exc:
                    log.warning("%s; using a ChatML template instead", exc)
                    self._template = ChatTemplate(None, bos_token=info.bos_token, eos_token=info.eos_token)
            return self._template

    def model_card(self) -> ModelCard:
        meta: dict[str, object] = {"demo": self.demo}
        if self.demo:
            meta["note"] = DEMO_NOTE
        if self.engine is not None and self.engine.state == "ready":
            info = self.engine.info
            meta.update(context_size=info.n_ctx, description=info.description, parameters=info.n_params)
        return ModelCard(id=self.model_id, created=self.created, owned_by="coder-serve", meta=meta)
