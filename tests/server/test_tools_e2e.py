"""Tool calls through the whole path: real server, real GGUF, the OpenAI Python SDK, greedy decoding."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.server.conftest import LiveServer
from tests.server.test_tool_grammar import BOUNDED, named

ASK = [{"role": "user", "content": "Open src/app.py and show the first lines."}]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    args = {"model": "m", "messages": ASK, "tools": BOUNDED, "temperature": 0, "seed": 1, "max_tokens": 160, **kwargs}
    return client.chat.completions.create(**args)


def required_args(name: str) -> set[str]:
    return {r for t in BOUNDED if t["function"]["name"] == name for r in t["function"]["parameters"]["required"]}


@pytest.mark.parametrize("choice", [named("read_file"), named("set_mode"), "required"])
def test_forced_choice_returns_a_well_formed_call(client: openai.OpenAI, choice: Any) -> None:
    out = create(client, tool_choice=choice, parallel_tool_calls=False)
    choice_out = out.choices[0]
    assert choice_out.finish_reason == "tool_calls" and choice_out.message.content is None
    [call] = choice_out.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == choice["function"]["name"]
    args = json.loads(call.function.arguments)
    assert required_args(call.function.name) <= set(args)


def accumulated(client: openai.OpenAI, **kwargs: Any) -> Any:
    """The OpenAI SDK's own stream accumulator (client.chat.completions.stream).

    Its snapshot, not get_final_completion(): that one refuses any finish_reason "length".
    """
    args = {"model": "m", "messages": ASK, "tools": BOUNDED, "temperature": 0, "seed": 1, "max_tokens": 160, **kwargs}
    with client.chat.completions.stream(**args) as stream:
        for _ in stream:
            pass
        return stream.current_completion_snapshot


def comparable(message: Any) -> tuple[Any, ...]:
    calls = [(tc.type, tc.function.name, tc.function.arguments) for tc in message.tool_calls or []]
    return message.role, message.content, calls


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tool_choice": named("set_mode"), "parallel_tool_calls": False},
        {"tool_choice": "required", "parallel_tool_calls": False},
        {"tool_choice": named("list_dir"), "max_tokens": 30},  # parallel: calls until max_tokens
        {"tool_choice": "auto", "max_tokens": 40},  # prose through the parser
    ],
)
def test_stream_accumulates_to_the_non_streaming_result(client: openai.OpenAI, kwargs: dict[str, Any]) -> None:
    whole = create(client, **kwargs).choices[0]
    streamed = accumulated(client, **kwargs).choices[0]
    assert comparable(streamed.message) == comparable(whole.message)
    assert streamed.finish_reason == whole.finish_reason
    ids = [tc.id for tc in streamed.message.tool_calls or []]
    assert len(set(ids)) == len(ids) and all(i.startswith("call_") for i in ids)


def test_calls_cut_off_by_max_tokens_finish_with_length(client: openai.OpenAI) -> None:
    # One or more list_dir calls: this model keeps calling until max_tokens cuts the last call short.
    for out in (create(client, tool_choice=named("list_dir"), max_tokens=30).choices[0],
                accumulated(client, tool_choice=named("list_dir"), max_tokens=30).choices[0]):  # fmt: skip
        assert out.finish_reason == "length"
        assert out.message.tool_calls and all(json.loads(tc.function.arguments) == {} for tc in out.message.tool_calls)


def test_multi_turn_exchange_renders_and_answers(client: openai.OpenAI, server: LiveServer) -> None:
    first = create(client, tool_choice=named("read_file"), parallel_tool_calls=False).choices[0].message
    [call] = first.tool_calls
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "print('hello')\n"},
    ]
    answer = create(client, messages=history, max_tokens=24)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = server.app.state.server.template().render(history, tools=BOUNDED)
    args = json.loads(call.function.arguments)
    block = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    assert f"<|im_start|>assistant\n<tool_call>\n<function=read_file>\n{block}</function>\n</tool_call><|im_end|>\n" in prompt
    assert prompt.endswith(
        "<|im_start|>user\n<tool_response>\nprint('hello')\n\n</tool_response>\n<|im_end|>\n<|im_start|>assistant\n"
    )
    assert answer.usage.prompt_tokens == len(server.engine.tokenize(prompt))


def test_tool_choice_none_hides_the_tools(client: openai.OpenAI) -> None:
    plain = create(client, tools=None, max_tokens=4)
    hidden = create(client, tool_choice="none", max_tokens=4)
    assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens
    assert hidden.choices[0].message.tool_calls is None
    assert create(client, tool_choice="auto", max_tokens=4).usage.prompt_tokens > plain.usage.prompt_tokens


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tool_choice": named("not_a_tool")}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tools"),
        ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "read_file", "arguments": "{oops"}}]}]}, "messages"),
    ],
)  # fmt: skip
def test_bad_tool_requests_get_a_400_naming_the_field(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        create(client, **kwargs)
    assert err.value.body["param"] == param  # type: ignore[index]
