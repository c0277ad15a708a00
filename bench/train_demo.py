"""Train the built-in demo model: a small Qwen3-Next on Python source, in minutes on one GPU.

Needs only torch, transformers (>= 5, for Qwen3NextForCausalLM), tokenizers, safetensors and numpy,
plus two files of this repository (the tokenizer layout in quantizer/synthetic_tokenizer.py and the
chat template in quantizer/data/); no network. From the repository root:

    python3 bench/train_demo.py --minutes 4 --out OUT/demo-ckpt      # one H200: about 5 minutes in all
    python3 bench/train_demo.py --minutes 0.3 --device cpu --corpus-mb 4 --out demo-ckpt  # smoke test
    coder-quant build OUT/demo-ckpt demo.gguf

Steps:
  1. corpus: the .py files of this Python's standard library and site-packages (test folders left
     out, duplicates dropped), walked in sorted order and capped in bytes, per package and in all;
  2. tokenizer: a byte-level BPE learned from the corpus with Qwen's pre-tokenizer and Qwen's
     special tokens, in the layout of quantizer/synthetic_tokenizer.py (so coder-quant reads it as
     `qwen2`), with the Qwen3-Coder chat template in tokenizer_config.json;
  3. samples: files cut at line ends into pieces of about one context, some pieces also as
     fill-in-the-middle samples (Qwen's <|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>M layout, which
     /v1/completions with `suffix` sends) and some documented functions as chat turns;
  4. training: a 4-layer Qwen3-Next (3 Gated DeltaNet + 1 full attention, 16 experts top-4) shaped
     so that coder-quant's default recipe writes a GGUF under 15 MB; AdamW, bf16 autocast, warmup
     then cosine over a wall-clock and a token budget, whichever ends first;
  5. output: config.json, BF16 safetensors in shards under 15 MiB, tokenizer files,
     generation_config.json (8 files); train_log.json ([step, seconds, loss] every --log-every steps,
     as the shared reference model has it) and train_summary.json (corpus, budget, held-out loss)
     go into --log-dir (default: --out) and are printed at the end.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import multiprocessing
import os
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; fail fast instead of waiting

import numpy as np
import torch
import transformers
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The quantizer package's __init__ imports nothing; this module is plain Python.
from quantizer.synthetic_tokenizer import (  # noqa: E402
    ADDED_TOKENS,
    EOS_TOKEN,
    PAD_TOKEN,
    QWEN_SPLIT_PATTERN,
    SPECIAL_TOKENS,
    tokenizer_config,
)

CHAT_TEMPLATE = ROOT / "quantizer" / "data" / "qwen3-coder.jinja"
MiB = 1 << 20
MAX_FILE_BYTES = 15 * MiB  # each output file must stay under this (shards included)
SKIP_DIRS = {"test", "tests", "testing", "idle_test", "__pycache__", "site-packages", "dist-packages"}
EOT = "<|endoftext|>"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a helpful coding assistant.")


def log(message: str) -> None:
    print(f"[train_demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def model_config(vocab_size: int, ids: dict[str, int], context: int) -> Qwen3NextConfig:
    """The shared reference model's shape: 16.5 M parameters, 14.8 MB with the default recipe."""
    return Qwen3NextConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
        linear_conv_kernel_dim=4, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
        shared_expert_intermediate_size=256, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        router_aux_loss_coef=0.01, max_position_embeddings=context, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False, bos_token_id=ids[PAD_TOKEN], eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
    )


# --- corpus ----------------------------------------------------------------------------------------


def source_roots() -> list[Path]:
    """The standard library first, then every site-packages folder, each once."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("stdlib", "purelib", "platlib"):
        root = Path(paths[key]).resolve()
        if root.is_dir() and root not in roots:
            roots.append(root)
    return roots


def python_files(folder: Path) -> list[Path]:
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        found += [Path(here) / f for f in sorted(files) if f.endswith(".py") and not f.startswith("test_")]
    return found


def read_corpus(total_cap: int, package_cap: int) -> list[str]:
    """Source texts in a fixed order: per top-level entry of each root, up to package_cap bytes."""
    texts: list[str] = []
    seen: set[bytes] = set()
    total = 0
    for root in source_roots():
        for entry in sorted(root.iterdir()):
            if entry.name in SKIP_DIRS:
                continue
            files = [entry] if entry.suffix == ".py" else python_files(entry) if entry.is_dir() else []
            taken = 0
            for path in files:
                try:
                    size = path.stat().st_size
                    if not 200 <= size <= 512 * 1024:
                        continue
                    if taken + size > package_cap or total + size > total_cap:
                        break
                    raw = path.read_bytes()
                    text = raw.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                digest = hashlib.sha1(raw).digest()
                if digest in seen or "\x00" in text:
                    continue
                seen.add(digest)
                texts.append(text.replace("\r\n", "\n"))
                taken += len(raw)
                total += len(raw)
            if total >= total_cap:
                return texts
    return texts


# --- tokenizer -------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, sample_bytes: int) -> Tokenizer:
    """Byte-level BPE with Qwen's split regex; special then added tokens follow the learned ones."""
    bpe_size = vocab_size - len(SPECIAL_TOKENS) - len(ADDED_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    stride = max(1, round(sum(map(len, texts)) / sample_bytes))
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts[::stride], trainer=trainer)
    learned = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    expected = {t: learned + i for i, t in enumerate(SPECIAL_TOKENS + ADDED_TOKENS)}
    if any(tok.token_to_id(t) != i for t, i in expected.items()):
        raise SystemExit("tokenizer: special tokens did not land right after the learned vocabulary")
    return tok


