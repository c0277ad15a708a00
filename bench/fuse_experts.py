"""Rewrite a GGUF with each layer's routed gate and up experts in one tensor, ffn_gate_up_exps.

llama.cpp (qwen3next among others) takes either layout. Fused, a layer's expert products on the CPU
are two MUL_MAT_ID operations instead of three, each expert's rows twice as many: fewer hand-offs
between llama.cpp's threads per token. bench/gpu_levers.py measures it as the "fused gate_up"
variant. The quantized rows are moved, not requantized (llama.cpp quantizes row by row), so the
fused file computes the same products; tests/server/test_bench_scripts.py checks its logits against
the original's.

    python bench/fuse_experts.py IN.gguf OUT.gguf
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

GATE = re.compile(r"^blk\.(\d+)\.ffn_gate_exps\.weight$")


def fuse(src: Path, dst: Path) -> int:
    """Write the fused copy of `src` to `dst` (whole or not at all); returns how many layers were fused."""
    try:
        reader = GGUFReader(src)
        arch = str(reader.fields["general.architecture"].contents())
    except (ValueError, KeyError, IndexError, OverflowError) as exc:
        raise ValueError(f"{src}: not a readable GGUF file") from exc
    tensors = {t.name: t for t in reader.tensors}
    tmp = dst.with_name(f".{dst.name}.partial")  # renamed into place when whole
    try:
        writer = GGUFWriter(tmp, arch, endianess=reader.endianess)
        if reader.alignment != writer.data_alignment:
            writer.data_alignment = reader.alignment
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue  # the writer adds these itself
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
        fused = 0
        for t in reader.tensors:
            name = t.name
            if re.match(r"^blk\.\d+\.ffn_up_exps\.weight$", name) and name.replace("up", "gate", 1) in tensors:
                continue  # written with its gate
            gate = GATE.match(name)
            up = tensors.get(f"blk.{gate.group(1)}.ffn_up_exps.weight") if gate else None
            if gate and up is not None:
                if up.tensor_type != t.tensor_type or up.data.shape != t.data.shape:
                    raise ValueError(f"{name} and {up.name} differ in type or shape; they cannot be fused")
                # gate's rows, then up's, per expert: llama.cpp splits the product at n_ff
                data = np.concatenate([np.asarray(t.data), np.asarray(up.data)], axis=-2)
                writer.add_tensor(f"blk.{gate.group(1)}.ffn_gate_up_exps.weight", data, raw_dtype=t.tensor_type)
                fused += 1
                continue
            writer.add_tensor(name, t.data, raw_dtype=t.tensor_type)  # shapes in bytes for quantized types
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return fused


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    args = p.parse_args(argv)
    if not args.src.is_file():
        print(f"fuse_experts: {args.src}: no such file", file=sys.stderr)
        return 2
    if not args.dst.parent.is_dir():
        print(f"fuse_experts: {args.dst.parent}: no such folder", file=sys.stderr)
        return 2
    if args.dst.resolve() == args.src.resolve():
        print("fuse_experts: the output must differ from the input", file=sys.stderr)
        return 2
    try:
        layers = fuse(args.src, args.dst)
    except (ValueError, OSError) as exc:
        print(f"fuse_experts: {exc}", file=sys.stderr)
        return 1
    if not layers:
        print(f"fuse_experts: {args.src} has no separate gate and up expert tensors", file=sys.stderr)
        args.dst.unlink()
        return 1
    print(f"fused gate and up experts in {layers} layers: {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
