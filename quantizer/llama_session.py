"""One model and one context through llama-cpp-python's C API, and the text cut into chunks as
llama-perplexity cuts it: what `coder-quant eval` and `imatrix` run the model with."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np

from quantizer.errors import EvalError

log = logging.getLogger(__name__)

# llama-perplexity's and llama-imatrix's micro-batch (n_ubatch, common/common.h): a longer chunk decodes in
# several passes, so its compute buffer does not grow with ctx; ctx <= 512 decodes in one pass, as before.
MAX_UBATCH = 512
# One chunk's scored logits are held in memory: ctx/2 x n_vocab float32, 10 GB at 32768 with 151,936 tokens.
MAX_CTX = 32768


class LlamaSession:
    """One model and one single-sequence context of `ctx` tokens; chunks decode from an empty memory.

    The context is created by the first `decode_chunk`, after `chunks` has checked the text and ctx: a
    context llama.cpp cannot allocate aborts the process (GGML_ASSERT) instead of failing. With
    `vocab_only`, only the vocabulary and metadata load (to tokenize and check, never to decode).
    `eval_callback` (a ggml_backend_sched_eval_callback) sees every graph node, for activation statistics.
    """

    def __init__(
        self, path: Path, ctx: int, eval_callback: object | None = None, threads: int | None = None,
        vocab_only: bool = False,
    ) -> None:  # fmt: skip
        self.path, self.ctx, self._callback, self.threads = Path(path), ctx, eval_callback, threads
        self.vocab_only = vocab_only
        self._model = self._ctx = None

    def __enter__(self) -> LlamaSession:
        import llama_cpp

        self._llama = llama_cpp
        chatty = logging.getLogger("llama-cpp-python")  # its default callback prints everything
        if chatty.level == logging.NOTSET:
            chatty.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        # Plain weight buffers: the repacked/AMX layouts only add speed, and a host that advertises AMX
        # without granting it dies with SIGILL on IQ4_XS and K-quant tensors (seen on VMs).
        model_params.use_extra_bufts = False
        model_params.vocab_only = self.vocab_only
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise EvalError(f"llama.cpp cannot load {self.path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.n_ctx_train = self._trained_context()
        return self

    def _trained_context(self) -> int:
        """`<arch>.context_length`; llama_model_n_ctx_train is 0 when only the vocabulary was loaded."""
        lib = self._llama
        n = int(lib.llama_model_n_ctx_train(self._model))
        if n > 0:
            return n
        buf = ctypes.create_string_buffer(256)
        if lib.llama_model_meta_val_str(self._model, b"general.architecture", buf, len(buf)) < 0:
            return 0
        key = buf.value + b".context_length"
        if lib.llama_model_meta_val_str(self._model, key, buf, len(buf)) < 0:
            return 0
        return int(buf.value) if buf.value.isdigit() else 0

    def _open_context(self) -> None:
        check_ctx(self.ctx, self.n_ctx_train, self.path)
        if self.vocab_only:
            raise EvalError(f"{self.path} was loaded without its weights; it cannot decode")
        lib = self._llama
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = self.ctx
        params.n_ubatch = min(self.ctx, MAX_UBATCH)
        params.n_seq_max = 1
        if self.threads:  # else llama.cpp's default (GGML_DEFAULT_N_THREADS)
            params.n_threads = params.n_threads_batch = self.threads
        if self._callback is not None:
            params.cb_eval = self._callback
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise EvalError(f"llama.cpp cannot create a context of {self.ctx} tokens for {self.path}")
        self._batch = lib.llama_batch_init(self.ctx, 0, 1)
        for k in range(self.ctx):
            self._batch.n_seq_id[k] = 1
            self._batch.seq_id[k][0] = 0

    def __exit__(self, *exc: object) -> None:
        if self._ctx:
            self._llama.llama_batch_free(self._batch)
            self._llama.llama_free(self._ctx)
        if self._model:
            self._llama.llama_model_free(self._model)
        self._model = self._ctx = None

    def chunks(self, text: str, max_chunks: int | None) -> np.ndarray:
        """The text's chunks (`chunk_tokens`), checked against ctx and this model before any context."""
        chunks = chunk_tokens(self.tokenize(text), self.ctx, max_chunks)
        check_ctx(self.ctx, self.n_ctx_train, self.path)
        return chunks

    def tokenize(self, text: str) -> np.ndarray:
        """common_tokenize(ctx, text, add_special=true, parse_special=false), as the tools call it."""
        data = text.encode("utf-8")
        buf = (self._llama.llama_token * (len(data) + 2))()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, len(buf), True, False)
        if n < 0:
            raise EvalError(f"tokenization failed ({n})")
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def decode_chunk(self, chunk: np.ndarray, first: int, want_logits: bool = True) -> np.ndarray | None:
        """Logits (float32, one row per position >= first) of one chunk evaluated from scratch."""
        lib, n = self._llama, len(chunk)
        if n > self.ctx:
            raise EvalError(f"chunk of {n} tokens exceeds the context of {self.ctx}")
        if not self._ctx:
            self._open_context()
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        tokens = np.ctypeslib.as_array(self._batch.token, shape=(self.ctx,))
        tokens[:n] = chunk
        if self.add_bos:  # llama-perplexity overwrites a chunk's first token with BOS
            tokens[0] = lib.llama_vocab_bos(self._vocab)
        np.ctypeslib.as_array(self._batch.pos, shape=(self.ctx,))[:n] = np.arange(n)
        np.ctypeslib.as_array(self._batch.logits, shape=(self.ctx,))[:n] = np.arange(n) >= first
        self._batch.n_tokens = n
        rc = lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise EvalError(f"llama_decode failed on {self.path} ({rc})")
        if not want_logits:
            return None
        rows = n - first
        out = lib.llama_get_logits_ith(self._ctx, first)
        return np.ctypeslib.as_array(out, shape=(rows * self.n_vocab,)).reshape(rows, self.n_vocab).copy()


# --- chunking, exactly as llama-perplexity cuts the text -------------------------------------


def chunk_tokens(tokens: np.ndarray, ctx: int, max_chunks: int | None) -> np.ndarray:
    """(n_chunk, ctx) array of the chunks llama-perplexity evaluates; too little text is an error."""
    if ctx < 4:
        raise EvalError(f"--ctx must be at least 4, got {ctx}")
    if tokens.size < 2 * ctx:
        raise EvalError(f"the text has {tokens.size} tokens; a context of {ctx} needs at least {2 * ctx}")
    n_chunk = tokens.size // ctx
    if max_chunks is not None:
        if max_chunks < 1:
            raise EvalError(f"--chunks must be positive, got {max_chunks}")
        n_chunk = min(n_chunk, max_chunks)
    return tokens[: n_chunk * ctx].reshape(n_chunk, ctx).copy()


def check_ctx(ctx: int, n_ctx_train: int, path: Path) -> None:
    """Refuse a ctx beyond the model's trained context (where its GGUF records one) or beyond MAX_CTX."""
    if n_ctx_train > 0 and ctx > n_ctx_train:
        raise EvalError(f"--ctx {ctx} exceeds the trained context of {path} ({n_ctx_train} tokens)")
    if ctx > MAX_CTX:
        raise EvalError(f"--ctx {ctx} is above the limit of {MAX_CTX} tokens")
