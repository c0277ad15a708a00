"""Quality of a quantized GGUF against its base: KL divergence, perplexity, top-1 agreement.

The measurement is llama-perplexity's `--kl-divergence` (tools/perplexity/perplexity.cpp in
llama.cpp), step for step, so the figures can be compared with llama.cpp's:
- the text is tokenized once with `add_special` (a BOS only where the vocabulary asks for one;
  Qwen's does not) and cut into `len(tokens) // ctx` chunks of `ctx` tokens; the tail is dropped;
- each chunk runs from an empty memory; where the vocabulary adds BOS, it *replaces* the chunk's
  first token (the chunk length stays `ctx`);
- only the second half is scored: logits at positions ctx/2 .. ctx-2 predict the next token,
  `ctx - 1 - ctx/2` values per chunk;
- the base distribution is kept as llama.cpp keeps it (see `encode_base`), and KLD, top-1 and the
  statistics use the same arithmetic (float32 terms, float64 sums, the same percentile rule).

Base-logits cache (`--base-logits`), one file per (base model, ctx, text):
    magic b"CQBASELP", u32 header length, JSON header (format, base_sha256, text_sha256, ctx,
    n_vocab, n_chunk, add_bos, codec), i32 tokens[n_chunk * ctx], then per chunk a u64 byte count
    and a zlib stream of: nll f32[n], scale f32[n], min_log_prob f32[n], top i32[n],
    codes u16[n * n_vocab] (n = ctx - 1 - ctx/2). That is llama.cpp's own uint16 log-probability code
    (2 bytes per vocab entry and position, a 16-nat window under the top token) plus, per position,
    the exact base NLL and top token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from quantizer.errors import EvalError
from quantizer.llama_session import LlamaSession
from quantizer.writer import new_partial, sync_complete

log = logging.getLogger(__name__)

CACHE_MAGIC = b"CQBASELP"
CACHE_FORMAT = 2
CODEC = "llama.cpp-uint16-logprob"
# llama.cpp keeps base log-probs within 16 nats of the top logit and sums KLD over p_base > e^-16.
LOGIT_WINDOW = np.float32(16.0)
F32 = np.float32


@dataclass(frozen=True)
class BaseChunk:
    """The base model's distributions over one chunk's scored positions, as llama.cpp stores them."""

    nll: np.ndarray  # f32 (n,) exact negative log-likelihood of the next token
    scale: np.ndarray  # f32 (n,)
    min_log_prob: np.ndarray  # f32 (n,)
    top: np.ndarray  # i32 (n,) the base model's most likely token (first maximum of its logits)
    codes: np.ndarray  # u16 (n, n_vocab)


@dataclass(frozen=True)
class EvalResult:
    """llama-perplexity's KLD summary; top-1 in percent, uncertainties are one standard error."""

    tokens: int  # scored positions (chunks x (ctx - 1 - ctx/2))
    chunks: int
    ctx: int
    kld_mean: float
    kld_mean_unc: float
    kld_median: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    top1: float
    top1_unc: float
    ppl_base: float
    ppl_base_unc: float
    ppl_quant: float
    ppl_quant_unc: float
    ppl_ratio: float
    ppl_ratio_unc: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def encode_base(logits: np.ndarray, targets: np.ndarray) -> BaseChunk:
    """llama.cpp's `log_softmax(..., uint16_t * log_prob, tok)`: window, scale, round-half-even codes."""
    logits = np.asarray(logits, dtype=F32)
    max_logit = logits.max(axis=1)
    min_logit = np.maximum(logits.min(axis=1), max_logit - LOGIT_WINDOW)
    sum_exp = np.exp(logits - max_logit[:, None]).sum(axis=1, dtype=np.float64)
    log_sum_exp = np.log(sum_exp).astype(F32)
    min_log_prob = min_logit - max_logit - log_sum_exp
    scale = (max_logit - min_logit) / F32(65535.0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(scale > 0, F32(1.0) / scale, F32(0.0)).astype(F32)
    scaled = inv_scale[:, None] * (logits - min_logit[:, None])
    codes = np.where(logits > min_logit[:, None], np.rint(scaled), F32(0.0)).astype(np.uint16)
    picked = logits[np.arange(len(targets)), targets]
    nll = max_logit + log_sum_exp - picked
    top = logits.argmax(axis=1).astype(np.int32)
    return BaseChunk(nll.astype(F32), scale.astype(F32), min_log_prob.astype(F32), top, codes)


@dataclass(frozen=True)
class ChunkScores:
    kld: np.ndarray  # f64 (n,)
    nll: np.ndarray  # f32 (n,) quantized model
    nll_base: np.ndarray  # f32 (n,)
    same_top: np.ndarray  # bool (n,)


def score_chunk(logits: np.ndarray, base: BaseChunk, targets: np.ndarray) -> ChunkScores:
    """llama.cpp's `log_softmax(..., base_log_prob, tok, kld)` for every scored position at once."""
    logits = np.asarray(logits, dtype=F32)
    rows = np.arange(len(targets))
    imax = logits.argmax(axis=1)  # first maximum, as the C loop's strict '>'
    max_logit = logits[rows, imax]
    sum_exp = np.exp(logits - max_logit[:, None]).sum(axis=1, dtype=np.float64)
    log_norm = max_logit + np.log(sum_exp).astype(F32)
    nll = log_norm - logits[rows, targets]
    p_log_base = base.scale[:, None] * base.codes.astype(F32) + base.min_log_prob[:, None]
    terms = np.exp(p_log_base) * (p_log_base - logits + log_norm[:, None])
    kld = np.where(p_log_base > -LOGIT_WINDOW, terms, F32(0.0)).sum(axis=1, dtype=np.float64)
    # llama.cpp takes the base's top token from the uint16 codes; the exact one only differs on near-ties
    same_top = base.top == imax
    return ChunkScores(kld, nll.astype(F32), base.nll, same_top)


def _mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    # perplexity.cpp's mean_and_uncertainty: sums in double, no error below 11 values
    count = values.size
    mean = float(values.sum(dtype=np.float64) / count)
    var = float((values.astype(np.float64) ** 2).sum() / count - mean * mean)
    return mean, (var / (count - 1)) ** 0.5 if var > 0 and count > 10 else 0.0


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    # perplexity.cpp's percentile: linear interpolation computed in float32
    n = sorted_values.size
    p = F32(fraction) * F32(n - 1)
    ip = int(p)
    p = F32(p - F32(ip))
    return float((F32(1) - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, n - 1)])


