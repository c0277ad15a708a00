"""What the server needs to know about a loaded llama.cpp model, read once after loading."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import llama_cpp


@dataclass(frozen=True)
class ModelInfo:
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    add_bos: bool
    bos_token: str
    eos_token: str
    chat_template: str | None
    eog_tokens: tuple[int, ...]  # tokens that end a generation (llama_vocab_is_eog)
    description: str  # llama.cpp's one-line description, e.g. "qwen3next 80B.A3B IQ4_XS"
    size_bytes: int
    n_params: int
    placement: dict[str, Any]


def token_piece(vocab: Any, token: int) -> bytes:
    """A token's bytes; special tokens such as <tool_call> are rendered as their text."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[:n]


def describe(llama: Any, placement: dict[str, Any]) -> ModelInfo:
    model = llama._model
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    bos, eos = llama.token_bos(), llama.token_eos()
    return ModelInfo(
        n_ctx=llama.n_ctx(),
        n_ctx_train=model.n_ctx_train(),
        n_vocab=llama.n_vocab(),
        add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        bos_token=model.token_get_text(bos) if bos >= 0 else "",
        eos_token=model.token_get_text(eos) if eos >= 0 else "",
        chat_template=llama.metadata.get("tokenizer.chat_template"),
        eog_tokens=tuple(t for t in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)),
        description=model.desc(),
        size_bytes=model.size(),
        n_params=model.n_params(),
        placement=dict(placement),
    )


def context_message(n_ctx: int, n_prompt: int, max_tokens: int | None) -> str:
    """OpenAI's wording for context_length_exceeded."""
    if max_tokens is None:
        return (
            f"This model's maximum context length is {n_ctx} tokens. However, your messages resulted in "
            f"{n_prompt} tokens. Please reduce the length of the messages."
        )
    return (
        f"This model's maximum context length is {n_ctx} tokens. However, you requested "
        f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the completion). "
        "Please reduce the length of the messages or completion."
    )
