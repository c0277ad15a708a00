"""`coder-quant plan SRC_DIR`: what `build` would write, from config.json and tensor headers only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from quantizer.arch import get_arch
from quantizer.build import checkpoint_specs, validate_sources
from quantizer.errors import CheckpointError
from quantizer.plan import Plan, make_plan, render_text
from quantizer.recipes import DEFAULT_RECIPE, PRESETS, get_recipe
from quantizer.source import open_checkpoint, read_weight_map
from quantizer.spec import TensorSpec


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--recipe and --rule, shared by `plan` and `build` so both read the policy the same way."""
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        metavar="NAME",
        help=f"precision preset (default {DEFAULT_RECIPE}): " + ", ".join(PRESETS),
    )
    parser.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="REGEX=TYPE",
        help="tensor-name regex (or class:NAME) -> llama.cpp type or 'keep'; first match wins, "
        "before the preset's rules; repeatable",
    )


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'}: not a JSON object")
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    return config


def specs_for_source(folder: Path) -> list[TensorSpec]:
    """Tensor specs from the safetensors headers when the shards are there, else config.json alone.

    With only config.json (and perhaps the shard index) the plan can be made before downloading.
    """
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    if any(folder.glob("*.safetensors")):
        checkpoint = open_checkpoint(folder)
        try:
            specs = checkpoint_specs(checkpoint)
            validate_sources(checkpoint, specs)  # the headers check the config, as `build` does
            return specs
        finally:
            checkpoint.close()
    config = _read_config(folder)
    arch = get_arch(config)
    # From config.json alone nothing checks the sizes, and the architecture fills a missing key with
    # transformers' default, which would price another model; with shards their headers check them.
    for key in getattr(arch, "SHAPE_KEYS", ()):
        if key not in config:
            raise CheckpointError(f"{folder / 'config.json'}: missing {key!r}, needed to size the tensors")
    weight_map = read_weight_map(folder) or {}
    return arch.specs_from_config(config, set(weight_map) or None)


def plan_for(folder: Path, recipe: str | None, rules: list[str]) -> Plan:
    return make_plan(specs_for_source(folder), get_recipe(recipe, rules))


def run(args: argparse.Namespace) -> int:
    plan = plan_for(args.src_dir, args.recipe, args.rule)
    print(plan.to_json() if args.json else render_text(plan, per_tensor=not args.summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="print the type, bytes and rule of every tensor `build` would write",
        description="Plan a build from config.json (and tensor headers if present); reads no weights.",
    )
    parser.add_argument("src_dir", type=Path, metavar="SRC_DIR", help="Hugging Face checkpoint folder")
    add_recipe_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable plan")
    parser.add_argument("--summary", action="store_true", help="totals only, no per-tensor table")
    parser.set_defaults(handler=run)
