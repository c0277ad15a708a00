"""Prompt reuse for models whose state cannot be cut back: checkpoints of a sequence's llama.cpp state.

A hybrid model (Qwen3-Next: Gated DeltaNet layers beside attention layers) keeps a recurrent state that
llama.cpp cannot roll back to an earlier token, so a context that holds another prompt is of no use to
the next one. Instead, the engine snapshots the sequence's state (KV cache and recurrent state, through
llama_state_seq_get_data) at chosen positions into a bounded LRU cache in RAM, and a new prompt restores
the longest snapshot whose tokens start it and evaluates only the rest.

Exactness. llama.cpp's CPU kernels can round differently depending on how tokens are grouped into
micro-batches (a 1-token batch skips the GEMM path, for one), so a state is reproducible only if it was
computed with the same grouping. Prompts are therefore evaluated on a schedule that depends on their
tokens alone (`Schedule`): segments start at position 0 and at every message-start token, and within a
segment micro-batches start every n_ubatch tokens. Snapshots are taken only at such starts and restored
only where the new prompt's own schedule starts a micro-batch too, so the output after a restore equals
that of a fresh context, token for token, whatever the server evaluated before.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import llama_cpp
import numpy as np

log = logging.getLogger(__name__)

CacheKind = Literal["chat", "completion"]
# Guaranteed shares of the cache per kind: a kind may use free room beyond its share, but eviction only
# takes from a kind above its share, so a burst of autocompletion cannot evict the chat's history.
SHARES: dict[str, float] = {"chat": 0.75, "completion": 0.25}
# Tokens that open a chat message (ChatML, the Qwen family's format): evaluation segments start there.
MESSAGE_START_TEXTS = ("<|im_start|>",)
SEQ_ID = 0  # the engine runs one sequence

# ---- the evaluation schedule ----


@dataclass(frozen=True)
class Schedule:
    """Where a prompt's evaluation is cut; a function of its tokens only (see the module docstring)."""

    ubatch: int  # llama.cpp's n_ubatch: tokens per compute pass
    batch: int  # tokens per llama_decode call; a multiple of ubatch
    split_tokens: frozenset[int] = frozenset()

    @classmethod
    def for_context(cls, n_batch: int, n_ubatch: int, split_tokens: Iterable[int] = ()) -> Schedule:
        ubatch = max(1, min(n_ubatch, n_batch))
        return cls(ubatch, max(ubatch, n_batch - n_batch % ubatch), frozenset(split_tokens))

    def segments(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        starts = [0]
        if self.split_tokens and len(tokens) > 1:
            marks = np.isin(np.asarray(tokens[1:]), list(self.split_tokens))
            starts += (np.flatnonzero(marks) + 1).tolist()
        return list(pairwise([*starts, len(tokens)]))

    def points(self, tokens: Sequence[int]) -> list[int]:
        """Positions before len(tokens) where a micro-batch starts: where a state may be saved or restored.
        Those below n are the same for every prompt that starts with tokens[:n] and has no split token at n."""
        return [p for start, end in self.segments(tokens) for p in range(start, end, self.ubatch)]

    def chunks(self, tokens: Sequence[int], start: int, cuts: Iterable[int] = ()) -> list[tuple[int, int]]:
        """[a, b) pieces from `start` to the end, one llama_decode call each: cut at segment starts, every
        `batch` tokens within a segment, and at `cuts` (points where a snapshot is to be taken)."""
        bounds = set(cuts)
        for seg_start, seg_end in self.segments(tokens):
            bounds.update(range(seg_start, seg_end, self.batch))
        inner = sorted(b for b in bounds if start < b < len(tokens))
        return list(pairwise([start, *inner, len(tokens)]))


def message_start_tokens(llama: Any) -> frozenset[int]:
    """Ids of the tokens that open a chat message, where the vocabulary has them as single tokens."""
    found = set()
    for text in MESSAGE_START_TEXTS:
        ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if len(ids) == 1:
            found.add(ids[0])
    return frozenset(found)


def floor_point(points: Sequence[int], position: int) -> int:
    """The last of the sorted `points` at or before `position` (0 when none is)."""
    i = bisect.bisect_right(points, position)
    return points[i - 1] if i else 0


# ---- the cache ----


@dataclass(frozen=True)
class Checkpoint:
    kind: str
    tokens: tuple[int, ...]  # the state is that of a context holding exactly these tokens
    state: bytearray  # llama_state_seq_get_data output; never modified (a bytearray so ctypes can point into it)


@dataclass(frozen=True)
class PoolStats:
    entries: int
    bytes: int
    hits: int  # prompts that restored a checkpoint
    misses: int  # prompts that found none and started from the beginning
    reused_tokens: int  # prompt tokens restored instead of evaluated
    saves: int
    evictions: int


@dataclass(frozen=True)
class CacheStats:
    capacity: int
    pools: dict[str, PoolStats]


class PromptCache:
    """Checkpoints in RAM, LRU per kind, within `capacity` bytes of state. Thread-safe."""

    def __init__(self, capacity: int, shares: dict[str, float] | None = None) -> None:
        self.capacity = capacity
        self._shares = dict(shares or SHARES)
        self._pools: dict[str, OrderedDict[tuple[int, ...], Checkpoint]] = {k: OrderedDict() for k in self._shares}
        self._counts = {k: dict.fromkeys(("hits", "misses", "reused_tokens", "saves", "evictions"), 0)
                        for k in self._shares}
        self._lock = threading.Lock()

    @classmethod
    def create(cls, capacity: int) -> PromptCache | None:
        """The cache for `--cache-ram`; None when it is 0 (off)."""
        return cls(capacity) if capacity > 0 else None

    def quota(self, kind: str) -> int:
        return int(self.capacity * self._shares[kind])

    def _used(self, kind: str) -> int:
        return sum(len(c.state) for c in self._pools[kind].values())

    def find(self, tokens: Sequence[int], lengths: Iterable[int]) -> Checkpoint | None:
        """The longest checkpoint whose length is one of `lengths` and whose tokens start `tokens`."""
        allowed = set(lengths)
        with self._lock:
            found = None
            for pool in self._pools.values():
                for key, cp in pool.items():
                    n = len(key)
                    if n in allowed and (found is None or n > len(found.tokens)) and tuple(tokens[:n]) == key:
                        found = cp
            if found is not None:
                self._pools[found.kind].move_to_end(found.tokens)
            return found

    def touch(self, tokens: Sequence[int]) -> bool:
        """Mark the checkpoint of exactly `tokens` as used; False when there is none."""
        key = tuple(tokens)
        with self._lock:
            for pool in self._pools.values():
                if key in pool:
                    pool.move_to_end(key)
                    return True
        return False

    def record(self, kind: str, restored: int | None) -> None:
        """Count one prompt's lookup: `restored` tokens from a checkpoint, or None for a miss."""
        with self._lock:
            counts = self._counts[kind]
            if restored is None:
                counts["misses"] += 1
            else:
                counts["hits"] += 1
                counts["reused_tokens"] += restored

    def fits(self, kind: str, nbytes: int) -> bool:
        return 0 < nbytes <= self.quota(kind)

    def put(self, kind: str, tokens: Sequence[int], state: bytearray) -> bool:
        """Store a checkpoint, evicting least recently used ones; False when it is larger than the kind's share."""
        if not self.fits(kind, len(state)):
            return False
        key = tuple(tokens)
        with self._lock:
            pool = self._pools[kind]
            if key in pool:
                del pool[key]
            self._make_room(kind, len(state))
            pool[key] = Checkpoint(kind, key, state)
            self._counts[kind]["saves"] += 1
        return True

    def _make_room(self, kind: str, nbytes: int) -> None:
        used = {k: self._used(k) for k in self._pools}
        while sum(used.values()) + nbytes > self.capacity:
            # the kind furthest above its share gives back first (the new entry counted; on a tie, another kind)
            over = {k: used[k] + (nbytes if k == kind else 0) - self.quota(k) for k in self._pools}
            victim = max((k for k in self._pools if self._pools[k] and over[k] > 0),
                         key=lambda k: (over[k], k != kind))
            _, evicted = self._pools[victim].popitem(last=False)
            used[victim] -= len(evicted.state)
            self._counts[victim]["evictions"] += 1

    def stats(self) -> CacheStats:
        with self._lock:
            pools = {k: PoolStats(entries=len(pool), bytes=self._used(k), **self._counts[k])
                     for k, pool in self._pools.items()}
        return CacheStats(self.capacity, pools)


# ---- llama.cpp sequence state ----


class StateError(RuntimeError):
    """llama.cpp could not copy a sequence state out or back."""


def state_size(ctx: Any) -> int:
    return int(llama_cpp.llama_state_seq_get_size(ctx, SEQ_ID))


def read_state(ctx: Any, size: int) -> bytearray:
    """The sequence's state (KV cells and recurrent state; no logits), `size` from state_size()."""
    data = bytearray(size)
    written = llama_cpp.llama_state_seq_get_data(ctx, (ctypes.c_uint8 * size).from_buffer(data), size, SEQ_ID)
    if written == 0:
        raise StateError("llama_state_seq_get_data failed")
    del data[written:]
    return data


def write_state(ctx: Any, data: bytearray) -> None:
    """Replace the sequence's state with `data` (llama.cpp clears the sequence first)."""
    buffer = (ctypes.c_uint8 * len(data)).from_buffer(data)
    if llama_cpp.llama_state_seq_set_data(ctx, buffer, len(data), SEQ_ID) == 0:
        raise StateError("llama_state_seq_set_data failed")


def common_prefix(held: np.ndarray, tokens: Sequence[int]) -> int:
    n = min(len(held), len(tokens))
    differ = np.flatnonzero(held[:n] != np.asarray(tokens[:n], dtype=held.dtype))
    return int(differ[0]) if len(differ) else n


def is_recurrent(llama: Any) -> bool:
    """Whether the model keeps a recurrent state (recurrent or hybrid), which llama.cpp cannot trim."""
    return bool(llama_cpp.llama_model_is_recurrent(llama.model) or llama_cpp.llama_model_is_hybrid(llama.model))


# ---- prompt evaluation ----


class PromptEvaluator:
    """Brings a llama_cpp.Llama to hold a prompt: the one place prompts are evaluated.

    With a cache (recurrent and hybrid models), from the longest checkpoint or canonical live state that
    starts the prompt, saving checkpoints on the way. Without one, as llama.cpp allows: reuse the prefix
    the context holds (trimming it where the model can), else start over.
    """

    def __init__(self, llama: Any, cache: PromptCache | None) -> None:
        self._llama = llama
        self._cache = cache
        self._schedule = Schedule.for_context(
            llama.n_batch, llama_cpp.llama_n_ubatch(llama.ctx), message_start_tokens(llama))
        self._canonical_held = -1  # n_tokens right after a scheduled evaluation (its state is reproducible)

    @classmethod
    def for_model(cls, llama: Any, cache: PromptCache | None) -> PromptEvaluator:
        if cache is not None and not is_recurrent(llama):
            log.info("prompt cache off: this model's KV cache can be trimmed to a shared prefix instead")
            cache = None
        elif cache is not None:
            log.info("prompt cache on: up to %.2f GiB of state checkpoints", cache.capacity / (1 << 30))
        return cls(llama, cache)

    @property
    def cache(self) -> PromptCache | None:
        return self._cache

    def evaluate(self, tokens: Sequence[int], stop: threading.Event, kind: str = "completion",
                 checkpoints: Sequence[int] = ()) -> int:
        """Evaluate `tokens` (at least the last one, whose logits come next); returns how many were
        evaluated. Checks `stop` between llama_decode calls, so a cancelled request lets go early."""
        held = self._llama.n_tokens
        common = common_prefix(self._llama.input_ids[:held], tokens)
        if self._cache is None:
            return self._run(tokens, self._reuse_live(tokens, common, held), stop, kind, ())
        cache = self._cache
        points = self._schedule.points(tokens)
        start = self._restore(cache, tokens, points, common, held, kind)
        wanted = {floor_point(points, len(tokens) - 1)}
        wanted.update(floor_point(points, c) for c in checkpoints if 0 < c < len(tokens))
        cuts = {c for c in wanted if c > start and not cache.touch(tokens[:c])}
        evaluated = self._run(tokens, start, stop, kind, cuts)
        self._canonical_held = self._llama.n_tokens
        return evaluated

    def _reuse_live(self, tokens: Sequence[int], common: int, held: int) -> int:
        common = min(common, len(tokens) - 1)  # the last prompt token is always evaluated: its logits
        if common < held:
            if common > 0 and self._llama._ctx.kv_cache_seq_rm(SEQ_ID, common, -1):
                self._llama.n_tokens = common
            else:
                self._llama.reset()
                common = 0
        return common

    def _restore(self, cache: PromptCache, tokens: Sequence[int], points: list[int], common: int, held: int,
                 kind: str) -> int:
        """Start from the live state, a checkpoint or nothing; returns the position evaluation resumes at.
        The live state serves only where it is itself reproducible: right after a scheduled evaluation
        that stopped at one of this prompt's points (a cancelled request, say)."""
        usable = [p for p in points if p > 0]
        live = held if held == self._canonical_held and common == held and held in usable else 0
        found = cache.find(tokens, (p for p in usable if p > live))
        if found is None:
            if live == 0:
                cache.record(kind, None)
                self._llama.reset()
            return live
        try:
            write_state(self._llama.ctx, found.state)
        except StateError:
            log.exception("restoring a prompt checkpoint failed; evaluating the prompt from the start")
            self._llama.reset()
            cache.record(kind, None)
            return 0
        n = len(found.tokens)
        self._llama.input_ids[:n] = found.tokens
        self._llama.n_tokens = n
        cache.record(kind, n)
        return n

    def _run(self, tokens: Sequence[int], start: int, stop: threading.Event, kind: str, cuts: set[int]) -> int:
        for a, b in self._schedule.chunks(tokens, start, cuts):
            if stop.is_set():
                return a - start
            self._llama.eval(tokens[a:b])  # Llama.eval records the tokens it holds
            if b in cuts and self._cache is not None:
                self._save(self._cache, kind, tokens[:b])
        return len(tokens) - start

    def _save(self, cache: PromptCache, kind: str, tokens: Sequence[int]) -> None:
        size = state_size(self._llama.ctx)
        if not cache.fits(kind, size):
            log.debug("a %d-byte checkpoint does not fit the %s share of the prompt cache", size, kind)
            return
        try:
            cache.put(kind, tokens, read_state(self._llama.ctx, size))
        except StateError:
            log.exception("saving a prompt checkpoint failed")


def last_turn_start(render: Callable[[list[dict[str, Any]]], str], messages: list[dict[str, Any]], prompt: str,
                    tokens: Sequence[int], tokenize: Callable[[str], list[int]]) -> tuple[int, ...]:
    """The token position in `tokens` (the prompt's) where the trailing user/tool messages begin: the point
    a next turn, or a retry with an edited last message, branches from. () where the earlier messages
    (rendered by `render`, without a generation prompt) are not a prefix of `prompt`, or the rest of it
    does not tokenize alone as it does within the prompt. Only the rest is tokenized again: it is short."""
    i = len(messages)
    while i > 0 and messages[i - 1].get("role") in ("user", "tool"):
        i -= 1
    if i == 0 or i == len(messages):
        return ()
    try:
        head = render(messages[:i])
    except ValueError:  # a template that refuses a conversation cut there (TemplateError is a ValueError)
        return ()
    if not head or not prompt.startswith(head):
        return ()
    rest = tokenize(prompt[len(head):])
    at = len(tokens) - len(rest)
    return (at,) if 0 < at < len(tokens) and list(tokens[at:]) == rest else ()
