"""Prometheus metrics, in a registry of the app's own (two apps in one process never share counters).

Engine figures are read from Engine.stats() at scrape time; HTTP requests are counted by an ASGI
middleware that sees every response's status, including those sent by other middleware.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine import Engine
from server.prompt_cache import CacheStats

PREFIX = "coder_serve"
# Paths counted under their own label; anything else is "other", so random URLs cannot grow the label set.
KNOWN_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/metrics"}
)


class _EngineCollector(Collector):
    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:
            return
        s = engine.stats()
        counters = {
            "prompt_tokens": ("Prompt tokens of finished requests", s.prompt_tokens),
            "prompt_tokens_evaluated": ("Prompt tokens evaluated (the rest reused a cached prefix)",
                                        s.prompt_tokens_evaluated),
            "generated_tokens": ("Tokens generated", s.generated_tokens),
            "prompt_seconds": ("Seconds spent evaluating prompts", s.prompt_seconds),
            "decode_seconds": ("Seconds spent generating tokens", s.decode_seconds),
            "cancellations": ("Requests cancelled because their client went away", s.cancellations),
            "generations": ("Generations run to an end (finished, stopped or cancelled)", s.completed),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        gauges = {
            "prompt_tokens_per_second": ("Prompt evaluation speed of the last request", s.last_prompt_tps),
            "decode_tokens_per_second": ("Generation speed of the last request", s.last_decode_tps),
            "queue_depth": ("Requests waiting behind the running one", s.queue_depth),
            "busy": ("1 while a generation is running", int(s.busy)),
            "model_ready": ("1 once the model is loaded", int(s.state == "ready")),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        if s.cache is not None:
            yield from _cache_metrics(s.cache)


def _cache_metrics(stats: CacheStats) -> Iterator[Metric]:
    """Prompt checkpoints, labelled by kind ("chat" or "completion": the pool a request belongs to)."""
    yield GaugeMetricFamily(f"{PREFIX}_prompt_cache_capacity_bytes", "RAM allowed for prompt checkpoints",
                            value=stats.capacity)
    families = (
        (CounterMetricFamily, "hits", "Prompts that restored a checkpoint"),
        (CounterMetricFamily, "misses", "Prompts that found no checkpoint and were evaluated from the start"),
        (CounterMetricFamily, "reused_tokens", "Prompt tokens restored from checkpoints instead of evaluated"),
        (CounterMetricFamily, "saves", "Checkpoints stored"),
        (CounterMetricFamily, "evictions", "Checkpoints evicted to make room"),
        (GaugeMetricFamily, "entries", "Checkpoints held"),
        (GaugeMetricFamily, "bytes", "Bytes of state held in checkpoints"),
    )
    for family, field, doc in families:
        metric = family(f"{PREFIX}_prompt_cache_{field}", doc, labels=["kind"])
        for kind, pool in stats.pools.items():
            metric.add_metric([kind], getattr(pool, field))
        yield metric


class Metrics:
    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests by path and status", ["path", "status"], registry=self.registry
        )
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware counting responses by path and status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        status = {"code": 0}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not status["code"]:  # answered by Starlette's outermost error handler
                self.metrics.requests.labels(path, "500").inc()
            raise
        if not status["code"]:  # the app never answered: the client went away first
            self.metrics.requests.labels(path, "499").inc()