# --- samples ---------------------------------------------------------------------------------------


def split_lines(text: str, size: int) -> list[str]:
    """Cut text after line ends into pieces of about `size` characters (longer lines stay whole)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size) + 1 or len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def fim_sample(piece: str, rng: random.Random) -> str:
    """Half the time whole lines as the middle (line completion), else a random character span."""
    lines = piece.splitlines(keepends=True)
    if len(lines) > 2 and rng.random() < 0.5:
        first = rng.randrange(len(lines))
        last = min(len(lines), first + rng.randint(1, 8))
        pre, mid, suf = "".join(lines[:first]), "".join(lines[first:last]), "".join(lines[last:])
    else:
        a, b = sorted(rng.randrange(len(piece) + 1) for _ in range(2))
        pre, mid, suf = piece[:a], piece[a:b], piece[b:]
    return f"{FIM_PREFIX}{pre}{FIM_SUFFIX}{suf}{FIM_MIDDLE}{mid}{EOT}"


def documented_functions(text: str, max_chars: int) -> list[tuple[str, str, str]]:
    """(signature, docstring summary, source) of the public, documented top-level functions."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return []
    lines = text.splitlines(keepends=True)
    found = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node) or ""
        summary = " ".join(doc.split("\n\n")[0].split())
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        source = "".join(lines[first - 1:node.end_lineno]).rstrip()
        if 20 <= len(summary) <= 300 and len(source) <= max_chars:
            found.append((f"{node.name}({ast.unparse(node.args)})", summary, source))
    return found


def parse_all(docs: list[str], max_chars: int) -> list[list[tuple[str, str, str]]]:
    """documented_functions of every file up to 100 kB, parsed on all cores."""
    work = [(doc if len(doc) <= 100_000 else "", max_chars) for doc in docs]
    with multiprocessing.Pool(min(16, os.cpu_count() or 1)) as pool:
        return pool.starmap(documented_functions, work, chunksize=16)


def chat_sample(signature: str, summary: str, source: str, rng: random.Random) -> str:
    """One user/assistant exchange as the Qwen3-Coder template renders it without tools."""
    name = signature.split("(")[0]
    aim = summary[0].lower() + summary[1:] if summary[1:2].islower() else summary
    user = rng.choice((
        f"Write a Python function `{signature}` that does this: {summary}",
        f"Implement `{name}` in Python. {summary}",
        f"{summary}\nWrite it as a Python function named `{name}`.",
        f"Can you write a function that will {aim.rstrip('.')}?",
    ))
    reply = rng.choice(("", f"Here is `{name}`:\n\n", "Sure:\n\n")) + f"```python\n{source}\n```"
    system = f"<|im_start|>system\n{rng.choice(SYSTEM_PROMPTS)}<|im_end|>\n" if rng.random() < 0.3 else ""
    return f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n{EOT}"


def build_samples(docs: list[str], args: argparse.Namespace, rng: random.Random) -> tuple[list[str], dict[str, int]]:
    """Pieces of every file (contiguous, the file's last one ending in <|endoftext|>), FIM and chat samples."""
    plain: list[list[str]] = []
    extra: list[str] = []
    counts = {"pieces": 0, "fim": 0, "chat": 0}
    functions = parse_all(docs, args.piece_chars) if args.chat_samples else [[] for _ in docs]
    for doc, found in zip(docs, functions, strict=True):
        pieces = split_lines(doc, args.piece_chars)
        pieces[-1] += EOT
        plain.append(pieces)
        counts["pieces"] += len(pieces)
        for piece in pieces:
            if rng.random() < args.fim_rate:
                extra.append(fim_sample(piece.removesuffix(EOT), rng))
                counts["fim"] += 1
        if counts["chat"] < args.chat_samples:
            for fn in rng.sample(found, min(len(found), 4)):
                extra.append(chat_sample(*fn, rng))
                counts["chat"] += 1
    units: list[list[str]] = plain + [[s] for s in extra]
    rng.shuffle(units)
    return [piece for unit in units for piece in unit], counts


