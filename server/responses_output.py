"""/v1/responses output: response objects, and the stream events that build them up.

Shapes follow https://platform.openai.com/docs/api-reference/responses/object and /responses-streaming
(field names as in the openai package's `openai.types.responses`). Parser events (server.toolcalls)
become output items in order: text opens a message item, a call a function_call item. A streamed and
a whole response are built by the same code, so they always agree.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server import toolcalls
from server.chat import ChatTurn
from server.engine import Job
from server.errors import GenerationFailed
from server.events import Finished, TextDelta
from server.settings import Settings
from server.streaming import sse_data

if TYPE_CHECKING:
    from server.responses_api import ResponsesRequest


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(_Model):
    type: Literal["output_text"] = "output_text"
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)
    text: str


class OutputMessage(_Model):
    id: str
    type: Literal["message"] = "message"
    status: ItemStatus
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class FunctionCallOut(_Model):
    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus
    arguments: str
    call_id: str
    name: str


class InputTokensDetails(_Model):
    cached_tokens: int = 0


class OutputTokensDetails(_Model):
    reasoning_tokens: int = 0


class ResponseUsage(_Model):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(_Model):
    code: Literal["server_error"] = "server_error"
    message: str


class IncompleteDetails(_Model):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(_Model):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[Annotated[OutputMessage | FunctionCallOut, Field(discriminator="type")]]
    parallel_tool_calls: bool
    previous_response_id: None = None
    store: bool = False  # nothing is stored, whatever the request said
    temperature: float
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    metadata: dict[str, str]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass(frozen=True)
class ResponseTurn:
    """What the response needs besides the job: the chat turn, and the fields every response object echoes."""

    chat: ChatTurn
    fields: dict[str, Any]

    @classmethod
    def of(cls, req: ResponsesRequest, chat: ChatTurn, settings: Settings, model: str) -> ResponseTurn:
        fmt = req.text.format if req.text and req.text.format else None
        choice = req.tool_choice
        fields = {
            "id": _new_id("resp"), "created_at": int(time.time()), "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "model": model,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "temperature": settings.temperature if req.temperature is None else req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": settings.top_p if req.top_p is None else req.top_p, "metadata": req.metadata or {},
        }  # fmt: skip
        return cls(chat, fields)

    def response(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = ResponseObject.model_validate({**self.fields, "status": status, "output": output, **extra})
        return body.model_dump(mode="json", by_alias=True)


class _Output:
    """Tool-call parser events -> output items, and (when streaming) the events that announce them."""

    def __init__(self, turn: ResponseTurn, streaming: bool) -> None:
        self.turn = turn
        self.items: list[dict[str, Any]] = []
        self.pending: list[dict[str, str]] = []  # SSE events not yet sent
        self._streaming = streaming
        self._seq = 0
        self._open: dict[str, Any] | None = None
        self._parts: list[str] = []

    def send(self, kind: str, **fields: Any) -> None:
        if self._streaming:
            payload = {"type": kind, "sequence_number": self._seq, **fields}
            self.pending.append({"event": kind, **sse_data(payload)})
            self._seq += 1

    def drain(self) -> list[dict[str, str]]:
        events, self.pending = self.pending, []
        return events

    def start(self) -> None:
        created = self.turn.response("in_progress", [])
        self.send("response.created", response=created)
        self.send("response.in_progress", response=created)

    def feed(self, events: list[toolcalls.Event]) -> None:
        for event in events:
            if isinstance(event, toolcalls.ContentDelta):
                if self._open is None or self._open["type"] != "message":
                    self._close("completed")
                    self._open_message()
                self._parts.append(event.text)
                self.send("response.output_text.delta", item_id=self._open["id"], output_index=len(self.items),
                          content_index=0, delta=event.text, logprobs=[])  # fmt: skip
            elif isinstance(event, toolcalls.ToolCallStart):
                self._close("completed")
                self._open = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress",
                              "arguments": "", "call_id": event.id, "name": event.name}  # fmt: skip
                self.send("response.output_item.added", output_index=len(self.items), item=dict(self._open))
            elif self._open is not None:  # arguments of the open call
                self._parts.append(event.fragment)
                self.send("response.function_call_arguments.delta", item_id=self._open["id"],
                          output_index=len(self.items), delta=event.fragment)  # fmt: skip

    def finish(self, final: Finished) -> dict[str, Any]:
        """Close the last item and return the whole response (also sent as the last event)."""
        if self._open is None and not self.items:
            self._open_message()  # an empty answer is still one (empty) message
        cut = final.reason == "length"
        self._close("incomplete" if cut else "completed")
        usage = {"input_tokens": final.usage.prompt_tokens, "output_tokens": final.usage.completion_tokens,
                 "total_tokens": final.usage.total_tokens}  # fmt: skip
        status = "incomplete" if cut else "completed"
        extra = {"incomplete_details": {"reason": "max_output_tokens"}} if cut else {}
        body = self.turn.response(status, self.items, usage=usage, **extra)
        self.send(f"response.{status}", response=body)
        return body

    def fail(self) -> None:
        self._close("incomplete")
        error = {"code": "server_error", "message": "The generation failed"}
        self.send("response.failed", response=self.turn.response("failed", self.items, error=error))

    def _open_message(self) -> None:
        self._open = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "content": [],
                      "role": "assistant"}  # fmt: skip
        index = len(self.items)
        self.send("response.output_item.added", output_index=index, item=dict(self._open))
        self.send("response.content_part.added", item_id=self._open["id"], output_index=index, content_index=0,
                  part=_text_part(""))  # fmt: skip

    def _close(self, status: ItemStatus) -> None:
        item, text, index = self._open, "".join(self._parts), len(self.items)
        if item is None:
            return
        self._open, self._parts = None, []
        if item["type"] == "message":
            self.send("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=text, logprobs=[])  # fmt: skip
            self.send("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=_text_part(text))  # fmt: skip
            item["content"] = [_text_part(text)]
        else:
            self.send("response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=text)
            item["arguments"] = text
        item["status"] = status
        self.items.append(item)
        self.send("response.output_item.done", output_index=index, item=item)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _parser(turn: ResponseTurn) -> toolcalls.StreamParser:
    return toolcalls.StreamParser(turn.chat.tools, enabled=bool(turn.chat.tools))


async def complete_response(job: Job, turn: ResponseTurn) -> dict[str, Any]:
    """Run the job to the end and build one response object."""
    out, parser = _Output(turn, streaming=False), _parser(turn)
    async for event in job.events():
        if isinstance(event, TextDelta):
            out.feed(parser.feed(event.text))
        elif isinstance(event, Finished) and event.reason != "cancelled":
            out.feed(parser.close())
            return out.finish(event)
    raise GenerationFailed("The generation failed")


async def stream_response(job: Job, turn: ResponseTurn) -> AsyncIterator[dict[str, str]]:
    """The Responses API's SSE events: response.created ... response.completed (or .incomplete / .failed)."""
    out, parser = _Output(turn, streaming=True), _parser(turn)
    out.start()
    try:
        for item in out.drain():
            yield item
        async for event in job.events():
            if isinstance(event, TextDelta):
                out.feed(parser.feed(event.text))
            elif isinstance(event, Finished) and event.reason != "cancelled":
                out.feed(parser.close())
                out.finish(event)
            else:
                out.fail()
            for item in out.drain():
                yield item
    finally:
        job.cancel()
