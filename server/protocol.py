"""OpenAI request models, field for field, and their conversion into engine arguments.

Fields follow OpenAI's API reference (https://platform.openai.com/docs/api-reference/chat/create and
/completions/create) in its order; our extensions sit in a marked block at the end. Unknown fields are
ignored, as clients send newer ones. Every number that reaches llama.cpp is bounded here. Response
models live in server/responses.py.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from typing import Annotated, Any, Literal

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf
from pydantic import BaseModel, ConfigDict, Field, field_validator

from server import toolcalls
from server.engine import GenerationParams
from server.errors import InvalidRequest
from server.sampler import SamplingParams
from server.settings import Settings

log = logging.getLogger(__name__)

INT64 = 2**63
MAX_TOKENS = 2**31 - 1  # llama.cpp counts tokens in int32
MAX_STOP = 32  # OpenAI allows 4; editor autocomplete (Continue) sends up to ~20
# A response_format schema's counts (string lengths, item and property counts, a pattern's {n,m}) become
# that many nested grammar groups, and llama.cpp parses each level by recursion: bounded well below the
# depth that overflows its stack, and below a grammar string that takes seconds to build.
MAX_SCHEMA_COUNT = 1024
SCHEMA_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
                 "minContains", "maxContains")
SCHEMA_DATA = ("const", "enum", "default", "examples")  # values, not schemas: their keys mean nothing
PATTERN_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- messages ----


class TextPart(_Model):
    type: Literal["text"]
    text: str


class RefusalPart(_Model):
    type: Literal["refusal"]
    refusal: str


class OtherPart(_Model):
    """Image, audio and file parts: accepted by the schema, refused with a clear 400."""

    type: Literal["image_url", "input_audio", "file"]


ContentPart = Annotated[TextPart | OtherPart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


class FunctionCall(_Model):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Model):
    content: str | list[TextPart]
    role: Literal["system"]
    name: str | None = None


class DeveloperMessage(_Model):
    content: str | list[TextPart]
    role: Literal["developer"]
    name: str | None = None


class UserMessage(_Model):
    content: str | list[ContentPart]
    role: Literal["user"]
    name: str | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Model):
    content: str | list[TextPart]
    role: Literal["tool"]
    tool_call_id: str


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


# ---- tools and formats ----


class FunctionDefinition(_Model):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormatText(_Model):
    type: Literal["text"]


class ResponseFormatJSONObject(_Model):
    type: Literal["json_object"]


class JSONSchema(_Model):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatJSONSchema(_Model):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


class StreamOptions(_Model):
    include_usage: bool | None = None


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]]
Seed = Annotated[int, Field(ge=-INT64, lt=INT64)]


def _only_one(value: int | None) -> int | None:
    if value is not None and value != 1:
        raise ValueError("only 1 choice per request is supported")
    return value


# ---- chat completions ----


class ChatCompletionRequest(_Model):
    messages: list[Message] = Field(min_length=1)
    model: str
    frequency_penalty: Penalty | None = None
    logit_bias: Bias | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    metadata: dict[str, str] | None = None
    n: int | None = 1
    parallel_tool_calls: bool | None = None
    presence_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    stop: Stop = None
    store: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    user: str | None = None

    # ---- extensions: llama.cpp sampling parameters, not in OpenAI's API ----
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)

    _check_n = field_validator("n")(_only_one)

    def message_dicts(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for the chat template; non-text content parts are refused."""
        for i, message in enumerate(self.messages):
            parts = message.content if isinstance(message.content, list) else []
            for j, part in enumerate(parts):
                if isinstance(part, OtherPart):
                    raise InvalidRequest(
                        f"Content parts of type '{part.type}' are not supported; send text",
                        param=f"messages[{i}].content[{j}]",
                    )
        return [m.model_dump(exclude_none=True, by_alias=True) for m in self.messages]

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """Tools the model is shown: none when tool_choice is "none"."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def to_generation(self, defaults: Settings, n_vocab: int) -> GenerationParams:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        grammar = self._format_grammar()
        tool_grammar = self._tool_grammar()
        if grammar and tool_grammar:
            raise InvalidRequest("response_format cannot be combined with a forced tool_choice", param="tool_choice")
        return GenerationParams(
            sampling=_sampling(self, defaults, n_vocab),
            max_tokens=self.max_completion_tokens or self.max_tokens,
            stop=_stops(self.stop),
            grammar=grammar or tool_grammar,
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
        )

    def _format_grammar(self) -> str | None:
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJSONObject):
            return JSON_GBNF
        if isinstance(fmt, ResponseFormatJSONSchema):
            schema = fmt.json_schema.schema_ or {"type": "object"}
            _check_schema_counts(schema)
            try:
                return json_safe_grammar(json_schema_to_gbnf(json.dumps(schema)))
            except Exception:  # the converter raises bare exceptions for schemas it cannot express
                raise InvalidRequest(
                    "This JSON schema cannot be turned into a grammar", param="response_format.json_schema.schema"
                ) from None
        return None

    def _tool_grammar(self) -> str | None:
        """A grammar forcing a call for tool_choice "required" or a named function, from the tool-call module."""
        if self.tool_choice in (None, "auto", "none"):
            return None
        if not self.tools:
            raise InvalidRequest("tool_choice requires a non-empty 'tools' list", param="tools")
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice
        if isinstance(choice, dict) and choice["function"]["name"] not in {t.function.name for t in self.tools}:
            name = choice["function"]["name"]
            raise InvalidRequest(f"tool_choice names '{name}', which is not in tools", param="tool_choice")
        grammar_for = getattr(toolcalls, "grammar_for", None)
        if grammar_for is None:
            return None
        kwargs = {}
        if "parallel_tool_calls" in inspect.signature(grammar_for).parameters:
            kwargs["parallel_tool_calls"] = self.parallel_tool_calls is not False
        try:
            return grammar_for(self.tool_dicts(), choice, **kwargs)
        except ValueError as exc:
            if hasattr(exc, "param"):  # the tool-call module's typed, user-facing error names the field
                raise InvalidRequest(str(exc), param=exc.param) from None
            log.warning("no grammar for these tools: %s", exc)
            raise InvalidRequest("These tools cannot be turned into a grammar", param="tools") from None


# ---- completions ----


class CompletionRequest(_Model):
    model: str
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[
        list[Annotated[int, Field(ge=0, lt=MAX_TOKENS)]], Field(min_length=1)
    ]
    best_of: int | None = None
    echo: bool | None = False
    frequency_penalty: Penalty | None = None
    logit_bias: Bias | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)
    n: int | None = 1
    presence_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    user: str | None = None

    # ---- extensions: llama.cpp sampling parameters, not in OpenAI's API ----
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)

    _check_n = field_validator("n", "best_of")(_only_one)

    def prompt_text(self) -> str | None:
        """The text prompt, special-token text in it parsed as such (editors send their own
        fill-in-the-middle layouts this way), or None for a token-id prompt."""
        text = self.prompt[0] if isinstance(self.prompt, list) and isinstance(self.prompt[0], str) else self.prompt
        if not isinstance(text, str):
            if self.suffix is not None:
                raise InvalidRequest("suffix needs a text prompt, not token ids", param="suffix")
            return None
        return text

    def fill_in_middle(self) -> tuple[str, str] | None:
        """(prefix, suffix) when `suffix` is given: the engine lays them out with the model's
        fill-in-the-middle tokens, and the code in them stays text."""
        text = self.prompt_text()
        return None if text is None or self.suffix is None else (text, self.suffix)

    def to_generation(self, defaults: Settings, n_vocab: int) -> GenerationParams:
        return GenerationParams(
            sampling=_sampling(self, defaults, n_vocab),
            max_tokens=self.max_tokens,
            stop=_stops(self.stop),
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
        )


# ---- shared conversion ----


# llama.cpp's schema converter (llama_cpp.llama_grammar, 0.3.36) lets control characters into a string
# (`char`) and lets a pattern's `.` (`dot`) produce '"', '\\' and control characters: JSON forbids all
# of them raw inside a string (RFC 8259, section 7), so these rules replace the converter's.
JSON_STRING_RULES = {
    "char": r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])',
    "dot": r'[^"\\\x7F\x00-\x1F] | "\\" ["\\/bft]',  # a regex '.' matches neither line break
}
_STRING_RULE = re.compile(rf"^({'|'.join(JSON_STRING_RULES)}) ::= .*$", re.MULTILINE)


def json_safe_grammar(gbnf: str) -> str:
    """The converter's grammar with its string-character rules replaced by ones that keep JSON valid."""
    return _STRING_RULE.sub(lambda m: f"{m.group(1)} ::= {JSON_STRING_RULES[m.group(1)]}", gbnf)


