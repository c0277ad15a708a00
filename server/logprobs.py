"""Log-probabilities of a sampled token (and the most likely alternatives) from llama.cpp's logits.

Like OpenAI's, they are taken from the model's distribution before any sampling transform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np

from server.events import TokenLogprob, TopLogprob


def _record(token: int, logprob: float, piece: Callable[[int], bytes]) -> TopLogprob:
    raw = piece(token)
    return TopLogprob(raw.decode("utf-8", errors="replace"), tuple(raw), float(logprob))


def token_logprob(ctx: Any, n_vocab: int, token: int, top_n: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """Logprob of `token` at the last evaluated position, with the `top_n` most likely tokens."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    x = logits.astype(np.float64)
    peak = x.max()
    logp = x - (peak + np.log(np.exp(x - peak).sum()))
    top: tuple[TopLogprob, ...] = ()
    if top_n > 0:
        best = np.argpartition(-logp, top_n - 1)[:top_n]
        best = best[np.argsort(-logp[best], kind="stable")]
        top = tuple(_record(int(t), logp[t], piece) for t in best)
    chosen = _record(token, logp[token], piece)
    return TokenLogprob(chosen.token, chosen.bytes, chosen.logprob, top)
