"""The sampler's short candidate list picks exactly the tokens the whole vocabulary would."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from server.sampler import SamplerChain, SamplingParams, top_k_ids

BASE = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, presence_penalty=0.0,
            frequency_penalty=0.0, repeat_last_n=64, seed=1)


@pytest.mark.parametrize("n, k", [(151_936, 1), (151_936, 20), (151_936, 256), (4096, 20), (300, 7), (129, 3)])
def test_top_k_ids_finds_the_k_largest(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    values = rng.standard_normal(n).astype(np.float32)
    values[rng.integers(0, n, 10)] = -np.inf
    got = top_k_ids(values, k)
    assert len(got) == len(set(got.tolist())) == k
    assert sorted(values[got].tolist()) == sorted(values.tolist())[-k:]


@pytest.fixture(scope="module")
def model(bigvocab_gguf: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(bigvocab_gguf), n_ctx=256, n_threads=2, verbose=False)


def generate(llama: llama_cpp.Llama, params: SamplingParams, shortlist: bool, n: int = 48) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    llama.reset()
    llama.eval(list(range(300, 316)))
    tokens = []
    with SamplerChain(vocab, llama.n_vocab(), params, None, shortlist=shortlist) as chain:
        assert chain._shortlist is shortlist
        for _ in range(n):
            tokens.append(chain.sample(llama.ctx))
            llama.eval([tokens[-1]])
    return tokens


@pytest.mark.parametrize("fields", [
    dict(),
    dict(repeat_penalty=1.3),
    dict(repeat_penalty=1.1, frequency_penalty=0.4, logit_bias=((5, 3.0), (301, -100.0), (20000, 1.5))),
    dict(temperature=0.7, top_k=20, top_p=0.8, repeat_penalty=1.05, seed=7),
    dict(temperature=1.0, top_k=40, min_p=0.05, presence_penalty=0.5, repeat_last_n=8, seed=3),
], ids=["greedy", "greedy-penalty", "greedy-bias-frequency", "qwen-defaults", "topk40-minp-presence"])
def test_shortlist_samples_what_the_whole_vocabulary_samples(model: llama_cpp.Llama, fields: dict) -> None:
    params = SamplingParams(**(BASE | fields))
    whole = generate(model, params, shortlist=False)
    assert len(set(whole)) > 3  # the case is not trivially one repeated token
    assert generate(model, params, shortlist=True) == whole


def test_no_shortlist_with_a_grammar_without_top_k_or_for_a_small_vocabulary(model: llama_cpp.Llama) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    sampled = SamplingParams(**(BASE | dict(temperature=0.8, top_k=0)))
    with SamplerChain(vocab, model.n_vocab(), sampled, None) as chain:
        assert not chain._shortlist
    with SamplerChain(vocab, model.n_vocab(), SamplingParams(**BASE), 'root ::= "a"') as chain:
        assert not chain._shortlist
    with SamplerChain(vocab, 4096, SamplingParams(**BASE), None) as chain:  # a small vocabulary is cheap whole
        assert not chain._shortlist


def test_plain_greedy_takes_the_argmax_and_nothing_else_does(model: llama_cpp.Llama) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    for fields, argmax in ((dict(), True), (dict(repeat_penalty=1.1), False), (dict(logit_bias=((5, 1.0),)), False),
                           (dict(temperature=0.7, top_k=20), False)):
        with SamplerChain(vocab, model.n_vocab(), SamplingParams(**(BASE | fields)), None) as chain:
            assert chain._argmax is argmax, fields
    with SamplerChain(vocab, model.n_vocab(), SamplingParams(**BASE), 'root ::= "a"') as chain:
        assert not chain._argmax


def test_sampling_leaves_the_context_logits_as_they_were(model: llama_cpp.Llama) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    model.reset()
    model.eval(list(range(300, 316)))
    n = model.n_vocab()
    before = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(n,)).copy()
    params = SamplingParams(**(BASE | dict(repeat_penalty=1.3, logit_bias=((5, 3.0),))))
    with SamplerChain(vocab, n, params, None) as chain:
        for token in range(300, 316):  # the prompt's tokens fill the penalty window: they get masked
            chain.accept(token)
        chain.sample(model.ctx)
    after = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(n,))
    assert np.array_equal(before, after)