def _check_schema_counts(schema: Any) -> None:
    """Refuse a schema with a count over MAX_SCHEMA_COUNT anywhere in it (see there)."""
    param = "response_format.json_schema.schema"
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in SCHEMA_COUNTS and isinstance(value, (int, float)) and not isinstance(value, bool):
                if value > MAX_SCHEMA_COUNT:
                    raise InvalidRequest(f"'{key}' of {value:g} is over the {MAX_SCHEMA_COUNT} this server turns "
                                         "into a grammar", param=param)
            elif key == "pattern" and isinstance(value, str):
                counts = [n for m in PATTERN_COUNT.finditer(value) for n in m.groups() if n]
                if any(len(n) > 9 or int(n) > MAX_SCHEMA_COUNT for n in counts):
                    raise InvalidRequest(f"a repetition count in 'pattern' is over the {MAX_SCHEMA_COUNT} this "
                                         "server turns into a grammar", param=param)
            elif isinstance(value, (dict, list)) and key not in SCHEMA_DATA:
                stack.append(value)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)


def _sampling(req: ChatCompletionRequest | CompletionRequest, d: Settings, n_vocab: int) -> SamplingParams:
    bias = []
    for key, value in (req.logit_bias or {}).items():
        if not key.strip().isascii() or not key.strip().isdigit() or not 0 <= int(key) < n_vocab:
            raise InvalidRequest(f"logit_bias key '{key}' is not a token id below {n_vocab}", param="logit_bias")
        bias.append((int(key), float(value)))
    return SamplingParams(
        temperature=d.temperature if req.temperature is None else req.temperature,
        top_p=d.top_p if req.top_p is None else req.top_p,
        top_k=d.top_k if req.top_k is None else req.top_k,
        min_p=d.min_p if req.min_p is None else req.min_p,
        repeat_penalty=d.repeat_penalty if req.repeat_penalty is None else req.repeat_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repeat_last_n=d.repeat_last_n,
        seed=d.seed if req.seed is None else req.seed % 0xFFFFFFFF,  # 0xFFFFFFFF would mean "random"
        logit_bias=tuple(bias),
    )
