"""Precision policy as data: recipes are ordered rule tables, the first matching rule wins.

A rule matches a GGUF tensor name by regular expression (searched, as llama-quantize's
--tensor-type does) or a tensor class ("class:routed_expert"). Its type is a llama.cpp type
name or KEEP (the source precision: what `convert_hf_to_gguf.py --outtype bf16` writes).
Shapes a type cannot hold go through SHAPE_FALLBACK afterwards (see plan.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantizer import ggml
from quantizer.errors import RecipeError
from quantizer.spec import TENSOR_CLASSES, TensorSpec

KEEP = "keep"  # rule type meaning "the tensor's base_type", i.e. copied as the reference converter writes it
CLASS_PREFIX = "class:"
DEFAULT_RECIPE = "attn-bf16-iq4xs"


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex searched in the GGUF tensor name, or "class:<tensor class>"
    type: str  # llama.cpp type name, or KEEP
    label: str  # shown in the plan as the reason for the choice

    def __post_init__(self) -> None:
        if self.type != KEEP:
            ggml.ggml_type(self.type)  # RecipeError for an unknown name
        if self.pattern.startswith(CLASS_PREFIX):
            if self.pattern[len(CLASS_PREFIX) :] not in TENSOR_CLASSES:
                raise RecipeError(f"unknown tensor class in rule {self.pattern!r} (known: {', '.join(TENSOR_CLASSES)})")
        else:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise RecipeError(f"bad regular expression {self.pattern!r} in rule: {exc}") from None

    def matches(self, spec: TensorSpec) -> bool:
        if self.pattern.startswith(CLASS_PREFIX):
            return spec.tclass == self.pattern[len(CLASS_PREFIX) :]
        return re.search(self.pattern, spec.name) is not None

    def type_for(self, spec: TensorSpec) -> str:
        return spec.base_type if self.type == KEEP else self.type


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    rules: tuple[Rule, ...]

    def choose(self, spec: TensorSpec) -> Rule:
        """The first rule that matches; every preset ends in a catch-all."""
        for rule in self.rules:
            if rule.matches(spec):
                return rule
        return _KEEP_ALL

    def with_user_rules(self, rules: tuple[Rule, ...]) -> Recipe:
        """User rules go first, so they override the preset."""
        return Recipe(self.name, self.description, rules + self.rules) if rules else self


_KEEP_ALL = Rule(r".", KEEP, "keep source precision")
_DOWN_EXPS = r"\.ffn_down_exps\."


def _no_bf16(qtype: str) -> tuple[Rule, ...]:
    """Routed experts IQ4_XS and the matrices the GPU holds under `attn` in `qtype`, for GPUs without
    fast BF16 math (CUDA compute capability below 8.0). Not bit-for-bit any more; norms, the router and
    the SSM conv kernel stay as they are (PROTECTED)."""
    kept = tuple(Rule(f"class:{c}", qtype, f"{c} -> {qtype} (no fast BF16 on the GPU)")
                 for c in ("attention", "ssm", "shared_expert", "output"))
    return (Rule("class:routed_expert", "iq4_xs", "routed experts -> iq4_xs"), *kept, _KEEP_ALL)


def _experts(gate_up: str, down: str | None = None) -> tuple[Rule, ...]:
    down_rules = (Rule(_DOWN_EXPS, down, f"routed ffn_down -> {down} (most sensitive)"),) if down else ()
    return (*down_rules, Rule("class:routed_expert", gate_up, f"routed experts -> {gate_up}"), _KEEP_ALL)


PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("bf16", "nothing quantized: every tensor as the reference BF16 conversion writes it", (_KEEP_ALL,)),
        Recipe(DEFAULT_RECIPE, "routed experts IQ4_XS; attention, SSM, shared expert, embeddings kept", _experts("iq4_xs")),
        Recipe("attn-bf16-iq3s", "routed experts IQ3_S; everything else kept", _experts("iq3_s")),
        Recipe(
            "attn-bf16-iq3s-down-iq4xs",
            "routed gate/up IQ3_S, routed down IQ4_XS; everything else kept",
            _experts("iq3_s", down="iq4_xs"),
        ),
        Recipe(
            "attn-bf16-iq4xs-down-q5k",
            "routed gate/up IQ4_XS, routed down Q5_K; everything else kept",
            _experts("iq4_xs", down="q5_k"),
        ),
        Recipe(
            "attn-bf16-iq4xs-mix",
            "as attn-bf16-iq4xs, plus llama.cpp's IQ4_XS-mix choices for token_embd (IQ4_XS) and output (Q6_K)",
            (
                Rule(r"^token_embd\.weight$", "iq4_xs", "token_embd -> iq4_xs (llama.cpp IQ4_XS mix)"),
                Rule(r"^output\.weight$", "q6_k", "output -> q6_k (llama.cpp IQ4_XS mix)"),
                *_experts("iq4_xs"),
            ),
        ),
        Recipe("attn-bf16-q4k", "routed experts Q4_K; everything else kept", _experts("q4_k")),
        Recipe("attn-bf16-q8", "routed experts Q8_0 (near lossless); everything else kept", _experts("q8_0")),
        Recipe("attn-f16-iq4xs", "for GPUs before Ampere: routed experts IQ4_XS, the GPU's matrices F16 "
               "(not bit-for-bit)", _no_bf16("f16")),
        Recipe("attn-q8-iq4xs", "for GPUs before Ampere: routed experts IQ4_XS, the GPU's matrices Q8_0 "
               "(not bit-for-bit)", _no_bf16("q8_0")),
    )
}


def parse_rule(text: str) -> Rule:
    """`REGEX=TYPE` from the command line; the last '=' separates, so the regex may contain '='."""
    pattern, sep, qtype = text.rpartition("=")
    if not sep or not pattern or not qtype:
        raise RecipeError(f"rule {text!r} is not REGEX=TYPE")
    return Rule(pattern, qtype.strip().lower(), f"--rule {text}")


def get_recipe(name: str | None = None, rules: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A preset by name (default DEFAULT_RECIPE) with user rules in front."""
    key = name or DEFAULT_RECIPE
    if key not in PRESETS:
        raise RecipeError(f"unknown recipe {key!r} (known: {', '.join(PRESETS)})")
    return PRESETS[key].with_user_rules(tuple(parse_rule(r) for r in rules))


# Shape fallback, as llama.cpp's tensor_type_fallback (src/llama-quant.cpp): a type whose block
# does not divide a row falls back to a 32-block type of similar size.
SHAPE_FALLBACK: dict[str, str] = {
    **dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"), "iq4_nl"),
    **dict.fromkeys(("q2_k", "q3_k", "tq1_0", "tq2_0"), "q4_0"),
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
}
# When even the fallback does not divide the row (ncols not a multiple of 32), llama.cpp writes F16;
# we keep the tensor's base type instead: it is what the source holds, and BF16 cannot overflow.
FINAL_FALLBACK = KEEP

# Tensors that stay at their base type whatever a rule says, as llama-quantize never quantizes them
# (tensor_allows_quantization): 1-D tensors, norms, the expert router, the small SSM conv kernel.
PROTECTED: tuple[tuple[str, str], ...] = (
    ("class:norm", "norms are never quantized"),
    ("class:router", "the expert router is never quantized"),
    (r"\.ssm_conv1d\.", "the SSM conv kernel is never quantized"),
    (r"_norm\.weight$", "norms are never quantized"),
)
