"""Tool schemas: reading them, typing argument values by them, and the GBNF grammar that forces a call.

`tool_specs` reads the OpenAI `tools` list into one record per function; `convert_value` types a
parameter's text by its JSON schema (the parser in `server.toolcalls` uses both). `grammar_for`
turns `tool_choice` "required" or a named function into a grammar whose every sentence is one (or,
with parallel calls, several) Qwen3-Coder `<tool_call>` blocks naming an allowed function with its
required parameters, in the exact layout the chat template renders (fixtures/qwen3-coder.jinja).
GBNF syntax:
https://github.com/ggml-org/llama.cpp/blob/master/grammars/README.md
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ToolChoice = str | Mapping[str, Any] | None

# JSON-schema types the parser and the grammar understand; anything else is treated as a string.
SCALAR_TYPES = ("null", "boolean", "integer", "number")
VALUE_TYPES = (*SCALAR_TYPES, "object", "array", "string")
MAX_BOUNDED_LENGTH = 512  # a string's maxLength above this is left unbounded (GBNF expands {0,n})
MAX_DIGITS = 4000  # longer integers stay text: Python refuses to print ints past 4300 digits
PARAM_CLOSE = "</parameter>"
_INT = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_FAIL = object()


class ToolRequestError(ValueError):
    """Tool fields of a request that cannot be honoured; `param` names the field (OpenAI error `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ToolChoiceError(ToolRequestError):
    def __init__(self, message: str, param: str = "tool_choice") -> None:
        super().__init__(message, param)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    properties: Mapping[str, Any]  # parameter name -> JSON schema, in declared order
    required: tuple[str, ...]


def tool_specs(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, ToolSpec]:
    """Function name -> ToolSpec; accepts {"type": "function", "function": {...}} or the bare function."""
    specs: dict[str, ToolSpec] = {}
    for tool in tools or ():
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters") if isinstance(fn.get("parameters"), Mapping) else {}
        props = params.get("properties") if isinstance(params.get("properties"), Mapping) else {}
        required = tuple(r for r in params.get("required") or () if isinstance(r, str))
        specs[fn["name"]] = ToolSpec(fn["name"], dict(props), required)
    return specs


def schema_types(schema: Any) -> tuple[str, ...]:
    """The JSON types a parameter schema allows, most specific first; ("string",) when unknown."""
    if not isinstance(schema, Mapping):
        return ("string",)
    found: list[str] = []
    declared = schema.get("type")
    if isinstance(declared, str):
        found.append(declared)
    elif isinstance(declared, list):
        found.extend(t for t in declared if isinstance(t, str))
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            found.extend(schema_types(sub))
    if not found and isinstance(schema.get("enum"), list) and schema["enum"]:
        found.extend(_json_type(v) for v in schema["enum"])
    if not found and "const" in schema:
        found.append(_json_type(schema["const"]))
    if not found:
        found.append("object" if "properties" in schema else "array" if "items" in schema else "string")
    known = [t for t in VALUE_TYPES if t in found]
    if any(t not in VALUE_TYPES for t in found) and "string" not in known:
        known.append("string")
    return tuple(known) or ("string",)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "object" if isinstance(value, dict) else "array" if isinstance(value, list) else "string"


def convert_value(text: str, schema: Any) -> Any:
    """A parameter's text -> the value its schema declares; the raw text when it does not fit."""
    stripped = text.strip()
    for kind in schema_types(schema):
        if kind == "string":
            return text
        value = _CONVERTERS[kind](stripped)
        if value is not _FAIL:
            return value
    return text


def _to_null(text: str) -> Any:
    return None if text.lower() in ("null", "none") else _FAIL


def _to_bool(text: str) -> Any:
    return {"true": True, "false": False}.get(text.lower(), _FAIL)


def _to_int(text: str) -> Any:
    number = _to_number(text)
    if isinstance(number, float):
        return int(number) if number.is_integer() else _FAIL
    return number


def _to_number(text: str) -> Any:
    if _INT.fullmatch(text) and len(text) <= MAX_DIGITS:
        return int(text)
    if _NUMBER.fullmatch(text) and math.isfinite(number := float(text)):
        return number
    return _FAIL


def _structured(kind: type) -> Callable[[str], Any]:
    def load(text: str) -> Any:
        for parse in (json.loads, ast.literal_eval):  # JSON, or the Python literal a model may write
            try:
                value = parse(text)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            value = list(value) if kind is list and isinstance(value, tuple) else value
            if isinstance(value, kind) and (value := _as_json(value)) is not _FAIL:
                return value
        return _FAIL

    return load


def _as_json(value: Any) -> Any:
    """The value as JSON would give it back (tuples -> lists, int keys -> strings), or _FAIL."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return _FAIL


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "null": _to_null, "boolean": _to_bool, "integer": _to_int, "number": _to_number,
    "object": _structured(dict), "array": _structured(list),
}  # fmt: skip


def forced_functions(tools: Sequence[Mapping[str, Any]] | None, tool_choice: ToolChoice) -> list[str] | None:
    """Names a call must use: None when the model may answer in prose ("auto", "none", no tools)."""
    specs = tool_specs(tools)
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if not specs:
        raise ToolChoiceError("tool_choice requires a non-empty 'tools' list", param="tools")
    if tool_choice == "required":
        return list(specs)
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if tool_choice.get("type") == "function" and isinstance(name, str):
            if name not in specs:
                raise ToolChoiceError(f"tool_choice names function '{name}', which is not in 'tools'")
            return [name]
    raise ToolChoiceError(
        "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"
    )


def grammar_for(
    tools: Sequence[Mapping[str, Any]] | None, tool_choice: ToolChoice, parallel_tool_calls: bool = True
) -> str | None:
    """GBNF forcing tool call(s) for "required" / a named function; None when nothing is forced."""
    names = forced_functions(tools, tool_choice)
    if names is None:
        return None
    specs = tool_specs(tools)
    rules: dict[str, str] = {}
    calls = [_call_rule(rules, f"fn{i}", specs[name]) for i, name in enumerate(names)]
    rules["call"] = " | ".join(calls)
    rules["root"] = 'call ( "\\n" call )*' if parallel_tool_calls else "call"
    body = "\n".join(f"{name} ::= {rhs}" for name, rhs in rules.items() if name != "root")
    return f"root ::= {rules['root']}\n{body}\n"


def _call_rule(rules: dict[str, str], prefix: str, spec: ToolSpec) -> str:
    params = list(spec.properties) + [r for r in spec.required if r not in spec.properties]
    parts = [_literal(f"<tool_call>\n<function={spec.name}>\n")]
    close = _literal(f"\n{PARAM_CLOSE}\n")
    for i, pname in enumerate(params):
        rule = f"{prefix}-p{i}"
        value = _value_rule(rules, rule, spec.properties.get(pname))
        rules[rule] = f"{_literal(f'<parameter={pname}>{chr(10)}')} {value} {close}"
        parts.append(rule if pname in spec.required else f"{rule}?")
    parts.append(_literal("</function>\n</tool_call>"))
    rules[prefix] = " ".join(parts)
    return prefix


def _value_rule(rules: dict[str, str], name: str, schema: Any) -> str:
    """The rule a parameter's value must match: typed where the schema says so, else free text."""
    types = schema_types(schema)
    schema = schema if isinstance(schema, Mapping) else {}
    choices = schema["enum"] if isinstance(schema.get("enum"), list) else [schema["const"]] if "const" in schema else []
    if choices:
        rules[f"{name}-v"] = " | ".join(_literal(_as_text(v)) for v in choices)
        return f"{name}-v"
    if "string" in types:
        limit = schema.get("maxLength")
        if isinstance(limit, int) and 0 < limit <= MAX_BOUNDED_LENGTH and types == ("string",):
            return f"[^<]{{0,{limit}}}"
        _add_text_rules(rules)
        return "text"
    if {"object", "array"} & set(types):
        _add_json_rules(rules)  # also adds the scalar rules
    else:
        _add_scalar_rules(rules)
    rules[f"{name}-v"] = " | ".join(f"json-{t}" for t in types)
    return f"{name}-v"


def _as_text(value: Any) -> str:
    """How the template writes an enum value: strings as they are, other values as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _add_text_rules(rules: dict[str, str]) -> None:
    """Free text that never contains </parameter>: rule text-K means K characters of it were just seen."""
    if "text" in rules:
        return
    rules["text"] = "text-0"
    for k, expected in enumerate(PARAM_CLOSE):
        if k == 0:
            rules["text-0"] = '| [^<] text-0 | "<" text-1'
            continue
        alts = f'| [^{_class_char(expected)}<] text-0 | "<" text-1'
        if expected != ">":  # the closing ">" is the one character that may never follow
            alts += f" | {_literal(expected)} text-{k + 1}"
        rules[f"text-{k}"] = alts


def _add_scalar_rules(rules: dict[str, str]) -> None:
    rules.setdefault("json-null", '"null"')
    rules.setdefault("json-boolean", '"true" | "false"')
    rules.setdefault("json-integer", '"-"? ( "0" | [1-9] [0-9]{0,17} )')
    rules.setdefault("json-number", 'json-integer ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?')


def _add_json_rules(rules: dict[str, str]) -> None:
    _add_scalar_rules(rules)
    rules.setdefault("json-ws", r'| " " | "\n" [ \t]{0,16}')
    rules.setdefault("json-string", r'"\"" ( [^"\\\x00-\x1f] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""')
    rules.setdefault(
        "json-value", "json-object | json-array | json-string | json-number | json-boolean | json-null"
    )
    rules.setdefault(
        "json-object",
        '"{" json-ws ( json-string json-ws ":" json-ws json-value json-ws '
        '( "," json-ws json-string json-ws ":" json-ws json-value json-ws )* )? "}"',
    )
    rules.setdefault(
        "json-array", '"[" json-ws ( json-value json-ws ( "," json-ws json-value json-ws )* )? "]"'
    )


def _class_char(ch: str) -> str:
    return "\\" + ch if ch in "]\\^-" else ch


def _literal(text: str) -> str:
    """A GBNF string literal; quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
