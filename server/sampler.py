"""A llama.cpp sampler chain built from one request's sampling parameters.

The chain order follows llama.cpp's common sampler (common/sampling.cpp):
logit bias -> penalties -> grammar -> top-k -> top-p -> min-p -> temperature -> draw.
Temperature 0 means greedy decoding, as in OpenAI's API.

llama_sampler_sample hands the chain the whole vocabulary every token (151,936 entries for
Qwen3-Coder), and the penalty sampler then looks each one up in its table of recent tokens: about a
millisecond per token, as much as a decode step of a fast GPU. Where the chain ends in top-k (or
greedy, k = 1) and has no grammar, `sample` hands it a short list instead that provably yields the same
token: the k best logits among tokens that neither a bias nor a penalty touches, plus every token that
one does. Only biased and penalized tokens change their logits before top-k, so any other token that
makes the k best afterwards was among the k best untouched tokens before.
"""

from __future__ import annotations

import ctypes
from collections import deque
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

# Below this, temperature decodes greedily: dividing float32 logits by a smaller number overflows to inf,
# and llama.cpp's draw then picks an arbitrary token.
MIN_TEMPERATURE = 1e-4
# Above this top_k, the short list saves little: the whole vocabulary goes to llama.cpp.
MAX_SHORTLIST_K = 256
# Below this vocabulary size the whole vocabulary is as cheap (`python bench/sampler.py --vocab N`, 2-core
# x86-64: at 4,096 tokens the short list is 1.2-2.1x slower, at 16,384 mixed, at 65,536 2.5-9x faster).
MIN_SHORTLIST_VOCAB = 32768
BLOCK = 128  # top-k search: values per group (see top_k_ids)
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


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

    def __init__(self, vocab: Any, n_vocab: int, params: SamplingParams, grammar: str | None,
                 *, shortlist: bool = True) -> None:
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._n_vocab = n_vocab
        self._logits_type = ctypes.c_float * n_vocab
        greedy = params.temperature < MIN_TEMPERATURE
        self._k = 1 if greedy else params.top_k
        penalized = params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        # The penalty sampler's window: the last repeat_last_n accepted tokens (-1: the whole context).
        window = params.repeat_last_n if params.repeat_last_n >= 0 else None
        self._recent: deque[int] | None = deque(maxlen=window) if penalized and window != 0 else None
        self._biased = frozenset(t for t, _ in params.logit_bias if 0 <= t < n_vocab)
        self._shortlist = (shortlist and grammar is None and 0 < self._k <= MAX_SHORTLIST_K
                           and n_vocab >= MIN_SHORTLIST_VOCAB)
        # Plain greedy decoding: llama.cpp's greedy sampler picks the first of the largest logits, which
        # is numpy's argmax; nothing else in the chain could change the choice.
        self._argmax = shortlist and greedy and grammar is None and self._recent is None and not self._biased
        # the candidate rows handed to llama.cpp, reused from token to token
        self._data: Any = None
        self._rows = np.empty(0, dtype=TOKEN_DATA)
        self._cur = llama_cpp.llama_token_data_array()
        self._cur_ref = ctypes.byref(self._cur)
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
        """Sample from the last evaluated position's logits; the chain also accepts the token."""
        if not (self._shortlist or self._argmax):
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, -1))
        pointer = llama_cpp.llama_get_logits_ith(ctx, -1)
        if not pointer:
            raise RuntimeError("no logits to sample from")
        address = ctypes.cast(pointer, ctypes.c_void_p).value
        logits = np.frombuffer(self._logits_type.from_address(address), dtype=np.float32)
        if self._argmax:
            return int(np.argmax(logits))  # the greedy sampler's accept() keeps no state
        ids = self._candidates(logits)
        n = len(ids)
        if n > len(self._rows):  # grows at most a few times: k plus the touched tokens
            self._data = (llama_cpp.llama_token_data * (2 * n))()
            self._rows = np.frombuffer(self._data, dtype=TOKEN_DATA)
        rows = self._rows[:n]
        rows["id"] = ids
        rows["logit"] = logits[ids]
        rows["p"] = 0.0
        cur = self._cur
        cur.data, cur.size, cur.selected, cur.sorted = self._data, n, -1, False
        llama_cpp.llama_sampler_apply(self._chain, self._cur_ref)
        if not 0 <= cur.selected < n:
            raise RuntimeError("the sampler chain selected no token")
        token = int(cur.data[cur.selected].id)  # a sampler may point `data` at rows of its own
        self.accept(token)
        return token

    def accept(self, token: int) -> None:
        """Record `token` as generated (the penalty window, a grammar's state) without sampling it."""
        llama_cpp.llama_sampler_accept(self._chain, token)
        if self._recent is not None:
            self._recent.append(token)

    def _candidates(self, logits: np.ndarray) -> np.ndarray:
        """Token ids, ascending (llama.cpp's greedy sampler keeps the first of equal logits): the k best
        untouched logits and every biased or penalized token."""
        touched = self._biased.union(self._recent) if self._recent else self._biased
        if not touched:
            return np.sort(top_k_ids(logits, self._k))
        # The touched logits are masked in llama.cpp's own buffer for the search and put back at once:
        # cheaper than a masked copy of the whole vocabulary's logits.
        ids = np.fromiter(touched, dtype=np.int64, count=len(touched))
        saved = logits[ids]
        logits[ids] = -np.inf
        try:
            best = top_k_ids(logits, self._k)
        finally:
            logits[ids] = saved
        return np.unique(np.concatenate([best, ids]))

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __enter__(self) -> SamplerChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def top_k_ids(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, in any order; ties at the k-th value are broken arbitrarily,
    as llama.cpp's top-k breaks them. Linear in len(values) with a small constant: the values are cut
    into groups (strided, so that numpy's maximum runs over contiguous rows), and the k groups with
    the largest maxima hold the k largest values."""
    n = len(values)
    k = min(k, n)
    if k == 1:
        return np.array([int(np.argmax(values))])
    full = n - n % BLOCK
    groups = full // BLOCK
    if groups < k * 4:  # too few groups for the search to pay
        return np.argpartition(values, n - k)[n - k:]
    maxima = values[:full].reshape(BLOCK, groups).max(axis=0)  # group g: values[g::groups][:BLOCK]
    chosen = np.argpartition(maxima, groups - k)[groups - k:]
    pool = (np.arange(BLOCK)[:, None] * groups + chosen[None, :]).ravel()
    if full < n:
        pool = np.concatenate([pool, np.arange(full, n)])
    best = np.argpartition(values[pool], len(pool) - k)[len(pool) - k:]
    return pool[best]