def summarize(scores: list[ChunkScores], ctx: int) -> EvalResult:
    """The closing statistics of llama-perplexity's KLD run."""
    kld = np.concatenate([s.kld for s in scores])
    nll = np.concatenate([s.nll for s in scores]).astype(np.float64)
    nll_base = np.concatenate([s.nll_base for s in scores]).astype(np.float64)
    same = np.concatenate([s.same_top for s in scores])
    count = kld.size
    kld_mean, kld_unc = _mean_and_uncertainty(kld)
    log_ppl, log_ppl_unc = _mean_and_uncertainty(nll)
    log_base, log_base_unc = _mean_and_uncertainty(nll_base)
    cov = (float((nll * nll_base).sum() / count) - log_ppl * log_base) / (count - 1) if count >= 10 else 0.0
    ratio_unc = max(log_ppl_unc**2 + log_base_unc**2 - 2.0 * cov, 0.0) ** 0.5
    sorted_kld = np.sort(kld.astype(F32))
    n = sorted_kld.size
    median = F32(0.5) * (sorted_kld[n // 2] + sorted_kld[n // 2 - 1]) if n % 2 == 0 else sorted_kld[n // 2]
    top = float(same.sum()) / count
    return EvalResult(
        tokens=count,
        chunks=len(scores),
        ctx=ctx,
        kld_mean=kld_mean,
        kld_mean_unc=kld_unc,
        kld_median=float(median),
        kld_p99=_percentile(sorted_kld, 0.99),
        kld_p999=_percentile(sorted_kld, 0.999),
        kld_max=float(sorted_kld[-1]),
        top1=100.0 * top,
        top1_unc=100.0 * (top * (1.0 - top) / (count - 1)) ** 0.5 if count > 1 else 0.0,
        ppl_base=float(np.exp(log_base)),
        ppl_base_unc=float(np.exp(log_base) * log_base_unc),
        ppl_quant=float(np.exp(log_ppl)),
        ppl_quant_unc=float(np.exp(log_ppl) * log_ppl_unc),
        ppl_ratio=float(np.exp(log_ppl - log_base)),
        ppl_ratio_unc=float(np.exp(log_ppl - log_base) * ratio_unc),
    )


# --- llama.cpp through llama-cpp-python's C API ------------------------------------------------


def sha256_file(path: Path) -> str:
    """The file's sha256; taken from the `<file>.sha256` beside it when that is newer than the file."""
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file() and sidecar.stat().st_mtime >= path.stat().st_mtime:
        fields = sidecar.read_text(encoding="utf-8").split()
        if len(fields) == 2 and fields[1] == path.name and re.fullmatch(r"[0-9a-f]{64}", fields[0]):
            return fields[0]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# --- chunking, exactly as llama-perplexity cuts the text -------------------------------------


def scored_targets(chunk: np.ndarray) -> np.ndarray:
    first = chunk.size // 2
    return chunk[first + 1 :]


# --- the base-logits cache ---------------------------------------------------------------------


@dataclass(frozen=True)
class CacheHeader:
    base_sha256: str
    text_sha256: str
    ctx: int
    n_vocab: int
    n_chunk: int
    add_bos: bool
    format: int = CACHE_FORMAT
    codec: str = CODEC


def _write_header(f: BinaryIO, header: CacheHeader, chunks: np.ndarray) -> None:
    blob = json.dumps(asdict(header), sort_keys=True).encode()
    f.write(CACHE_MAGIC + struct.pack("<I", len(blob)) + blob)
    f.write(chunks.astype("<i4").tobytes())


def _write_chunk(f: BinaryIO, base: BaseChunk) -> None:
    payload = b"".join(
        a.astype(a.dtype.newbyteorder("<")).tobytes()
        for a in (base.nll, base.scale, base.min_log_prob, base.top, base.codes)
    )
    packed = zlib.compress(payload, 1)
    f.write(struct.pack("<Q", len(packed)) + packed)


def read_cache_header(path: Path) -> tuple[CacheHeader, np.ndarray, int]:
    """Header, token chunks and the byte offset of the first chunk record."""
    try:
        with path.open("rb") as f:
            if f.read(8) != CACHE_MAGIC:
                raise EvalError(f"{path} is not a coder-quant base-logits cache")
            (length,) = struct.unpack("<I", f.read(4))
            fields = json.loads(f.read(length))
            header = CacheHeader(**fields)
            n = header.n_chunk * header.ctx
            tokens = np.frombuffer(f.read(4 * n), dtype="<i4")
            if tokens.size != n:
                raise EvalError(f"{path} is truncated (token block)")
            return header, tokens.reshape(header.n_chunk, header.ctx).astype(np.int32), f.tell()
    except (OSError, ValueError, TypeError, struct.error) as exc:
        raise EvalError(f"cannot read base-logits cache {path}: {exc}") from None


def _read_chunks(path: Path, header: CacheHeader, offset: int) -> Iterator[BaseChunk]:
    n = header.ctx - 1 - header.ctx // 2
    with path.open("rb") as f:
        f.seek(offset)
        for index in range(header.n_chunk):
            size_raw = f.read(8)
            if len(size_raw) != 8:
                raise EvalError(f"{path} is truncated at chunk {index}")
            try:
                payload = zlib.decompress(f.read(struct.unpack("<Q", size_raw)[0]))
            except zlib.error as exc:
                raise EvalError(f"{path} is corrupt at chunk {index}: {exc}") from None
            if len(payload) != 16 * n + 2 * n * header.n_vocab:
                raise EvalError(f"{path} is corrupt at chunk {index}: wrong record size")
            floats = np.frombuffer(payload, dtype="<f4", count=3 * n)
            top = np.frombuffer(payload, dtype="<i4", count=n, offset=12 * n)
            codes = np.frombuffer(payload, dtype="<u2", offset=16 * n).reshape(n, header.n_vocab)
            yield BaseChunk(floats[:n], floats[n : 2 * n], floats[2 * n :], top, codes)


def _check_cache(path: Path, want: CacheHeader, got: CacheHeader) -> None:
    for field in ("format", "codec", "base_sha256", "ctx", "text_sha256", "n_vocab", "n_chunk", "add_bos"):
        if getattr(want, field) != getattr(got, field):
            raise EvalError(
                f"base-logits cache {path} does not match: {field} is {getattr(got, field)!r} there, "
                f"{getattr(want, field)!r} here (delete it or pass another --base-logits path)"
            )


def write_base_cache(session: LlamaSession, text: str, max_chunks: int | None, out: Path, base_sha: str) -> None:
    """Run the base model over the text and store its scored distributions at `out`."""
    ctx = session.ctx
    chunks = session.chunks(text, max_chunks)
    header = CacheHeader(
        base_sha256=base_sha,
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        ctx=ctx,
        n_vocab=session.n_vocab,
        n_chunk=len(chunks),
        add_bos=session.add_bos,
    )
    try:
        partial = new_partial(out)  # its own file: two runs writing one cache never mix their chunks
        f = partial.open("wb")
    except OSError as exc:
        raise EvalError(f"cannot write base-logits cache {out}: {exc.strerror or exc}") from None
    try:
        with f:
            _write_header(f, header, chunks)
            for i, chunk in enumerate(chunks):
                logits = session.decode_chunk(chunk, first=ctx // 2)[:-1]
                _write_chunk(f, encode_base(logits, scored_targets(chunk)))
                log.debug("base chunk %d/%d", i + 1, len(chunks))
            sync_complete(f, partial)
        os.replace(partial, out)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, file too large...: one line, not a traceback
            raise EvalError(f"cannot write base-logits cache {out}: {exc.strerror or exc}") from None
        raise
    log.info("base distributions of %d chunks written to %s", len(chunks), out)


def score_against_cache(
    session: LlamaSession, text: str, max_chunks: int | None, cache: Path, base_sha: str
) -> EvalResult:
    """Run the quantized model over the text and compare with the cached base distributions.

    The cache must come from the same base model (sha256), ctx and text, and hold the same chunks.
    """
    header, cached, offset = read_cache_header(cache)
    chunks = session.chunks(text, max_chunks)
    want = CacheHeader(
        base_sha256=base_sha,
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        ctx=session.ctx,
        n_vocab=session.n_vocab,
        n_chunk=len(chunks),
        add_bos=session.add_bos,
    )
    _check_cache(cache, want, header)
    if not np.array_equal(chunks, cached):
        raise EvalError(f"{session.path} tokenizes the text differently from the base model of {cache}")
    scores: list[ChunkScores] = []
    for i, (chunk, base) in enumerate(zip(chunks, _read_chunks(cache, header, offset), strict=True)):
        logits = session.decode_chunk(chunk, first=session.ctx // 2)[:-1]
        scores.append(score_chunk(logits, base, scored_targets(chunk)))
        log.debug("chunk %d/%d: mean KLD %.6f", i + 1, len(chunks), float(scores[-1].kld.mean()))
    return summarize(scores, session.ctx)


def evaluate(
    base_path: str | os.PathLike[str],
    quant_path: str | os.PathLike[str],
    text: str,
    ctx: int = 512,
    base_logits: str | os.PathLike[str] | None = None,
    max_chunks: int | None = None,
) -> EvalResult:
    """KLD / PPL / top-1 of `quant_path` against `base_path` on `text`, as llama-perplexity measures.

    With `base_logits`, the base distributions are read from that cache when it exists (it must match
    this base model, ctx, text and chunk count: a mismatch is an error) and written there otherwise.
    One model is loaded at a time.
    """
    base, quant = Path(base_path), Path(quant_path)
    for p in (base, quant):
        if not p.is_file():
            raise EvalError(f"model file not found: {p}")
    if not text:
        raise EvalError("the evaluation text is empty")
    if base_logits is not None:
        check_cache_path(Path(base_logits))
    check_comparable(base, quant, text, ctx, max_chunks)
    base_sha = sha256_file(base)
    with tempfile.TemporaryDirectory(prefix="coder-quant-eval-") as tmp:
        cache = Path(base_logits) if base_logits is not None else Path(tmp) / "base.logits"
        if cache.is_file():
            log.info("reusing base distributions from %s", cache)
        else:
            with LlamaSession(base, ctx) as session:
                write_base_cache(session, text, max_chunks, cache, base_sha)
        with LlamaSession(quant, ctx) as session:
            return score_against_cache(session, text, max_chunks, cache, base_sha)


def check_cache_path(cache: Path) -> None:
    """Refuse, before any model runs, a --base-logits path that can be neither read nor written."""
    if cache.exists():
        if not cache.is_file():
            what = "a directory" if cache.is_dir() else "not a regular file"
            raise EvalError(f"--base-logits {cache} is {what}")
        return
    folder = cache.parent
    if not folder.is_dir():
        raise EvalError(f"--base-logits {cache}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EvalError(f"--base-logits {cache}: folder {folder} is not writable")


def check_comparable(base: Path, quant: Path, text: str, ctx: int, max_chunks: int | None) -> None:
    """Refuse, before any model runs, too little text, a ctx either model does not support, and two models
    whose vocabularies differ: their distributions cannot be compared token for token."""
    seen = []
    for path in (base, quant):
        with LlamaSession(path, ctx, vocab_only=True) as session:  # the vocabulary alone: milliseconds
            seen.append((session.n_vocab, session.add_bos, session.chunks(text, max_chunks)))
    (base_vocab, base_bos, base_chunks), (quant_vocab, quant_bos, quant_chunks) = seen
    if base_vocab != quant_vocab:
        raise EvalError(f"{base} ({base_vocab} tokens) and {quant} ({quant_vocab} tokens) have different "
                        "vocabularies; they cannot be compared")  # fmt: skip
    if base_bos != quant_bos or not np.array_equal(base_chunks, quant_chunks):
        raise EvalError(f"{base} and {quant} tokenize the text differently; they cannot be compared")
