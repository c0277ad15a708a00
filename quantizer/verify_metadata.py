"""What `coder-quant verify` checks besides the tensors' values: the recipe the file records (each
tensor's stored type must be the one that recipe's plan gives it) and the hyper-parameters the
architecture module writes from config.json, read back key by key."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import gguf
import numpy as np
from gguf import GGUFReader, GGUFValueType

from quantizer import ggml
from quantizer.errors import RecipeError
from quantizer.inspect import field_value
from quantizer.plan import Plan
from quantizer.recipes import KEEP, Recipe, Rule
from quantizer.spec import TensorClass, TensorSpec
from quantizer.writer import KEY_RECIPE, KEY_RULES, file_type

# Classes kept in their reference type when the file records no recipe to say otherwise (as every
# attn-bf16-* preset keeps them; norms and the router llama-quantize never quantizes).
PRESERVED_CLASSES: frozenset[TensorClass] = frozenset({"attention", "ssm", "shared_expert", "norm", "router"})
# GGUF stores these hyper-parameters as float32: a value read back may differ from config.json's by
# float32 rounding (half an ulp, 2**-24 relative), never by more.
FLOAT32_RTOL = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class MetadataCheck:
    key: str
    stored: Any  # as read back; None when the key is absent
    expected: Any  # what the writer derives from config.json (or, for general.file_type, the plan)
    ok: bool
    detail: str = ""  # why a key failed


def parse_rule(text: str) -> Rule | None:
    """One `coder_quant.recipe.rules` entry, "PATTERN=TYPE (label)" as `build` records it, or None.

    Labels may hold parentheses and patterns '=' or " (": the split taken is the first " (" whose
    left side ends in "=TYPE" with a known type."""
    if not text.endswith(")"):
        return None
    start = text.find(" (")
    while start >= 0:
        pattern, sep, qtype = text[:start].rpartition("=")
        if sep and pattern and (qtype == KEEP or qtype in ggml.TYPES):
            try:
                return Rule(pattern, qtype, text[start + 2 : -1])
            except RecipeError:
                return None
        start = text.find(" (", start + 1)
    return None


def recorded_recipe(reader: GGUFReader) -> tuple[Recipe | None, list[MetadataCheck]]:
    """The recipe the file says it was built with (rules as recorded, user rules first), and a failed
    check for each rule that cannot be read back. (None, []) when the file records no recipe."""
    name_field, rules_field = reader.fields.get(KEY_RECIPE), reader.fields.get(KEY_RULES)
    if name_field is None or rules_field is None:
        return None, []
    texts = [str(t) for t in field_value(rules_field) or ()]
    rules = [parse_rule(t) for t in texts]
    bad = [MetadataCheck(KEY_RULES, t, "PATTERN=TYPE (label)", False, f"rule {i} {t!r} cannot be read back")
           for i, (t, r) in enumerate(zip(texts, rules, strict=True)) if r is None]
    if bad or not rules:
        return None, bad or [MetadataCheck(KEY_RULES, [], "rules", False, "records no rule")]
    return Recipe(str(field_value(name_field)), "as recorded in the file", tuple(r for r in rules if r)), []


def planned_types(specs: list[TensorSpec], plan: Plan | None) -> dict[str, tuple[str, str]]:
    """Tensor name -> (type it must be stored in, why): the recorded recipe's plan, or without one the
    reference type for PRESERVED_CLASSES and 1-D tensors (other tensors may hold any type)."""
    if plan is not None:
        return {e.name: (e.type, f"recipe {plan.recipe} plans {e.type} ({e.rule})") for e in plan.entries}
    return {s.name: (s.base_type, f"no recipe is recorded, so a {s.tclass} tensor keeps its reference type {s.base_type}")
            for s in specs if s.tclass in PRESERVED_CLASSES or len(s.shape) < 2}


def expected_metadata(module: ModuleType, config: dict[str, Any], ftype: int) -> dict[str, gguf.GGUFValue]:
    """The key/values the architecture module writes for `config`, exactly as `build` writes them."""
    writer = gguf.GGUFWriter(path=None, arch=module.GGUF_ARCH)
    module.add_hparams(writer, config, ftype)
    return dict(writer.kv_data[0])


def _same(stored: Any, expected: Any, vtype: GGUFValueType) -> bool:
    if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        return bool(abs(float(stored) - float(expected)) <= FLOAT32_RTOL * abs(float(expected)))
    if isinstance(expected, (list, tuple)):
        return isinstance(stored, list) and len(stored) == len(expected) and all(
            s == e for s, e in zip(stored, expected, strict=True))
    return bool(stored == expected)


def check_metadata(reader: GGUFReader, expected: dict[str, gguf.GGUFValue], origin: str) -> list[MetadataCheck]:
    """Each expected key read back from the file: present, of the same GGUF type, the same value."""
    checks = []
    for key, want in expected.items():
        field = reader.fields.get(key)
        if field is None:
            checks.append(MetadataCheck(key, None, want.value, False, f"missing; {origin} gives {want.value!r}"))
            continue
        got, vtype = field_value(field), GGUFValueType(field.types[0])
        if vtype != want.type:
            checks.append(MetadataCheck(key, got, want.value, False, f"stored as {vtype.name}, expected {want.type.name}"))
        elif not _same(got, want.value, want.type):
            checks.append(MetadataCheck(key, got, want.value, False, f"is {got!r}, {origin} gives {want.value!r}"))
        else:
            checks.append(MetadataCheck(key, got, want.value, True))
    return checks


def metadata_checks(reader: GGUFReader, module: ModuleType, config: dict[str, Any],
                     plan: Plan | None) -> list[MetadataCheck]:
    """Hyper-parameters against config.json; general.file_type against the plan when there is one
    (general.architecture was checked first, as a condition for everything else)."""
    expected = expected_metadata(module, config, int(file_type(plan.entries)) if plan is not None else 0)
    del expected[gguf.Keys.General.ARCHITECTURE]
    planned = {gguf.Keys.General.FILE_TYPE: expected.pop(gguf.Keys.General.FILE_TYPE)}
    checks = check_metadata(reader, expected, "config.json")
    if plan is not None:
        checks += check_metadata(reader, planned, f"the plan of recipe {plan.recipe}")
    return checks
