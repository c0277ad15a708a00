"""A llama.cpp sampler chain built from one request's sampling parameters.

The chain order follows llama.cpp's common sampler (common/sampling.cpp):
logit bias -> penalties -> grammar -> top-k -> top-p -> min-p -> temperature -> draw.
Temperature 0 means greedy decoding, as in OpenAI's API.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import llama_cpp

# Below this, temperature decodes greedily: dividing float32 logits by a smaller number overflows to inf,
# and llama.cpp's draw then picks an arbitrary token.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    repeat_last_n: int
    seed: int  # uint32; 0xFFFFFFFF (LLAMA_DEFAULT_SEED) asks llama.cpp for a random seed
    logit_bias: tuple[tuple[int, float], ...] = ()


class GrammarError(ValueError):
    """llama.cpp refused to parse a GBNF grammar."""


def _init_grammar(vocab: Any, gbnf: str) -> Any:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        raise GrammarError("the grammar could not be parsed")
    return sampler


def check_grammar(vocab: Any, gbnf: str) -> None:
    """Raise GrammarError unless llama.cpp accepts the grammar (parses it, then frees it)."""
    llama_cpp.llama_sampler_free(_init_grammar(vocab, gbnf))


class SamplerChain:
    """Owns one llama_sampler chain; close() frees it and every sampler added to it."""

    def __init__(self, vocab: Any, n_vocab: int, params: SamplingParams, grammar: str | None) -> None:
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        try:
            self._build(vocab, n_vocab, params, grammar)
        except Exception:
            self.close()
            raise

    def _add(self, sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def _build(self, vocab: Any, n_vocab: int, p: SamplingParams, grammar: str | None) -> None:
        if p.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(p.logit_bias))()
            for slot, (token, bias) in zip(biases, p.logit_bias, strict=True):
                slot.token, slot.bias = token, bias
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), biases))
        if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    p.repeat_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
                )
            )
        if grammar is not None:
            self._add(_init_grammar(vocab, grammar))
        if p.temperature < MIN_TEMPERATURE:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(p.temperature))
        self._add(llama_cpp.llama_sampler_init_dist(ctypes.c_uint32(p.seed).value))

    def sample(self, ctx: Any) -> int:
        """Sample from the last evaluated position's logits; llama.cpp also accepts the token."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, -1))

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __enter__(self) -> SamplerChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
