"""Chat messages -> prompt text, with the model's own Jinja chat template (tokenizer.chat_template).

Rendered in jinja2's ImmutableSandboxedEnvironment: a template comes from a model file, so it must not
reach Python internals. Errors a template raises (raise_exception, bad input) become TemplateError,
which the API answers with 400.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a GGUF carries no chat template: ChatML, the format of the Qwen family.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class TemplateError(ValueError):
    """The chat template could not render these messages."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # HF's tojson: unlike jinja2's own, it does not HTML-escape, which would change the prompt text.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def flatten_content(content: Any) -> str | None:
    """A content-part array becomes its text parts joined; a string or None is kept."""
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict):
            parts.append(str(part.get("text", part.get("refusal", ""))))
        else:
            parts.append(str(part))
    return "".join(parts)


def _arguments_object(arguments: Any) -> Any:
    """OpenAI sends tool-call arguments as a JSON string; templates iterate them as a mapping."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"tool call arguments are not valid JSON: {exc.msg}") from None


def prepare_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts as HF chat templates expect them: text content, argument objects, 'system' for 'developer'."""
    prepared = []
    for message in messages:
        msg = dict(message)
        if msg.get("role") == "developer":
            msg["role"] = "system"
        msg["content"] = flatten_content(msg.get("content"))
        if msg["content"] is None and not msg.get("tool_calls"):
            msg["content"] = ""
        if msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function") or {})
                function["arguments"] = _arguments_object(function.get("arguments", {}))
                call["function"] = function
                calls.append(call)
            msg["tool_calls"] = calls
        prepared.append(msg)
    return prepared


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source or CHATML_TEMPLATE
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template does not compile: {exc}") from None
        self._bos, self._eos = bos_token, eos_token

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        variables: dict[str, Any] = {
            "messages": prepare_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._bos,
            "eos_token": self._eos,
            **extra,
        }
        if tools:
            variables["tools"] = list(tools)
        try:
            return self._template.render(**variables)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise TemplateError(f"the chat template failed on these messages: {type(exc).__name__}") from None
