"""/v1/responses requests: OpenAI's Responses API over the chat path (output: server.responses_output).

Input items become chat messages (function_call items an assistant message's tool_calls,
function_call_output items tool messages), so the same chat template renders them and the same
engine job and tool-call parser (server.toolcalls) produce the answer. Output items and stream events
follow https://platform.openai.com/docs/api-reference/responses (field names as in the openai
package's `openai.types.responses`). Nothing is stored: `store` is accepted and ignored, and anything
that needs a stored response (`previous_response_id`, `conversation`, `background`) is a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from server.chat import start_chat
from server.engine import Engine, Job
from server.errors import InvalidRequest
from server.protocol import MAX_TOKENS, ChatCompletionRequest
from server.responses_output import ResponseTurn
from server.settings import Settings
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


# Our names for chat-path parameters, where an error from the chat path names one.
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
           "response_format.json_schema.schema": "text.format.schema"}  # fmt: skip


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
    return job, ResponseTurn.of(req, chat, settings, model)
