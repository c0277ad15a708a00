"""Request guards, as ASGI middleware so they run before any body is parsed.

- Host check: a server bound to loopback answers only requests addressed to a loopback name, so a web
  page cannot reach it through DNS rebinding (its requests carry the attacker's host name).
- API key: when configured, /v1/* and /metrics need "Authorization: Bearer KEY", compared in
  constant time.
- Body limit: a request body above the limit is refused with 413 before it is all read.
- JSON bodies: `curl -d` labels a body form-encoded unless told otherwise; POST bodies under /v1/ that
  say so, or say nothing, are read as the JSON they are (as llama.cpp's server reads them).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, Forbidden, InvalidAPIKey, PayloadTooLarge, error_response

LOOPBACK_HOSTNAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
PROTECTED_PREFIXES = ("/v1/", "/metrics")


def host_name(host_header: str) -> str:
    """'localhost:8080' -> 'localhost'; '[::1]:8080' -> '[::1]'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if ":" in host else host


async def _refuse(exc: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(exc)(scope, receive, send)


class HostCheck:
    def __init__(self, app: ASGIApp, allowed: Iterable[str] = LOOPBACK_HOSTNAMES) -> None:
        self.app = app
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and host_name(Headers(scope=scope).get("host", "")) not in self.allowed:
            await _refuse(Forbidden("This server only answers requests addressed to localhost"), scope, receive, send)
            return
        await self.app(scope, receive, send)


class APIKeyCheck:
    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode("utf-8")

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] != "OPTIONS"  # CORS preflights carry no credentials
            and scope["path"].startswith(PROTECTED_PREFIXES)
            and not self._authorized(scope)
        ):
            await _refuse(InvalidAPIKey("Incorrect or missing API key"), scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Reads the body (up to `max_bytes`) before the app does, then replays it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"The request body is larger than {self.max_bytes} bytes")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(too_large, scope, receive, send)
            return
        body, more, passthrough = [], True, None
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                passthrough = message  # a disconnect: hand it on
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await _refuse(too_large, scope, receive, send)
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        replay: list[Message] = [passthrough or {"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replaying_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replaying_receive, send)


class JSONBodies:
    """Relabels a /v1/ POST body sent as form data, or with no type, as JSON."""

    RELABELED = frozenset({"", "application/x-www-form-urlencoded"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            declared = Headers(scope=scope).get("content-type", "").split(";")[0].strip().lower()
            if declared in self.RELABELED:
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
