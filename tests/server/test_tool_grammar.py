"""grammar_for: forced tool calls as GBNF, compiled and checked by llama.cpp, then obeyed by a real model."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from server.toolcalls import ToolChoiceError, grammar_for, parse_turn
from tests.server.test_toolcalls import TOOLS, call, fn, render

# Bounded values (maxLength, integers, enums): even a tiny model has to finish the call.
BOUNDED = [
    fn("read_file", {"path": {"type": "string", "maxLength": 24}, "limit": {"type": "integer"}}, ["path", "limit"]),
    fn("set_mode", {"mode": {"enum": ["fast", "slow"]}, "verbose": {"type": "boolean"},
                    "ratio": {"type": "number"}}, ["mode", "verbose", "ratio"]),  # fmt: skip
    fn("list_dir"),
]
ODD = [
    fn('say"hi\\', {'quote"d': {"type": "string"}, "tab\tname": {"enum": ['a"b', 1, None, True]}}, ['quote"d']),
    fn("nested", {"obj": {"type": "object"}, "arr": {"type": "array"}, "u": {"type": ["integer", "null", "object"]},
                  "any": {"anyOf": [{"type": "number"}, {"type": "boolean"}]}, "long": {"type": "string",
                  "maxLength": 100000}, "req_only": {}}, ["req_only", "missing_from_properties"]),  # fmt: skip
]


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_no_grammar_when_the_model_may_answer_in_prose(choice: Any) -> None:
    assert grammar_for(TOOLS, choice) is None
    assert grammar_for(None, choice) is None


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (TOOLS, named("missing"), "tool_choice"),
        (TOOLS, {"type": "function"}, "tool_choice"),
        (TOOLS, "always", "tool_choice"),
        ([], "required", "tools"),
        (None, named("read_file"), "tools"),
    ],
)
def test_choices_that_cannot_be_honoured_name_the_field(tools: Any, choice: Any, param: str) -> None:
    with pytest.raises(ToolChoiceError) as err:
        grammar_for(tools, choice)
    assert err.value.param == param


def test_named_choice_allows_only_that_function() -> None:
    grammar = grammar_for(TOOLS, named("write_file"))
    assert grammar is not None and "<function=write_file>" in grammar and "<function=read_file>" not in grammar
    assert all(f"<function={t['function']['name']}>" in grammar_for(TOOLS, "required") for t in TOOLS)  # type: ignore[operator]


@pytest.mark.parametrize("tools", [TOOLS, BOUNDED, ODD], ids=["mixed", "bounded", "odd-names"])
@pytest.mark.parametrize("parallel", [True, False])
def test_grammar_compiles_in_llama_cpp(tools: list[dict[str, Any]], parallel: bool) -> None:
    for choice in ["required", *(named(t["function"]["name"]) for t in tools)]:
        gbnf = grammar_for(tools, choice, parallel_tool_calls=parallel)
        assert gbnf is not None
        assert llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)._grammar == gbnf
        # from_string only stores the text; llama.cpp parses it here (NULL on a syntax error).
        sampler = llama_cpp.llama_sampler_init_grammar(None, gbnf.encode(), b"root")
        assert sampler, gbnf
        llama_cpp.llama_sampler_free(sampler)


# ---- with the reference model's vocabulary and weights ----


@pytest.fixture(scope="module")
def reference_gguf(reference_model: Path, test_gguf: Path) -> Path:
    """The reference model built by `coder-quant build` (tests/server/conftest.py); skipped without it."""
    return test_gguf


@pytest.fixture(scope="module")
def llm(reference_gguf: Path) -> Iterator[Any]:
    model = llama_cpp.Llama(str(reference_gguf), n_ctx=2048, seed=0, verbose=False)
    yield model
    model.close()


def accepts(llm: Any, gbnf: str, text: str) -> bool:
    """Does llama.cpp's grammar sampler let exactly this text through and then allow end-of-generation?"""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    assert sampler
    try:
        for token in [*llm.tokenize(text.encode(), add_bos=False, special=True), llm.token_eos()]:
            candidate = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
            array = llama_cpp.llama_token_data_array(data=candidate, size=1, selected=-1, sorted=False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
            if candidate[0].logit == float("-inf"):
                return False
            if token != llm.token_eos():
                llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_grammar_accepts_the_calls_the_template_writes_and_nothing_else(llm: Any) -> None:
    required = grammar_for(TOOLS, "required", parallel_tool_calls=False)
    one = call("read_file", path="src/app.py", limit="20")
    code = call("write_file", path="a.py", content="def f():\n    return '<tool_call>' < 2\n")
    typed = call("configure", ratio="-1.5e3", verbose="true", options='{"a": [1, {"b": null}]}', files='["x"]',
                 maybe="null", mode="slow", level="3")  # fmt: skip
    for text in (one, code, typed, call("list_dir"), call("read_file", path="")):
        assert accepts(llm, required, text), text
    rejected = [
        call("read_file", limit="20"),  # required parameter missing
        call("read_file", path="a", limit="twenty"),  # not an integer
        call("configure", mode="medium"),  # not in the enum
        call("write_file", path="a", content="x = '</parameter>'"),  # the closing tag inside a value
        call("delete_everything", path="/"),  # not a declared function
        "Sure! " + one,  # prose instead of the call
        one + "\n" + one,  # two calls without parallel_tool_calls
        one[:-5],  # unfinished
    ]
    for text in rejected:
        assert not accepts(llm, required, text), text
    assert accepts(llm, grammar_for(TOOLS, "required"), one + "\n" + call("list_dir"))
    assert not accepts(llm, grammar_for(TOOLS, named("list_dir")), one)


def generate(llm: Any, tools: list[dict[str, Any]], choice: Any, parallel: bool, template: str, limit: int) -> str:
    prompt = render(template, [{"role": "user", "content": "Open src/app.py and show the first lines."}], tools)
    gbnf = grammar_for(tools, choice, parallel_tool_calls=parallel)
    assert gbnf is not None
    grammar = llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokens: list[int] = []
    for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True), temp=0.0, grammar=grammar):
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(tokens) == limit:
            break
        tokens.append(token)
    return llm.detokenize(tokens, special=True).decode()


@pytest.mark.parametrize(
    ("choice", "parallel"),
    [("required", False), (named("read_file"), False), (named("set_mode"), False), (named("list_dir"), True)],
)
def test_reference_model_under_the_grammar_emits_a_parseable_call(
    llm: Any, qwen3_coder_template: str, choice: Any, parallel: bool
) -> None:
    # A tiny model given "one or more calls" may go on calling until max_tokens: then cut it short.
    text = generate(llm, BOUNDED, choice, parallel, qwen3_coder_template, limit=40 if parallel else 160)
    turn = parse_turn(text, BOUNDED)
    assert turn.tool_calls and text.startswith("<tool_call>\n<function="), text
    first = turn.tool_calls[0]["function"]
    if isinstance(choice, dict):
        assert first["name"] == choice["function"]["name"]
    spec = next(t["function"]["parameters"] for t in BOUNDED if t["function"]["name"] == first["name"])
    args = json.loads(first["arguments"])
    assert set(spec["required"]) <= set(args), text
    if not parallel:  # one call, finished: the grammar then only allows end-of-generation
        assert len(turn.tool_calls) == 1 and not turn.incomplete and turn.content is None, text