def tokenize(tok: Tokenizer, samples: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One token stream (uint16) and the offset where each sample starts in it."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    chunks, starts, total = [], [], 0
    for i in range(0, len(samples), 2048):
        for enc in encode(samples[i:i + 2048], add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.uint16)
            starts.append(total)
            chunks.append(ids)
            total += len(ids)
    return np.concatenate(chunks), np.asarray(starts, dtype=np.int64)


# --- training --------------------------------------------------------------------------------------


def batch(stream: np.ndarray, starts: np.ndarray, size: int, seq_len: int, rng: np.random.Generator,
          device: torch.device) -> torch.Tensor:
    """Windows of seq_len tokens, each beginning where a sample (a piece, FIM or chat turn) begins."""
    first = np.minimum(rng.choice(starts, size), len(stream) - seq_len)
    rows = stream[first[:, None] + np.arange(seq_len)].astype(np.int64)
    return torch.from_numpy(rows).to(device, non_blocking=True)


def optimizer_for(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases, embeddings, A_log / dt_bias (1-D or embedding tensors)."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        (keep if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def learning_rate(args: argparse.Namespace, step: int, progress: float) -> float:
    """Linear warmup, then cosine from --lr to --lr * --min-lr-ratio over the budget's progress."""
    warm = min(1.0, (step + 1) / args.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def train(model: Qwen3NextForCausalLM, stream: np.ndarray, starts: np.ndarray, args: argparse.Namespace,
          device: torch.device) -> list[list[float]]:
    optimizer = optimizer_for(model, args, device)
    rng = np.random.default_rng(args.seed)
    budget_s, tokens_per_step = args.minutes * 60.0, args.batch_size * args.seq_len
    history: list[list[float]] = []
    model.train()
    step, running, began = 0, torch.zeros((), device=device), time.perf_counter()
    while True:
        elapsed = time.perf_counter() - began
        progress = max(elapsed / budget_s, step * tokens_per_step / args.max_tokens)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step, progress)
        x = batch(stream, starts, args.batch_size, args.seq_len, rng, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += (out.loss - model.config.router_aux_loss_coef * out.aux_loss).detach()
        step += 1
        if step % args.log_every == 0:
            loss = running.item() / args.log_every
            running.zero_()
            seconds = time.perf_counter() - began
            history.append([step, round(seconds), round(loss, 4)])
            log(f"step {step}  {seconds:.0f}s  loss {loss:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"{step * tokens_per_step / seconds / 1e3:.0f}k tok/s")
    if step % args.log_every:
        seconds = time.perf_counter() - began
        history.append([step, round(seconds), round(running.item() / (step % args.log_every), 4)])
    log(f"trained {step} steps, {step * tokens_per_step / 1e6:.1f} M tokens in {time.perf_counter() - began:.0f}s")
    return history


@torch.no_grad()
def evaluate(model: Qwen3NextForCausalLM, stream: np.ndarray, starts: np.ndarray, args: argparse.Namespace,
             device: torch.device) -> float:
    """Mean next-token loss on held-out files (whole windows from sample starts, fixed seed)."""
    model.eval()
    rng, losses = np.random.default_rng(args.seed + 1), []
    for _ in range(args.eval_batches):
        x = batch(stream, starts, args.batch_size, args.seq_len, rng, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses.append(model(input_ids=x, labels=x, use_cache=False).loss.item())
    return float(np.mean(losses))


# --- output ----------------------------------------------------------------------------------------


def write_json(path: Path, value: Any, indent: int | None = 2) -> None:
    path.write_text(json.dumps(value, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def save(model: Qwen3NextForCausalLM, tok: Tokenizer, out: Path, ids: dict[str, int], context: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="12MB")
    learned = ids[SPECIAL_TOKENS[0]]
    template = CHAT_TEMPLATE.read_text(encoding="utf-8")
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config(learned, template, context))
    # As Qwen3-Coder ships it: stop at <|im_end|> (chat) or <|endoftext|> (plain completion).
    write_json(out / "generation_config.json", {"bos_token_id": ids[PAD_TOKEN], "pad_token_id": ids[PAD_TOKEN],
                                                "eos_token_id": [ids[EOS_TOKEN], ids[PAD_TOKEN]]})
    too_big = [f"{p.name} ({p.stat().st_size} bytes)" for p in out.iterdir() if p.stat().st_size > MAX_FILE_BYTES]
    if too_big:
        raise SystemExit(f"output files over {MAX_FILE_BYTES} bytes: {', '.join(too_big)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--log-dir", type=Path, help="where train_log.json and train_summary.json go (default: --out)")
    p.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget of the training loop")
    p.add_argument("--max-tokens", type=float, default=200e6, help="token budget (the reference saw 126 M)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--corpus-mb", type=float, default=160, help="cap on source bytes read")
    p.add_argument("--package-mb", type=float, default=12, help="cap per top-level package, for variety")
    p.add_argument("--tokenizer-mb", type=float, default=24, help="corpus sample the BPE is learned from")
    p.add_argument("--vocab-size", type=int, default=4096, help="embedding rows; 4096 keeps the GGUF < 15 MB")
    p.add_argument("--context", type=int, default=4096, help="max_position_embeddings written to config")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--piece-chars", type=int, default=3000, help="file pieces: about one window of tokens")
    p.add_argument("--fim-rate", type=float, default=0.3, help="share of pieces also given as FIM samples")
    p.add_argument("--chat-samples", type=int, default=8000, help="documented functions as chat turns")
    p.add_argument("--holdout-every", type=int, default=50, help="every Nth file is held out for the eval")
    p.add_argument("--experts", default="grouped_mm", choices=("grouped_mm", "eager", "batched_mm"),
                   help="transformers' routed-expert implementation")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    random.seed(args.seed)
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts (the delta rule's chunk algebra)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    summary: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                            "transformers": transformers.__version__}}
    if device.type == "cuda":
        summary["versions"]["device"] = torch.cuda.get_device_name(device)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}")
    began = time.perf_counter()

    docs = read_corpus(int(args.corpus_mb * MiB), int(args.package_mb * MiB))
    rng.shuffle(docs)
    held = docs[::args.holdout_every]
    docs = [d for i, d in enumerate(docs) if i % args.holdout_every]
    summary["corpus"] = {"files": len(docs), "bytes": sum(map(len, docs)), "heldout_files": len(held)}
    log(f"corpus: {len(docs)} files, {summary['corpus']['bytes'] / MiB:.1f} MiB; {len(held)} held out "
        f"({time.perf_counter() - began:.0f}s)")

    tok = train_tokenizer(docs, args.vocab_size, int(args.tokenizer_mb * MiB))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + ADDED_TOKENS}
    log(f"tokenizer: {ids[SPECIAL_TOKENS[0]]} learned tokens ({time.perf_counter() - began:.0f}s)")

    samples, counts = build_samples(docs, args, rng)
    stream, starts = tokenize(tok, samples)
    plain_only = argparse.Namespace(**{**vars(args), "fim_rate": 0.0, "chat_samples": 0})
    held_stream, held_starts = tokenize(tok, build_samples(held, plain_only, random.Random(args.seed + 1))[0])
    summary["samples"] = {**counts, "tokens": int(len(stream)), "bytes_per_token": round(
        sum(map(len, samples)) / len(stream), 3), "heldout_tokens": int(len(held_stream))}
    log(f"samples: {counts}, {len(stream) / 1e6:.1f} M tokens ({summary['samples']['bytes_per_token']} "
        f"chars/token) ({time.perf_counter() - began:.0f}s)")

    config = model_config(args.vocab_size, ids, args.context)
    model = Qwen3NextForCausalLM(config).to(device)
    model.set_experts_implementation(args.experts)
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    log(f"model: {summary['parameters'] / 1e6:.2f} M parameters on {device}")
    history = train(model, stream, starts, args, device)
    held_loss = evaluate(model, held_stream, held_starts, args, device)
    if device.type == "cuda":
        summary["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / MiB)
    summary["heldout"] = {"loss": round(held_loss, 4), "perplexity": round(math.exp(held_loss), 3)}
    log(f"held-out loss {held_loss:.4f} (perplexity {math.exp(held_loss):.2f})")

    save(model, tok, args.out, ids, args.context)
    summary["seconds"] = round(time.perf_counter() - began, 1)
    summary["steps"] = history[-1][0] if history else 0
    log_dir = args.log_dir or args.out
    log_dir.mkdir(parents=True, exist_ok=True)
    write_json(log_dir / "train_log.json", history, indent=None)
    write_json(log_dir / "train_summary.json", summary)
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    log(f"wrote {args.out}: {sum(sizes.values()) / MiB:.1f} MiB in {len(sizes)} files "
        f"(largest {max(sizes.values()) / MiB:.1f} MiB); {summary['seconds']:.0f}s in all")
    print("train_log.json", json.dumps(history), "\ntrain_summary.json", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
