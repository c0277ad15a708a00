"""tokenizer.json / tokenizer_config.json -> the tokenizer.ggml.* metadata llama.cpp reads.

Mirrors the reference converter's GPT-2-style BPE path (TextModel.get_vocab_base and gguf-py's
SpecialVocab) without needing transformers: same token list and types, merges, special token
ids, add_bos/add_eos flags and chat template. The pre-tokenizer name is decided from the
pre-tokenizer's split regex rather than by hashing sample output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from quantizer.errors import CheckpointError

logger = logging.getLogger(__name__)

# Split regexes of Hugging Face pre-tokenizers -> llama.cpp's tokenizer.ggml.pre name.
# llama.cpp implements each name's regex in src/llama-vocab.cpp.
PRE_TOKENIZER_PATTERNS: dict[str, str] = {
    # Qwen2 / Qwen2.5 / Qwen3 / Qwen3-Next / Qwen3-Coder
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
SPECIAL_TOKEN_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# newer gguf-py has these keys; the strings are llama.cpp's LLM_KV names
NORMALIZER_KEYS = {
    "lowercase": getattr(gguf.Keys.Tokenizer, "NORMALIZER_LOWERCASE", "tokenizer.ggml.normalizer.lowercase"),
    "strip_accents": getattr(gguf.Keys.Tokenizer, "NORMALIZER_STRIP_ACCENTS", "tokenizer.ggml.normalizer.strip_accents"),
}


@dataclass(frozen=True)
class Vocab:
    """Everything the GGUF's tokenizer.* keys hold, in the order the reference writes them."""

    model: str
    pre: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    special_ids: tuple[tuple[str, int], ...]
    add_special: tuple[tuple[str, bool], ...]
    chat_template: str | list[dict[str, str]] | None
    normalizer: tuple[tuple[str, bool], ...] = ()


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent.name}: missing {path.name} (a Hugging Face fast tokenizer is required)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: not a JSON object")
    return data


def pre_tokenizer_name(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer, from its Split regex(es)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    patterns = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    for pattern in patterns:
        if pattern in PRE_TOKENIZER_PATTERNS:
            return PRE_TOKENIZER_PATTERNS[pattern]
    shown = patterns[0][:60] + "..." if patterns else "no Split regex"
    raise CheckpointError(f"tokenizer.json: unrecognised BPE pre-tokenizer ({shown})")


def _looks_special(token: str) -> bool:
    # TextModel.does_token_look_special: some models forget to flag control tokens as special
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or token.startswith("<|") and token.endswith("|>")
            or token.startswith("<\uff5c") and token.endswith("\uff5c>")
            or token.startswith("<unused") and token.endswith(">"))


