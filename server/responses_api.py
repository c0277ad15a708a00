"""/v1/responses: OpenAI's Responses API over the chat path.

Input items become chat messages (function_call items an assistant message's tool_calls,
function_call_output items tool messages), so the same chat template renders them and the same
engine job and tool-call parser (server.toolcalls) produce the answer. Output items and stream events
follow https://platform.openai.com/docs/api-reference/responses (field names as in the openai
package's `openai.types.responses`). Nothing is stored: `store` is accepted and ignored, and anything
that needs a stored response (`previous_response_id`, `conversation`, `background`) is a 400.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from server import toolcalls
from server.chat import ChatTurn, start_chat
from server.engine import Engine, Job
from server.errors import GenerationFailed, InvalidRequest
from server.events import Finished, TextDelta
from server.protocol import MAX_TOKENS, ChatCompletionRequest
from server.settings import Settings
from server.streaming import sse_data
from server.templates import ChatTemplate


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def _by_type(*models: type[BaseModel], default: str | None = None) -> Any:
    """A union told apart by its `type` field. Tags are the class names, which the error envelope's
    `param` leaves out (as it does pydantic's other union labels); the last model takes any other type."""
    known = {t: m.__name__ for m in models[:-1] for t in m.model_fields["type"].annotation.__args__}

    def tag(value: Any) -> str | None:
        kind = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", None)
        return known.get(kind, models[-1].__name__) if isinstance(kind, str) else None

    members = tuple(Annotated[m, Tag(m.__name__)] for m in models)
    return Annotated[Union[members], Discriminator(tag)]  # noqa: UP007 - a union built at run time


# ---- request ----


class TextPart(_Model):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(_Model):
    type: Literal["refusal"]
    refusal: str


class OtherPart(_Model):
    """input_image, input_file, input_audio...: accepted by the schema, refused with a clear 400."""

    type: str


Part = _by_type(TextPart, RefusalPart, OtherPart)
Content = str | list[Part]


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str | None = None
    output: Content


class ReasoningItem(_Model):
    """Reasoning from an earlier turn (Codex sends it back): this model has none to resume; skipped."""

    type: Literal["reasoning"]


class OtherItem(_Model):
    type: str


Item = _by_type(MessageItem, FunctionCallItem, FunctionCallOutputItem, ReasoningItem, OtherItem, default="message")


class FunctionTool(_Model):
    type: str  # only "function"; hosted tools (web_search, file_search...) are refused by name
    name: str | None = Field(None, pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Model):
    type: Literal["function"]
    name: str


class FormatText(_Model):
    type: Literal["text"]


class FormatJSONObject(_Model):
    type: Literal["json_object"]


class FormatJSONSchema(_Model):
    type: Literal["json_schema"]
    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Model):
    format: Annotated[FormatText | FormatJSONObject | FormatJSONSchema, Field(discriminator="type")] | None = None
    verbosity: str | None = None  # accepted, not used


class ResponsesRequest(_Model):
    """Fields of https://platform.openai.com/docs/api-reference/responses/create that change the answer;
    others (include, reasoning, store, truncation, prompt_cache_key, ...) are ignored."""

    background: bool | None = None
    conversation: Any = None
    input: str | Annotated[list[Item], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    metadata: dict[str, str] | None = None
    model: str
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    prompt: Any = None
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    text: TextConfig | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    tools: list[FunctionTool] | None = None
    top_p: float | None = Field(None, ge=0.0, le=1.0)

    def check_supported(self) -> None:
        stateful = {"previous_response_id": self.previous_response_id, "conversation": self.conversation,
                    "prompt": self.prompt}  # fmt: skip
        for param, value in stateful.items():
            if value is not None:
                raise InvalidRequest(
                    f"'{param}' is not supported: this server stores nothing; send the whole conversation in 'input'",
                    param=param,
                )
        if self.background:
            raise InvalidRequest("Background responses are not supported", param="background")
        for i, tool in enumerate(self.tools or []):
            if tool.type != "function":
                raise InvalidRequest(f"Tools of type '{tool.type}' are not supported; use 'function'",
                                     param=f"tools[{i}].type")  # fmt: skip
            if tool.name is None:
                raise InvalidRequest(f"'tools[{i}].name' is a required property", param=f"tools[{i}].name")

    def chat_messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for i, item in enumerate(items):
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": _text(item.content, f"input[{i}].content")})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":  # text then calls: one assistant turn
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id or "",
                                 "content": _text(item.output, f"input[{i}].output")})  # fmt: skip
            elif not isinstance(item, ReasoningItem):
                raise InvalidRequest(f"Input items of type '{item.type}' are not supported", param=f"input[{i}]")
        if not messages:
            raise InvalidRequest("'input' holds no message", param="input")
        return messages

    def chat_request(self) -> ChatCompletionRequest:
        """The equivalent chat completion request (validated again, as any chat request is)."""
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": self.chat_messages(),
            "max_completion_tokens": self.max_output_tokens,
            "parallel_tool_calls": self.parallel_tool_calls,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.tools:
            fields["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                               for t in self.tools]  # fmt: skip
        if isinstance(self.tool_choice, FunctionChoice):
            fields["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        else:
            fields["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text else None
        if isinstance(fmt, FormatJSONSchema):
            schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
            fields["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif fmt is not None:
            fields["response_format"] = {"type": fmt.type}
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as exc:  # what this model let through but the chat model refuses
            raise InvalidRequest(f"Invalid request: {exc.errors()[0].get('msg', 'invalid value')}",
                                 param="input") from None  # fmt: skip


def _text(content: str | list[Any], param: str) -> str:
    if isinstance(content, str):
        return content
    pieces = []
    for j, part in enumerate(content):
        if isinstance(part, OtherPart):
            raise InvalidRequest(f"Content parts of type '{part.type}' are not supported; send text",
                                 param=f"{param}[{j}]")  # fmt: skip
        pieces.append(part.text if isinstance(part, TextPart) else part.refusal)
    return "".join(pieces)


# ---- response ----

ItemStatus = Literal["in_progress", "completed", "incomplete"]
# Our names for chat-path parameters, where an error from the chat path names one.
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
           "response_format.json_schema.schema": "text.format.schema"}  # fmt: skip


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


class ResponseTurn:
    """What the response needs besides the job: the chat turn and the request's echoed fields."""

    def __init__(self, req: ResponsesRequest, chat: ChatTurn, settings: Settings, model: str) -> None:
        self.chat = chat
        fmt = req.text.format if req.text and req.text.format else FormatText(type="text")
        self.fields: dict[str, Any] = {
            "id": _new_id("resp"), "created_at": int(time.time()), "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "model": model,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "temperature": settings.temperature if req.temperature is None else req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel)
            else req.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": settings.top_p if req.top_p is None else req.top_p, "metadata": req.metadata or {},
        }  # fmt: skip

    def response(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = ResponseObject.model_validate({**self.fields, "status": status, "output": output, **extra})
        return body.model_dump(mode="json", by_alias=True)


async def start_response(
    req: ResponsesRequest, engine: Engine, template: ChatTemplate, settings: Settings, model: str
) -> tuple[Job, ResponseTurn]:
    """Validate, render and admit, as a chat request; errors name the Responses API's fields."""
    req.check_supported()
    try:
        job, chat = await start_chat(req.chat_request(), engine, template, settings, model)
    except InvalidRequest as exc:
        exc.param = _PARAMS.get(exc.param or "", exc.param)
        raise
    return job, ResponseTurn(req, chat, settings, model)


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
