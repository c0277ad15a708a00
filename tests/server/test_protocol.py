"""Request models -> engine arguments, without a model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.errors import InvalidRequest, param_name
from server.protocol import MAX_STOP, ChatCompletionRequest, CompletionRequest
from server.settings import Settings

DEFAULTS = Settings(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, repeat_penalty=1.05, seed=1234)
N_VOCAB = 4096


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_defaults_come_from_settings() -> None:
    p = chat().to_generation(DEFAULTS, N_VOCAB)
    s = p.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repeat_penalty, s.seed) == (0.7, 0.8, 20, 0.0, 1.05, 1234)
    assert p.max_tokens is None and p.stop == () and p.grammar is None and not p.logprobs


def test_request_values_and_extensions_override_defaults() -> None:
    p = chat(temperature=0, top_p=0.5, top_k=3, min_p=0.1, repeat_penalty=1.0, seed=7, presence_penalty=1.5,
             frequency_penalty=-1, stop="\n", max_tokens=5).to_generation(DEFAULTS, N_VOCAB)
    s = p.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repeat_penalty, s.seed) == (0, 0.5, 3, 0.1, 1.0, 7)
    assert (s.presence_penalty, s.frequency_penalty) == (1.5, -1)
    assert p.stop == ("\n",) and p.max_tokens == 5


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=9, max_completion_tokens=4).to_generation(DEFAULTS, N_VOCAB).max_tokens == 4


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"stop": ["s"] * (MAX_STOP + 1)}, "stop"),
    ],
)
def test_out_of_range_values_are_rejected_naming_the_field(fields: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    assert param_name(info.value.errors()[0]["loc"]).startswith(param)


def test_top_logprobs_needs_logprobs() -> None:
    with pytest.raises(InvalidRequest) as info:
        chat(top_logprobs=2).to_generation(DEFAULTS, N_VOCAB)
    assert info.value.param == "top_logprobs"


def test_logit_bias_keys_must_be_token_ids_in_the_vocabulary() -> None:
    p = chat(logit_bias={"7": -100}).to_generation(DEFAULTS, N_VOCAB)
    assert p.sampling.logit_bias == ((7, -100.0),)
    for key in ("4096", "x", "-1", "\u00b2", "\u0663"):  # superscript two and Arabic three: digits, not ids
        with pytest.raises(InvalidRequest) as info:
            chat(logit_bias={key: 1}).to_generation(DEFAULTS, N_VOCAB)
        assert info.value.param == "logit_bias"


def test_response_formats_become_grammars() -> None:
    assert "root" in chat(response_format={"type": "json_object"}).to_generation(DEFAULTS, N_VOCAB).grammar
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    grammar = chat(response_format=fmt).to_generation(DEFAULTS, N_VOCAB).grammar
    assert "yes" in grammar and "answer" in grammar
    assert chat(response_format={"type": "text"}).to_generation(DEFAULTS, N_VOCAB).grammar is None


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 30000},
    {"type": "string", "minLength": 1e9},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "maxItems": 5000}}},
    {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^a{0,20000}$"}]},
    {"type": "string", "pattern": "^a{" + "9" * 5000 + "}$"},
])
def test_schema_counts_that_would_nest_too_deep_are_refused(schema: dict) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat(response_format=json_schema_format(schema)).to_generation(DEFAULTS, N_VOCAB)
    assert info.value.param == "response_format.json_schema.schema" and "1024" in str(info.value)


def test_schema_counts_within_the_bound_and_lookalike_keys_pass() -> None:
    schema = {"type": "object", "properties": {
        "code": {"type": "string", "maxLength": 1024, "pattern": "^[a-z]{1,64}$"},
        "maxLength": {"type": "integer"},  # a property of that name is no count
        "mode": {"enum": [{"maxItems": 99999}], "default": {"minLength": 5000}},  # data, not schema
    }}
    grammar = chat(response_format=json_schema_format(schema)).to_generation(DEFAULTS, N_VOCAB).grammar
    assert "code" in grammar and "mode" in grammar


def test_non_text_content_parts_are_refused_naming_the_part() -> None:
    req = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}])
    with pytest.raises(InvalidRequest) as info:
        req.message_dicts()
    assert info.value.param == "messages[0].content[1]"


def test_tool_choice_must_name_a_given_tool() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(InvalidRequest) as info:
        chat(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}}).to_generation(DEFAULTS, N_VOCAB)
    assert info.value.param == "tool_choice"
    with pytest.raises(InvalidRequest) as info:
        chat(tool_choice="required").to_generation(DEFAULTS, N_VOCAB)
    assert info.value.param == "tools"


def test_tool_choice_none_hides_the_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert chat(tools=tools).tool_dicts() == [{"type": "function", "function": {"name": "f"}}]
    assert chat(tools=tools, tool_choice="none").tool_dicts() is None


def test_completion_prompt_and_fill_in_the_middle() -> None:
    req = CompletionRequest(model="m", prompt="def f(", suffix="\n    return x\n")
    assert req.prompt_text() == "def f(" and req.fill_in_middle() == ("def f(", "\n    return x\n")
    assert CompletionRequest(model="m", prompt="def f(").fill_in_middle() is None
    assert CompletionRequest(model="m", prompt=["abc"]).prompt_text() == "abc"
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).prompt_text() is None
    with pytest.raises(InvalidRequest):
        CompletionRequest(model="m", prompt=[1, 2], suffix="x").prompt_text()
    assert CompletionRequest(model="m", prompt="x").to_generation(DEFAULTS, N_VOCAB).max_tokens == 16  # OpenAI's default


def test_completion_logprobs_are_bounded_like_openai() -> None:
    p = CompletionRequest(model="m", prompt="x", logprobs=2).to_generation(DEFAULTS, N_VOCAB)
    assert p.logprobs and p.top_logprobs == 2
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", logprobs=6)
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=["a", "b"])


def test_param_names_read_like_the_request() -> None:
    assert param_name(("body", "messages", 0, "user", "content", "str")) == "messages[0].content"
    loc = ("body", "messages", 0, "user", "content", "list[tagged-union[TextPart,OtherPart]]", 1, "text", "text")
    assert param_name(loc) == "messages[0].content[1].text"
    assert param_name(("body", "response_format", "json_schema", "json_schema")) == "response_format.json_schema"
    assert param_name(("body", "tool_choice", "NamedToolChoice", "function")) == "tool_choice.function"
    assert param_name(("body", "temperature")) == "temperature"
    assert param_name(("body",)) is None
