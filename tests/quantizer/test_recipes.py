"""Recipes: first match wins, user rules first, fallbacks, and one-line errors."""

from __future__ import annotations

import pytest

from quantizer.errors import RecipeError
from quantizer.plan import resolve_type
from quantizer.recipes import DEFAULT_RECIPE, KEEP, PRESETS, SHAPE_FALLBACK, Rule, get_recipe, parse_rule
from quantizer.spec import TensorSpec


def spec(name: str, shape: tuple[int, ...], tclass: str = "attention", base: str = "bf16") -> TensorSpec:
    return TensorSpec(name, (name,), shape, tclass, base, "copy")  # type: ignore[arg-type]


DOWN = spec("blk.3.ffn_down_exps.weight", (8, 256, 512), "routed_expert")
GATE = spec("blk.3.ffn_gate_exps.weight", (8, 512, 256), "routed_expert")
QKV = spec("blk.0.attn_qkv.weight", (768, 256), "ssm")
NORM = spec("blk.0.attn_norm.weight", (256,), "norm", "f32")
ROUTER = spec("blk.0.ffn_gate_inp.weight", (8, 256), "router", "f32")
EMBD = spec("token_embd.weight", (4096, 256), "embedding")


def chosen(recipe_name: str, s: TensorSpec, rules: tuple[str, ...] = ()) -> str:
    return get_recipe(recipe_name, rules).choose(s).type_for(s)


def test_default_recipe_quantizes_only_routed_experts():
    assert get_recipe(None).name == DEFAULT_RECIPE == "attn-bf16-iq4xs"
    assert chosen(DEFAULT_RECIPE, DOWN) == "iq4_xs"
    assert chosen(DEFAULT_RECIPE, GATE) == "iq4_xs"
    for s in (QKV, NORM, ROUTER, EMBD):
        assert chosen(DEFAULT_RECIPE, s) == s.base_type


def test_bf16_recipe_keeps_every_base_type():
    for s in (DOWN, GATE, QKV, NORM, ROUTER, EMBD):
        assert chosen("bf16", s) == s.base_type


def test_mixed_presets_treat_down_first():
    assert chosen("attn-bf16-iq3s-down-iq4xs", DOWN) == "iq4_xs"
    assert chosen("attn-bf16-iq3s-down-iq4xs", GATE) == "iq3_s"
    assert chosen("attn-bf16-iq4xs-down-q5k", DOWN) == "q5_k"
    assert chosen("attn-bf16-iq4xs-down-q5k", GATE) == "iq4_xs"
    assert chosen("attn-bf16-iq3s", DOWN) == "iq3_s"
    assert chosen("attn-bf16-iq4xs-mix", EMBD) == "iq4_xs"
    assert chosen("attn-bf16-iq4xs-mix", QKV) == "bf16"


def test_every_preset_ends_in_a_catch_all_keep():
    for recipe in PRESETS.values():
        last = recipe.rules[-1]
        assert last.type == KEEP and last.matches(spec("anything.at.all", (2, 2)))


def test_first_match_wins_and_user_rules_come_first():
    recipe = get_recipe(DEFAULT_RECIPE, ["ffn_down_exps=q6_k", "_exps=q8_0"])
    assert recipe.choose(DOWN).type == "q6_k"  # user rule 1 beats user rule 2 and the preset
    assert recipe.choose(GATE).type == "q8_0"
    assert recipe.choose(DOWN).label == "--rule ffn_down_exps=q6_k"
    assert recipe.choose(QKV).type == KEEP
    # same rules, other order: the broader one now shadows the narrower one
    assert get_recipe(DEFAULT_RECIPE, ["_exps=q8_0", "ffn_down_exps=q6_k"]).choose(DOWN).type == "q8_0"


def test_rules_by_class_and_keep():
    assert get_recipe("bf16", ["class:ssm=q8_0"]).choose(QKV).type == "q8_0"
    assert get_recipe(DEFAULT_RECIPE, ["blk\\.3\\.=keep"]).choose(DOWN).type_for(DOWN) == "bf16"


def test_rule_splits_at_the_last_equals_sign():
    rule = parse_rule("name(?=_exps)=IQ4_XS")
    assert rule == Rule("name(?=_exps)", "iq4_xs", "--rule name(?=_exps)=IQ4_XS")


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (["ffn_down=iq5_xs"], "unknown tensor type 'iq5_xs'"),
        (["ffn_down=q8_1"], "unknown tensor type 'q8_1'"),  # not a weight type
        (["ffn_(down=q4_k"], "bad regular expression 'ffn_(down'"),
        (["class:experts=q4_k"], "unknown tensor class in rule 'class:experts'"),
        (["no-type-given"], "is not REGEX=TYPE"),
        (["=q4_k"], "is not REGEX=TYPE"),
    ],
)
def test_bad_rules_raise_one_line(rules: list[str], message: str):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")) as info:
        get_recipe(DEFAULT_RECIPE, rules)
    assert "\n" not in str(info.value)


def test_unknown_preset():
    with pytest.raises(RecipeError, match="unknown recipe 'attn-fp8'.*attn-bf16-iq4xs"):
        get_recipe("attn-fp8")


def test_shape_fallback_follows_llama_cpp():
    assert SHAPE_FALLBACK["iq4_xs"] == SHAPE_FALLBACK["iq3_s"] == SHAPE_FALLBACK["iq2_xxs"] == "iq4_nl"
    assert (SHAPE_FALLBACK["q4_k"], SHAPE_FALLBACK["q5_k"], SHAPE_FALLBACK["q6_k"]) == ("q5_0", "q5_1", "q8_0")
    odd = spec("blk.0.ffn_down_exps.weight", (8, 256, 288), "routed_expert")  # 288 = 9 x 32
    assert resolve_type(odd, "iq4_xs") == ("iq4_nl", "iq4_xs -> iq4_nl: 288 columns not a multiple of 256")
    assert resolve_type(odd, "q5_k") == ("q5_1", "q5_k -> q5_1: 288 columns not a multiple of 256")
    assert resolve_type(odd, "q8_0") == ("q8_0", None)
    weird = spec("blk.0.ffn_down_exps.weight", (8, 256, 72), "routed_expert")  # not even 32 divides
    assert resolve_type(weird, "iq4_xs") == ("bf16", "iq4_xs -> bf16: 72 columns not a multiple of 256, nor of 32 for iq4_nl")
    assert resolve_type(weird, "q4_0") == ("bf16", "q4_0 -> bf16: 72 columns not a multiple of 32")
    with pytest.raises(RecipeError, match="no shape fallback is defined for q1_0"):
        resolve_type(weird, "q1_0")


def test_preserved_and_protected_tensors_never_fall_back():
    odd = spec("blk.0.attn_q.weight", (64, 72))
    assert resolve_type(odd, "bf16") == ("bf16", None)
    assert resolve_type(odd, "f16") == ("f16", None)
    assert resolve_type(NORM, "q8_0") == ("f32", "q8_0 -> f32: 1-D tensors are never quantized")
    assert resolve_type(ROUTER, "q4_k") == ("f32", "q4_k -> f32: the expert router is never quantized")
