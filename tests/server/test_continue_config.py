"""The Continue config.yaml in docs/continue.md: valid for Continue, and right for this server.

Continue's side is kept here as data, read from its source (continuedev/continue):
packages/config-yaml/src/schemas/models.ts (the model schema), core/llm/llms/OpenAI.ts (endpoints,
stop-word limit), core/autocomplete/templating/AutocompleteTemplate.ts and getStopTokens.ts
(the fill-in-the-middle prompt and stop list it sends for autocomplete).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from server.app import create_app, model_id
from server.protocol import MAX_STOP
from server.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "continue.md"

# Continue's config.yaml model schema (models.ts): allowed keys and values.
MODEL_KEYS = {
    "name", "provider", "model", "apiKey", "apiBase", "maxStopWords", "roles", "capabilities",
    "defaultCompletionOptions", "cacheBehavior", "requestOptions", "embedOptions", "chatOptions",
    "promptTemplates", "useLegacyCompletionsEndpoint", "env", "autocompleteOptions",
}  # fmt: skip
ROLES = {"chat", "autocomplete", "embed", "rerank", "edit", "apply", "summarize"}
CAPABILITIES = {"tool_use", "image_input"}
COMPLETION_OPTION_KEYS = {
    "contextLength", "maxTokens", "temperature", "topP", "topK", "minP", "presencePenalty", "frequencyPenalty",
    "stop", "n", "reasoning", "reasoningBudgetTokens", "promptCaching", "stream",
}  # fmt: skip
AUTOCOMPLETE_OPTION_KEYS = {
    "disable", "maxPromptTokens", "debounceDelay", "modelTimeout", "maxSuffixPercentage", "prefixPercentage",
    "template", "onlyMyCode",
}  # fmt: skip
# What Continue's autocomplete sends for a model whose name has "qwen" and "coder".
QWEN_FIM = "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
QWEN_FIM_STOPS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                  "<|repo_name|>", "<|file_sep|>", "<|im_start|>", "<|im_end|>"]  # fmt: skip
COMMON_STOPS = ["\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```"]


def doc_config() -> dict[str, Any]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/continue.md should hold exactly one yaml block"
    return yaml.safe_load(blocks[0])


def doc_alias() -> str:
    match = re.search(r"coder-serve \S+ --alias (\S+)", DOC.read_text())
    assert match, "docs/continue.md should start the server with --alias"
    return match.group(1)


def by_role(config: dict[str, Any], role: str) -> dict[str, Any]:
    [model] = [m for m in config["models"] if role in m.get("roles", [])]
    return model


def test_config_fits_continues_schema() -> None:
    config = doc_config()
    assert {"name", "version", "schema"} <= set(config) and config["schema"] == "v1"
    for model in config["models"]:
        assert {"name", "provider", "model"} <= set(model) <= MODEL_KEYS
        assert set(model["roles"]) <= ROLES and set(model.get("capabilities", [])) <= CAPABILITIES
        assert set(model.get("defaultCompletionOptions", {})) <= COMPLETION_OPTION_KEYS
        assert set(model.get("autocompleteOptions", {})) <= AUTOCOMPLETE_OPTION_KEYS
    assert len({m["name"] for m in config["models"]}) == len(config["models"])


def test_config_matches_what_the_server_serves() -> None:
    config, defaults = doc_config(), Settings()
    assert {r for m in config["models"] for r in m["roles"]} >= {"chat", "edit", "apply", "autocomplete"}
    paths = set(create_app(defaults).openapi()["paths"])
    for model in config["models"]:
        assert model["provider"] == "openai"
        assert model["apiBase"] == f"http://{defaults.host}:{defaults.port}/v1"
        # Continue appends these to apiBase; each must be a route of the server.
        assert {f"{urlsplit(model['apiBase']).path}/{e}" for e in ("chat/completions", "completions", "models")} <= paths
        assert model["model"] == model_id(Settings(alias=doc_alias()))  # what /v1/models reports
        options = model.get("defaultCompletionOptions", {})
        assert 0 <= options.get("temperature", 0) <= 2 and 0 <= options.get("topP", 1) <= 1
        assert options.get("contextLength", 0) <= defaults.ctx_size
        assert model.get("useLegacyCompletionsEndpoint") is not False  # False sends autocomplete to chat
        assert "image_input" not in model.get("capabilities", [])
    chat = by_role(config, "chat")
    assert "tool_use" in chat["capabilities"]
    options = chat["defaultCompletionOptions"]
    assert (options["temperature"], options["topP"], options["topK"]) == (
        defaults.temperature, defaults.top_p, defaults.top_k)  # fmt: skip
    autocomplete = by_role(config, "autocomplete")
    name = autocomplete["model"].lower()
    assert "qwen" in name and "coder" in name  # Continue picks Qwen's FIM template by name
    assert autocomplete["maxStopWords"] <= MAX_STOP


def continue_autocomplete_body(model: dict[str, Any]) -> dict[str, Any]:
    """The body Continue POSTs to {apiBase}/completions for a tab completion in a Python file."""
    options = model["defaultCompletionOptions"]
    prefix = "# utils.py\ndef add(a, b):\n    return"
    return {
        "model": model["model"],
        "prompt": QWEN_FIM.format(prefix=prefix, suffix="\n\nprint(add(1, 2))\n"),
        "max_tokens": options["maxTokens"],
        "temperature": options["temperature"],
        "stream": True,
        # Older Continue versions add the language's keywords: more than the server takes, hence maxStopWords.
        "stop": (QWEN_FIM_STOPS + COMMON_STOPS + ["def", "class", '"""#'])[: model["maxStopWords"]],
    }


def sse_payloads(response: httpx.Response) -> list[Any]:
    lines = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def continue_server(test_gguf: Path) -> Any:
    from tests.server.conftest import live_server, make_settings

    with live_server(make_settings(test_gguf, alias=doc_alias())) as live:
        yield live


def test_server_answers_continue_requests(continue_server: Any) -> None:
    config = doc_config()
    chat_model, auto_model = by_role(config, "chat"), by_role(config, "autocomplete")
    base = urlsplit(auto_model["apiBase"]).path + "/"
    with continue_server.client() as http:
        models = http.get(base + "models").json()["data"]
        assert [m["id"] for m in models] == [chat_model["model"]]

        with http.stream("POST", base + "completions", json=continue_autocomplete_body(auto_model)) as response:
            assert response.status_code == 200
            chunks = sse_payloads(response)
        assert chunks and all(c["object"] == "text_completion" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

        tool = {"type": "function", "function": {"name": "read_file", "description": "Read a file",
                "parameters": {"type": "object", "properties": {"filepath": {"type": "string"}},
                               "required": ["filepath"]}, "strict": None}}  # fmt: skip
        messages = [  # as Continue's agent mode sends a tool round trip (empty content becomes " ")
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "What is in app.py?"},
            {"role": "assistant", "content": " ", "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "read_file", "arguments": '{"filepath": "app.py"}'}}]},
            {"role": "tool", "content": "print('hi')", "tool_call_id": "call_1"},
        ]  # fmt: skip
        options = chat_model["defaultCompletionOptions"]
        body = {"model": chat_model["model"], "messages": messages, "max_tokens": 16, "stream": True,
                "temperature": options["temperature"], "top_p": options["topP"], "tools": [tool],
                "parallel_tool_calls": False}  # fmt: skip
        with http.stream("POST", base + "chat/completions", json=body) as response:
            assert response.status_code == 200
            chunks = sse_payloads(response)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
