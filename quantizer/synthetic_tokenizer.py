"""A real byte-level BPE tokenizer in Qwen's format, built from rules instead of training.

The vocabulary is the 256 byte tokens, then merges that build whitespace runs and lower-case
words (with and without a leading space), then Qwen's special and added tokens. It loads in
Hugging Face `tokenizers` and in llama.cpp like any Qwen2/Qwen3 tokenizer; the merges are
arbitrary but valid, so text round-trips.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Qwen2/Qwen3 pre-tokenizer split pattern (the model family's published tokenizer.json).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen's special tokens, in the order (and so with the relative ids) the family assigns them.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Added after the special tokens but not special (Qwen3-Coder's tool-result and thinking markers).
ADDED_TOKENS: tuple[str, ...] = ("<tool_response>", "</tool_response>", "<think>", "</think>")

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Letters in rough English frequency order, so the first merges look like common text.
LETTERS = "etaoinsrhldcumfpgwybvkxjqz"


def byte_symbols() -> dict[int, str]:
    """Byte -> symbol of byte-level BPE; iteration order is the vocabulary order of the 256 tokens.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes follow, shifted
    to code points from 256 up, so every byte has a visible, non-space symbol (GPT-2's scheme,
    which Qwen keeps).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for i, b in enumerate([b for b in range(256) if b not in table]):
        table[b] = chr(256 + i)
    return table


def merge_rules() -> Iterator[tuple[str, str]]:
    """Endless stream of valid merges: whitespace runs, then words of growing length."""
    symbols = byte_symbols()
    space, newline = symbols[ord(" ")], symbols[ord("\n")]
    run = space
    for _ in range(4):  # 2, 4, 8, 16 spaces: indentation
        yield run, run
        run += run
    yield newline, newline
    yield newline, space
    plain: list[str] = list(LETTERS)
    spaced: list[str] = []
    for c in LETTERS:
        yield space, c
        spaced.append(space + c)
    while True:
        next_plain, next_spaced = [], []
        for prefix in plain:
            for c in LETTERS:
                yield prefix, c
                next_plain.append(prefix + c)
        for prefix in spaced:
            for c in LETTERS:
                yield prefix, c
                next_spaced.append(prefix + c)
        plain, spaced = next_plain, next_spaced


def bpe_vocab(size: int) -> tuple[dict[str, int], list[list[str]]]:
    """Vocabulary of `size` tokens (256 bytes + merges) and the merges that produce it."""
    if size < 256:
        raise ValueError(f"a byte-level BPE vocabulary needs at least 256 tokens, got {size}")
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols().values())}
    merges: list[list[str]] = []
    rules = merge_rules()
    while len(vocab) < size:
        left, right = next(rules)
        vocab[left + right] = len(vocab)
        merges.append([left, right])
    return vocab, merges


def added_token_ids(bpe_size: int) -> dict[str, int]:
    """Ids of the special then added tokens, placed right after the BPE vocabulary."""
    return {token: bpe_size + i for i, token in enumerate(SPECIAL_TOKENS + ADDED_TOKENS)}


def tokenizer_json(bpe_size: int) -> dict[str, Any]:
    """A tokenizer.json (Hugging Face `tokenizers` format) for a Qwen-style byte-level BPE."""
    vocab, merges = bpe_vocab(bpe_size)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": token_id,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": token in SPECIAL_TOKENS,
            }
            for token, token_id in added_token_ids(bpe_size).items()
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config(bpe_size: int, chat_template: str, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json in the shape Qwen3 checkpoints ship it."""
    ids = added_token_ids(bpe_size)
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": token in SPECIAL_TOKENS,
            }
            for token, token_id in ids.items()
        },
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, EOS_TOKEN)],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": max_length,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
