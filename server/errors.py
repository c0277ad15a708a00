"""Typed errors and their mapping onto OpenAI's error envelope, in one place.

Envelope (https://platform.openai.com/docs/guides/error-codes):
    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}
Internal exception text never reaches a client; it is logged instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error a client caused or must be told about; carries its HTTP status."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str] | None:
        return None


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class InvalidAPIKey(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ModelNotReady(APIError):
    status = 503
    type = "server_error"
    code = "model_not_ready"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # set while the model loads: clients (OpenAI's SDKs) wait and retry

    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}


LOADING_RETRY_AFTER = 5  # seconds a client is asked to wait while the model loads


class GenerationFailed(APIError):
    status = 500
    type = "server_error"
    code = "generation_failed"


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    body = envelope(exc.message, exc.type, exc.param, exc.code)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers())


# Discriminator values pydantic puts into error locations; clients never wrote them as keys.
_TAGS_AFTER_INDEX = frozenset(
    {"system", "developer", "user", "assistant", "tool", "text", "refusal", "image_url", "input_audio", "file"}
)
_TAGS_AFTER_FIELD = {"response_format": frozenset({"text", "json_object", "json_schema"})}
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_branch_label(part: str, previous: str | int | None) -> bool:
    """Union-member labels in a pydantic location: 'str', 'list[str]', 'NamedToolChoice', role tags."""
    if "[" in part or part in _TYPE_NAMES or part[:1].isupper():
        return True
    if isinstance(previous, int):
        return part in _TAGS_AFTER_INDEX
    return isinstance(previous, str) and part in _TAGS_AFTER_FIELD.get(previous, ())


def param_name(loc: Sequence[str | int]) -> str | None:
    """('body', 'messages', 0, 'user', 'content', 'str') -> 'messages[0].content'."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    text = ""
    previous: str | int | None = None
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _is_branch_label(part, previous):
            text += f".{part}" if text else part
        previous = part
    return text or None


def _validation_message(error: dict[str, Any], param: str | None) -> str:
    msg = str(error.get("msg", "invalid value"))
    if error.get("type") == "missing":
        return f"'{param}' is a required property" if param else "a required property is missing"
    if error.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    return f"Invalid value for '{param}': {msg}" if param else msg


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # Of a union's alternatives, the error reaching deepest into the input says most about the mistake;
    # at equal depth, a broken constraint ("at least 1 item") more than another alternative's type.
    first = max(errors, key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")),
                default={})
    param = param_name(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        param = None
    return error_response(InvalidRequest(_validation_message(first, param), param=param))


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    if exc.status >= 500:
        log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(exc)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Request failed")
    body = envelope(message, kind, None, None)
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(envelope("Internal server error", "server_error"), status_code=500)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
