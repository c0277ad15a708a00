"""Write a JSON digest of a GGUF: per tensor (name, type, shape, sha256 of data bytes), per key.

Used to freeze llama.cpp's own conversion of the reference model as test data
(tests/data/reference-bf16-digest.json), so the test suite can check `coder-quant build
--recipe bf16` against it without llama.cpp's Python converter (and torch) installed. Run it from
the repository root with the project importable (`pip install -e .` or PYTHONPATH=.).

How tests/data/reference-bf16-digest.json was produced:

  1. Converter: convert_hf_to_gguf.py of the llama.cpp tree vendored in llama-cpp-python 0.3.36,
     with its own gguf-py (0.19.0), torch 2.13.0 (CPU), run on ../shared/reference-model as
         convert_hf_to_gguf.py reference-model --outtype bf16 --no-mtp --outfile reference-bf16.gguf
     That converter identifies BPE pre-tokenizers by hashing sample output and does not know this
     small vocabulary; the run answered "qwen2" there (the reference tokenizer uses Qwen's
     pre-tokenizer pattern, as real Qwen3 checkpoints do). Nothing else was changed.
     Result: 73 tensors (42 BF16, 31 F32), tokenizer.ggml.pre = qwen2.
     The converter reads config.json through transformers' AutoConfig, which fills in derived
     keys such as layer_types; transformers 5.24.0 and 4.57.6 (the converter's pinned version)
     gave byte-identical files.
  2. python scripts/reference_digest.py reference-bf16.gguf tests/data/reference-bf16-digest.json \
         --source ../shared/reference-model

The synthetic-*-digest.json files were made the same way from checkpoints written by
quantizer.synthetic.write_checkpoint(DIR, **ARGS) into a folder named "synthetic-tiny" (the
converter derives general.name from the folder name), with ARGS recorded in the file:

  python scripts/reference_digest.py OUT.gguf tests/data/synthetic-NAME-bf16-digest.json \
      --source DIR --synthetic '{"preset": "tiny", ...}'

`--source` records the sha256 of every file of the checkpoint, so a test can tell a changed
source (e.g. a new numpy random stream) from a changed conversion.

Shapes are in GGUF order (ne0 first), as llama.cpp and gguf-py list them. Arrays longer than 64
elements and strings longer than 512 bytes are recorded as sha256 + length (see
quantizer.inspect.digest_value).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from quantizer.inspect import digest

PRODUCED_BY = (
    "llama.cpp convert_hf_to_gguf.py as vendored in llama-cpp-python 0.3.36, "
    "--outtype bf16 --no-mtp, BPE pre-tokenizer answered as qwen2"
)


def source_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in a checkpoint folder, by file name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def to_json(record: dict) -> str:
    """Indented JSON with one line per tensor and per key, so diffs stay readable."""
    lines = ["{"]
    items = list(record.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, list):
            rows = [json.dumps(v, ensure_ascii=False) for v in value]
            lines.append(f" {json.dumps(key)}: [\n  " + ",\n  ".join(rows) + f"\n ]{comma}")
        elif isinstance(value, dict):
            rows = [f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in value.items()]
            lines.append(f" {json.dumps(key)}: {{\n  " + ",\n  ".join(rows) + f"\n }}{comma}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}{comma}")
    return "\n".join(lines) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="GGUF file to digest")
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--produced-by", default=PRODUCED_BY, help="note recorded in the digest")
    parser.add_argument("--source", type=Path, help="checkpoint folder the GGUF was converted from")
    parser.add_argument("--synthetic", type=json.loads, help="write_checkpoint arguments (JSON object)")
    args = parser.parse_args(argv)
    record: dict = {"produced_by": args.produced_by}
    if args.synthetic is not None:
        record["synthetic"] = args.synthetic
    if args.source is not None:
        record["source_sha256"] = source_hashes(args.source)
    record.update(digest(args.gguf))
    args.out.write_text(to_json(record))
    print(f"{args.out}: {len(record['tensors'])} tensors, {len(record['metadata'])} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