def _tokens(tokenizer: dict[str, Any], vocab_size: int | None) -> tuple[list[str], list[int]]:
    model = tokenizer.get("model") or {}
    base: dict[str, int] = model.get("vocab") or {}
    added = {a["content"]: a for a in tokenizer.get("added_tokens", []) if isinstance(a, dict) and "content" in a}
    by_id: dict[int, str] = {i: t for t, i in base.items()}
    by_id.update({a["id"]: t for t, a in added.items()})
    size = vocab_size if vocab_size is not None else len({**base, **{t: a["id"] for t, a in added.items()}})
    if by_id and max(by_id) >= size:
        raise CheckpointError(f"tokenizer.json: token id {max(by_id)} does not fit vocab_size {size}")
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif token in added:
            if added[token].get("special") or _looks_special(token):
                types.append(int(TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")  # user-defined tokens are stored pre-normalised
                types.append(int(TokenType.USER_DEFINED))
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(int(TokenType.NORMAL))
    return tokens, types


def _merges(tokenizer: dict[str, Any]) -> list[str]:
    merges = (tokenizer.get("model") or {}).get("merges") or []
    if merges and isinstance(merges[0], list):
        # pair format (transformers >= 4.45); spaces inside a part are stored as U+0120 like the reference
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    return [str(m) for m in merges]


def _post_processor_flags(tokenizer: dict[str, Any], config: dict[str, Any]) -> dict[str, bool]:
    """add_bos/add_eos as the reference derives them from the post-processor (ByteLevel, Roberta,
    the single-sequence part of TemplateProcessing)."""
    flags: dict[str, bool] = {}
    post = tokenizer.get("post_processor") or {}
    for processor in post.get("processors", [post]) if post else []:
        kind = processor.get("type")
        if kind == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            flags.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing":
            single = processor.get("single", [])
            if len(single) > 1:
                first = single[0].get("SpecialToken", {}).get("id")
                last = single[-1].get("SpecialToken", {}).get("id")
                if first:
                    flags["bos"] = first in (_content(config.get("bos_token")), _content(config.get("cls_token")))
                if last:
                    flags["eos"] = last == _content(config.get("eos_token"))
    return flags


def _content(entry: Any) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _special_ids(tokenizer: dict[str, Any], tok_config: dict[str, Any], config: dict[str, Any]) -> list[tuple[str, int]]:
    """Special token ids: tokenizer_config's *_token first, then config.json's *_token_id.

    Like the reference, ids are not range-checked against the vocabulary here.
    """
    added = [a for a in tokenizer.get("added_tokens", []) if isinstance(a, dict)]
    ids: dict[str, int] = {}

    def offer(kind: str, tid: Any) -> None:
        if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0 and kind not in ids:
            ids[kind] = tid

    config_tokens = dict(tok_config)
    if not _content(config_tokens.get("bos_token")) and _content(config_tokens.get("cls_token")):
        config_tokens["bos_token"] = config_tokens["cls_token"]
    if not _content(config_tokens.get("eos_token")) and _content(config_tokens.get("sep_token")):
        config_tokens["eos_token"] = config_tokens["sep_token"]
    for kind in SPECIAL_TOKEN_TYPES:
        content = _content(config_tokens.get(f"{kind}_token"))
        if content is not None:
            offer(kind, next((a.get("id") for a in added if a.get("content") == content), None))
    for kind in SPECIAL_TOKEN_TYPES:
        offer(kind, config.get(f"{kind}_token_id"))
    return list(ids.items())


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | list[dict[str, str]] | None:
    alternative: str | list[dict[str, str]] | None = None
    jinja, as_json = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        alternative = jinja.read_text(encoding="utf-8")
        extra = sorted((folder / "additional_chat_templates").glob("*.jinja"))
        if extra:
            alternative = [{"name": "default", "template": alternative}]
            alternative += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
    elif as_json.is_file():
        alternative = (_read_json(as_json, required=True) or {}).get("chat_template")
    template = tok_config.get("chat_template", alternative)
    return template if isinstance(template, (str, list)) else None


def _normalizer_flags(normalizer: dict[str, Any] | None, out: dict[str, bool]) -> None:
    if not normalizer:
        return
    kind = normalizer.get("type")
    if kind == "Lowercase":
        out["lowercase"] = True
    elif kind == "StripAccents":
        out["strip_accents"] = True
    elif kind == "BertNormalizer":
        out.update({k: normalizer[k] for k in ("lowercase", "strip_accents") if k in normalizer})
    elif kind == "Sequence":
        for inner in normalizer.get("normalizers", []):
            _normalizer_flags(inner, out)


def load_vocab(folder: Path, config: dict[str, Any]) -> Vocab:
    """Read the tokenizer of a checkpoint folder; CheckpointError if absent or unsupported."""
    tokenizer = _read_json(folder / "tokenizer.json", required=True) or {}
    tok_config = _read_json(folder / "tokenizer_config.json", required=False) or {}
    model_type = (tokenizer.get("model") or {}).get("type")
    if model_type != "BPE":
        raise CheckpointError(f"tokenizer.json: {model_type!r} tokenizers are not supported (need byte-level BPE)")
    tokens, types = _tokens(tokenizer, config.get("vocab_size"))
    flags = _post_processor_flags(tokenizer, tok_config)
    for kind in SPECIAL_TOKEN_TYPES:
        entry = tok_config.get(f"add_{kind}_token")
        if isinstance(entry, bool) and kind not in flags:
            flags[kind] = entry
    normalizer: dict[str, bool] = {}
    _normalizer_flags(tokenizer.get("normalizer"), normalizer)
    return Vocab(
        model="gpt2",
        pre=pre_tokenizer_name(tokenizer),
        tokens=tuple(tokens),
        token_types=tuple(types),
        merges=tuple(_merges(tokenizer)),
        special_ids=tuple(_special_ids(tokenizer, tok_config, config)),
        add_special=tuple(flags.items()),
        chat_template=_chat_template(folder, tok_config),
        normalizer=tuple(normalizer.items()),
    )


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """Write tokenizer.* keys in the reference's order (_set_vocab_gpt2 + SpecialVocab.add_to_gguf)."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    if vocab.merges:
        writer.add_token_merges(list(vocab.merges))
    else:
        logger.warning("tokenizer has no merges; the output may not tokenize correctly")
    for kind, tid in vocab.special_ids:
        handler = getattr(writer, f"add_{kind}_token_id", None)
        if handler is not None:
            handler(tid)
    for kind, value in vocab.add_special:
        handler = getattr(writer, f"add_add_{kind}_token", None)
        if handler is not None:
            handler(value)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
    for name, value in vocab.normalizer:
        writer.add_bool(NORMALIZER_KEYS[name], value)
