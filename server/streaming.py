"""Delivering a job: as Server-Sent Events, or as one JSON body that is abandoned if the client leaves.

Either way a client that goes away cancels its job, so the engine moves on to the next request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from server.engine import Job
from server.errors import envelope

log = logging.getLogger(__name__)
T = TypeVar("T")

# nginx's code for "client closed request"; only logs and metrics ever see it.
CLIENT_CLOSED = 499
DONE = "[DONE]"  # OpenAI's end-of-stream sentinel


def sse_data(payload: dict[str, Any] | str) -> dict[str, str]:
    return {"data": payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))}


def stream_error(message: str) -> dict[str, str]:
    """An error after streaming began travels as a data event in the error envelope."""
    return sse_data(envelope(message, "server_error", None, "generation_failed"))


def sse_response(events: AsyncIterator[dict[str, str]], job: Job) -> EventSourceResponse:
    # The background task also runs when the client disconnects: it cancels the job even if the
    # generator never got to run its own cleanup.
    return EventSourceResponse(events, sep="\n", ping=15, background=BackgroundTask(job.cancel))


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`; if the client disconnects first, cancel it (which cancels its job)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
    if task in done:
        return task.result()
    try:
        await task
    except asyncio.CancelledError:
        pass
    log.info("client disconnected from %s; its generation was cancelled", request.url.path)
    return Response(status_code=CLIENT_CLOSED)
