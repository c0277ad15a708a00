"""Chat template rendering: the real Qwen3-Coder template, content parts, tool-call arguments, errors."""

from __future__ import annotations

import pytest

from server.templates import CHATML_TEMPLATE, ChatTemplate, TemplateError, prepare_messages

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_qwen3_coder_renders_a_plain_conversation(qwen3_coder_template: str) -> None:
    text = ChatTemplate(qwen3_coder_template).render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    )
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_content_parts_are_flattened_and_developer_becomes_system(qwen3_coder_template: str) -> None:
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Rules."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    text = ChatTemplate(qwen3_coder_template).render(messages)
    assert "<|im_start|>system\nRules.<|im_end|>" in text
    assert "<|im_start|>user\nab<|im_end|>" in text


def test_tool_call_arguments_json_is_rendered_as_parameters(qwen3_coder_template: str) -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": [1, 2]}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = ChatTemplate(qwen3_coder_template).render(messages, tools=[WEATHER_TOOL])
    assert "<name>get_weather</name>" in text  # the tool is described in the system turn
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" in text
    assert "<parameter=days>\n[1, 2]\n</parameter>" in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_arguments_that_are_not_json_are_a_template_error() -> None:
    with pytest.raises(TemplateError, match="not valid JSON"):
        prepare_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}])


def test_raise_exception_in_a_template_is_a_template_error() -> None:
    template = ChatTemplate("{{ raise_exception('only user turns, please') }}")
    with pytest.raises(TemplateError, match="only user turns"):
        template.render([{"role": "user", "content": "x"}])


def test_a_template_cannot_reach_python_internals() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        template.render([{"role": "user", "content": "x"}])


def test_tojson_does_not_html_escape() -> None:
    assert ChatTemplate("{{ messages[0].content | tojson }}").render([{"role": "user", "content": "<a&b>"}]) == '"<a&b>"'


def test_missing_template_falls_back_to_chatml() -> None:
    template = ChatTemplate(None)
    assert template.source == CHATML_TEMPLATE
    assert template.render([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_does_not_compile_is_reported() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% if %}")
