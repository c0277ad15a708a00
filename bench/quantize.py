"""Quantizer benchmark: `coder-quant build` (one pass) beside llama.cpp's two-step path, in one run.

From the repository root, with llama.cpp's converter and a Python that can run it (torch etc.):

    python bench/quantize.py --converter PATH/convert_hf_to_gguf.py --converter-python PATH/python
    python bench/quantize.py --src ../shared/reference-model --json out.json --markdown out.md

--converter / --converter-python default to $LLAMA_CPP_CONVERTER / $LLAMA_CPP_CONVERTER_PYTHON. Without
--src a synthetic checkpoint with Qwen3-Coder-Next's layer shapes is written first (~230 MB).
1. End to end: one pass (`coder-quant build`) vs convert_hf_to_gguf.py --outtype bf16 then
   llama_model_quantize with --tensor-type style overrides, same recipe, same threads; each step a
   child process measured with wait4(): wall, CPU, peak RSS, bytes written (file sizes and the
   kernel's write_bytes). The outputs are compared tensor by tensor.
2. Expert quantization throughput on the same F32 expert tensors: llama_model_quantize (minus a copy
   run that does everything but quantize) vs quantizer.ggml.quantize; bytes compared.
Medians of --repeat runs in alternating order. docs/benchmarks.md ("Quantizer") explains the method.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = "attn-bf16-iq4xs"  # routed experts IQ4_XS, everything else kept: the default recipe
EXPERT_TYPE = "iq4_xs"
EXPERT_PATTERN = r"_exps\.weight$"  # routed-expert GGUF names: blk.N.ffn_{gate,up,down}_exps.weight
TARGETS = {"wall_time": 0.6, "bytes_written": 0.5, "expert_throughput": 0.9}  # from the issue
SYNTHETIC = {"preset": "coder-next", "layers": 1, "n_experts": 16, "vocab": 8192, "shards": 2, "seed": 0}
ENV_CONVERTER, ENV_CONVERTER_PYTHON = "LLAMA_CPP_CONVERTER", "LLAMA_CPP_CONVERTER_PYTHON"
CHILD = "--child"  # argv[1] of the bench's own child processes

# Throwaway wrapper for the converter: its BPE pre-tokenizer check hashes sample output and stops on
# vocabularies it does not know (small test tokenizers); fall back to a named pre-tokenizer then.
CONVERTER_WRAPPER = '''\
import runpy, sys
from pathlib import Path

converter, fallback, *args = sys.argv[1:]
sys.path.insert(0, str(Path(converter).resolve().parent))
sys.argv = [converter, *args]
scope = runpy.run_path(converter, run_name="converter_under_bench")

def family(cls):
    yield cls
    for sub in cls.__subclasses__():
        yield from family(sub)

def with_fallback(original):
    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return fallback
    return get_vocab_base_pre

owners = {c for c in family(scope["ModelBase"]) if "get_vocab_base_pre" in vars(c)}
if not owners:
    sys.exit("bench wrapper: the converter has no get_vocab_base_pre to wrap")
for owner in owners:
    owner.get_vocab_base_pre = with_fallback(owner.get_vocab_base_pre)
scope["main"]()
'''


class BenchError(Exception):
    """A step failed or an input is missing: one line for the user."""


@dataclass(frozen=True)
class Step:
    name: str
    wall_s: float
    cpu_s: float
    max_rss_bytes: int
    write_bytes: int  # storage writes the kernel accounted to the process (ru_oublock x 512)
    output_bytes: int  # sizes of the files the step left behind


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def measure(name: str, cmd: list[str], outputs: list[Path], log_path: Path, env: dict[str, str] | None = None) -> Step:
    """Run one step as a child process; wait4() gives that child's own resource usage."""
    with log_path.open("ab") as out:
        out.write(f"$ {shlex.join(cmd)}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise BenchError(f"{name} failed (exit {proc.returncode}); its output is in {log_path}")
    missing = [str(p) for p in outputs if not p.is_file()]
    if missing:
        raise BenchError(f"{name} did not write {', '.join(missing)}")
    return Step(name, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, usage.ru_oublock * 512,
                sum(p.stat().st_size for p in outputs))


def run_child(args: list[str], log_path: Path) -> dict[str, Any]:
    """This script as a fresh child process; it prints one JSON line last."""
    cmd = [sys.executable, str(Path(__file__).resolve()), CHILD, *args]
    with log_path.open("ab") as err:
        out = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    if out.returncode != 0:
        raise BenchError(f"child {args[0]} failed (exit {out.returncode}); its output is in {log_path}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(paths: list[Path]) -> None:
    """Read files once so every timed step starts with them in the page cache."""
    for path in paths:
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass


# ---- children: llama.cpp's quantizer and ours, each in a fresh process ------------------------


def child_llama_quantize(src: str, dst: str, threads: str, rules_json: str) -> dict[str, Any]:
    """llama_model_quantize with (regex, type) overrides, as llama-quantize --tensor-type passes them."""
    import llama_cpp

    from quantizer import ggml

    rules = json.loads(rules_json)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(threads)
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS  # overrides only apply under a quantized file type
    table = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()
    for slot, (pattern, qtype) in zip(table, rules, strict=False):
        slot.pattern, slot.type = pattern.encode(), ggml.ggml_type(qtype)
    table[len(rules)].pattern, table[len(rules)].type = None, llama_cpp.GGML_TYPE_COUNT
    params.tt_overrides = table
    llama_cpp.llama_backend_init()
    start, cpu = time.perf_counter(), time.process_time()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if rc != 0:
        raise BenchError(f"llama_model_quantize returned {rc}")
    return {"seconds": seconds, "cpu_s": cpu}


def child_ours_quantize(src: str, threads: str, compare: str) -> dict[str, Any]:
    """quantizer.ggml.quantize over every tensor of an F32 GGUF, timed around the calls only."""
    import gguf
    import numpy as np

    from quantizer import ggml

    arrays = {t.name: np.array(t.data) for t in gguf.GGUFReader(src).tensors}  # in memory before timing
    ggml.quantize(arrays[next(iter(arrays))][:1, :8], EXPERT_TYPE)  # load the library outside the clock
    seconds, cpu, results = 0.0, 0.0, {}
    for name, values in arrays.items():
        start, cpu_start = time.perf_counter(), time.process_time()
        results[name] = ggml.quantize(values, EXPERT_TYPE, threads=int(threads))
        seconds, cpu = seconds + time.perf_counter() - start, cpu + time.process_time() - cpu_start
    theirs = {t.name: np.asarray(t.data).view(np.uint8).reshape(-1) for t in gguf.GGUFReader(compare).tensors}
    same = sum(bool(np.array_equal(results[n], theirs.get(n))) for n in results)
    return {"seconds": seconds, "cpu_s": cpu, "values": int(sum(a.size for a in arrays.values())), "tensors": len(results),
            "identical_tensors": same}


def child_main(argv: list[str]) -> int:
    kinds = {"llama-quantize": child_llama_quantize, "ours-quantize": child_ours_quantize}
    print(json.dumps(kinds[argv[0]](*argv[1:])), flush=True)
    return 0


# ---- preparation ------------------------------------------------------------------------------


def resolve_converter(args: argparse.Namespace) -> tuple[Path, Path]:
    converter = args.converter or os.environ.get(ENV_CONVERTER)
    python = args.converter_python or os.environ.get(ENV_CONVERTER_PYTHON)
    if not converter:
        raise BenchError(f"no llama.cpp converter: pass --converter PATH/convert_hf_to_gguf.py or set {ENV_CONVERTER}")
    if not python:
        raise BenchError(f"no Python for the converter (it needs torch): pass --converter-python PATH "
                         f"or set {ENV_CONVERTER_PYTHON}")
    if not Path(converter).is_file():
        raise BenchError(f"converter {converter} does not exist")
    if shutil.which(python) is None:
        raise BenchError(f"converter Python {python} is not an executable")
    return Path(converter).resolve(), Path(shutil.which(python) or python)


def checkpoint_facts(src: Path) -> dict[str, Any]:
    from quantizer.build import checkpoint_specs
    from quantizer.source import open_checkpoint

    checkpoint = open_checkpoint(src)
    specs = checkpoint_specs(checkpoint)
    count = {s.name: math.prod(s.shape) for s in specs}
    experts = sum(count[s.name] for s in specs if s.tclass == "routed_expert")
    files = list(checkpoint.files)
    checkpoint.close()
    return {"path": str(src), "files": [p.name for p in files], "bytes": sum(p.stat().st_size for p in files),
            "parameters": sum(count.values()), "routed_expert_parameters": experts,
            "routed_expert_share": experts / sum(count.values())}


def keep_rules(bf16_gguf: Path) -> list[tuple[str, str]]:
    """Overrides for the two-step path: experts -> EXPERT_TYPE, every other matrix as the BF16 GGUF has it
    (its F32 matrices by exact name, then everything else bf16). 1-D tensors are never requantized."""
    import gguf

    rules = [(EXPERT_PATTERN, EXPERT_TYPE)]
    for t in gguf.GGUFReader(bf16_gguf).tensors:
        kind = t.tensor_type.name.lower()
        if len(t.shape) >= 2 and kind != "bf16" and not t.name.endswith("_exps.weight"):
            rules.append((f"^{t.name.replace('.', '[.]')}$", kind))
    return [*rules, (".", "bf16")]


def compare_outputs(ours: Path, theirs: Path) -> dict[str, Any]:
    import gguf

    def digest(path: Path) -> dict[str, tuple[str, str]]:
        return {t.name: (t.tensor_type.name, hashlib.sha256(memoryview(t.data).cast("B")).hexdigest())
                for t in gguf.GGUFReader(path).tensors}

    a, b = digest(ours), digest(theirs)
    differ = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
    return {"tensors": len(a), "identical": not differ, "differing": differ[:10]}


def write_experts_gguf(src: Path, path: Path) -> int:
    """The checkpoint's routed-expert tensors as float32 in a qwen3next GGUF (hyper-parameters, no vocab)."""
    import gguf
    import numpy as np

    from quantizer import arch as arch_registry
    from quantizer.build import checkpoint_specs
    from quantizer.source import open_checkpoint

    checkpoint = open_checkpoint(src)
    module = arch_registry.get_arch(checkpoint.config)
    writer = gguf.GGUFWriter(path, module.GGUF_ARCH)
    module.add_hparams(writer, checkpoint.config, int(gguf.LlamaFileType.ALL_F32))
    specs = [s for s in checkpoint_specs(checkpoint) if s.tclass == "routed_expert"]
    for spec in specs:
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), 4 * math.prod(spec.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for spec in specs:
        writer.write_tensor_data(module.tensor_f32(checkpoint, spec))
        checkpoint.release()
    writer.close()
    checkpoint.close()
    return len(specs)


# ---- the two measurements ---------------------------------------------------------------------


def fresh(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)


def end_to_end(src: Path, work: Path, converter: Path, python: Path, args: argparse.Namespace) -> dict[str, Any]:
    wrapper, logs = work / "convert_wrapper.py", work / "end-to-end.log"
    wrapper.write_text(CONVERTER_WRAPPER, encoding="utf-8")
    ours, bf16, theirs = work / "one-pass.gguf", work / "two-step-bf16.gguf", work / "two-step.gguf"
    threads = str(args.threads)
    runs: dict[str, list[list[Step]]] = {"one_pass": [], "two_step": []}
    rules: list[tuple[str, str]] = []
    for r in range(args.repeat):
        for path in ("one_pass", "two_step") if r % 2 == 0 else ("two_step", "one_pass"):
            log(f"end to end, repeat {r + 1}/{args.repeat}: {path.replace('_', ' ')}")
            if path == "one_pass":
                fresh(ours)
                cmd = [sys.executable, "-m", "quantizer.cli", "build", str(src), str(ours), "--recipe", RECIPE,
                       "--threads", threads, "--quiet"]
                runs[path].append([measure("coder-quant build", cmd, [ours, ours.with_name(ours.name + ".sha256")], logs)])
                continue
            fresh(bf16, theirs)
            convert = [str(python), str(wrapper), str(converter), args.converter_pre, str(src),
                       "--outtype", "bf16", "--no-mtp", "--outfile", str(bf16)]
            first = measure("convert_hf_to_gguf.py --outtype bf16", convert, [bf16], logs, env=dict(os.environ))
            rules = keep_rules(bf16)  # what a user would pass as --tensor-type, worked out off the clock
            quantize = [sys.executable, str(Path(__file__).resolve()), CHILD, "llama-quantize", str(bf16), str(theirs),
                        threads, json.dumps(rules)]
            second = measure("llama_model_quantize", quantize, [theirs], logs)
            runs[path].append([first, second])
    totals = {path: [total(steps) for steps in reps] for path, reps in runs.items()}
    median = {path: {k: statistics.median(t[k] for t in reps) for k in reps[0]} for path, reps in totals.items()}
    ratios = {k: median["one_pass"][k] / median["two_step"][k] for k in median["one_pass"]}
    return {"runs": {p: [[asdict(s) for s in steps] for steps in reps] for p, reps in runs.items()},
            "median": median, "ratios": ratios, "outputs_compared": compare_outputs(ours, theirs),
            "override_rules": rules}


def total(steps: list[Step]) -> dict[str, float]:
    return {"wall_s": sum(s.wall_s for s in steps), "cpu_s": sum(s.cpu_s for s in steps),
            "max_rss_bytes": max(s.max_rss_bytes for s in steps), "write_bytes": sum(s.write_bytes for s in steps),
            "output_bytes": sum(s.output_bytes for s in steps)}


def expert_throughput(src: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    f32, quant, copy = work / "experts-f32.gguf", work / "experts-llama.gguf", work / "experts-copy.gguf"
    log("writing the experts-only F32 GGUF")
    tensors = write_experts_gguf(src, f32)
    warm([f32])
    threads = str(args.threads)
    jobs = {
        "llama": ["llama-quantize", str(f32), str(quant), threads, json.dumps([(EXPERT_PATTERN, EXPERT_TYPE)])],
        "llama_copy": ["llama-quantize", str(f32), str(copy), threads, json.dumps([(".", "f32")])],
        "ours": ["ours-quantize", str(f32), threads, str(quant)],  # compares its bytes with llama's output
    }
    runs: list[dict[str, dict[str, float]]] = []
    identical, values = [], 0
    for r in range(args.repeat):
        row = {}
        for key in list(jobs) if r % 2 == 0 else list(jobs)[::-1]:
            log(f"expert quantization, repeat {r + 1}/{args.repeat}: {key.replace('_', ' ')}")
            fresh({"llama": quant, "llama_copy": copy}.get(key, work / "nothing"))
            result = run_child(jobs[key], work / "throughput.log")
            row[key] = {"wall_s": result["seconds"], "cpu_s": result["cpu_s"]}
            if key == "ours":
                values = result["values"]
                identical.append(result["identical_tensors"] == result["tensors"] == tensors)
        row["llama_minus_copy"] = {m: row["llama"][m] - row["llama_copy"][m] for m in ("wall_s", "cpu_s")}
        runs.append(row)
    median = {k: {m: statistics.median(r[k][m] for r in runs) for m in ("wall_s", "cpu_s")} for k in runs[0]}
    ratios = {f"ours_vs_{k}_{m[:-2]}": median[k][m] / median["ours"][m]
              for k in ("llama", "llama_minus_copy") for m in ("wall_s", "cpu_s")}
    return {"tensors": tensors, "values": values, "f32_bytes": 4 * values, "runs": runs, "median": median,
            "ratios": ratios, "identical_bytes": all(identical)}


# ---- report -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), None) if Path("/proc/meminfo").exists() else None
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "system": platform.platform(),
            "memory_gib": round(int(mem) / 2**20, 1) if mem else None, "python": platform.python_version(),
            "llama_cpp_python": version("llama-cpp-python")}


def targets(e2e: dict[str, Any], tput: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets; throughput is judged against llama.cpp minus its copy run (its best case)."""
    rows = [
        ("end-to-end wall time, one pass / two steps", e2e["ratios"]["wall_s"], "<=", TARGETS["wall_time"]),
        ("bytes written (files), one pass / two steps", e2e["ratios"]["output_bytes"], "<=", TARGETS["bytes_written"]),
        ("expert quantization throughput by wall time, ours / llama.cpp",
         tput["ratios"]["ours_vs_llama_minus_copy_wall"], ">=", TARGETS["expert_throughput"]),
        ("expert quantization throughput by CPU time, ours / llama.cpp",
         tput["ratios"]["ours_vs_llama_minus_copy_cpu"], ">=", TARGETS["expert_throughput"]),
    ]
    return [{"what": what, "value": value, "target": f"{op} {limit}",
             "met": value <= limit if op == "<=" else value >= limit} for what, value, op, limit in rows]


def _step_line(e2e: dict[str, Any]) -> str:
    parts = []
    for i, step in enumerate(e2e["runs"]["two_step"][0]):
        wall = statistics.median(run[i]["wall_s"] for run in e2e["runs"]["two_step"])
        rss = max(run[i]["max_rss_bytes"] for run in e2e["runs"]["two_step"])
        parts.append(f"{step['name']} {wall:.1f} s (peak RSS {rss / 2**20:.0f} MiB)")
    return "Two steps = " + " + ".join(parts) + "."


def markdown(result: dict[str, Any]) -> str:
    e2e, tput, ck = result["end_to_end"], result["expert_quantization"], result["checkpoint"]
    one, two, ratio = e2e["median"]["one_pass"], e2e["median"]["two_step"], e2e["ratios"]
    mib = 2**20
    rows = [
        ("wall time (s)", f"{one['wall_s']:.1f}", f"{two['wall_s']:.1f}", ratio["wall_s"]),
        ("CPU time, user+sys (s)", f"{one['cpu_s']:.1f}", f"{two['cpu_s']:.1f}", ratio["cpu_s"]),
        ("peak RSS (MiB)", f"{one['max_rss_bytes'] / mib:.0f}", f"{two['max_rss_bytes'] / mib:.0f}", ratio["max_rss_bytes"]),
        ("bytes written: files (MiB)", f"{one['output_bytes'] / mib:.1f}", f"{two['output_bytes'] / mib:.1f}",
         ratio["output_bytes"]),
        ("bytes written: write_bytes (MiB)", f"{one['write_bytes'] / mib:.1f}", f"{two['write_bytes'] / mib:.1f}",
         ratio["write_bytes"]),
    ]
    med, r = tput["median"], tput["ratios"]
    speed = [
        ("ours: quantizer.ggml.quantize", med["ours"], 1.0, 1.0),
        ("llama_model_quantize, whole call", med["llama"], r["ours_vs_llama_wall"], r["ours_vs_llama_cpu"]),
        ("llama_model_quantize minus its copy run", med["llama_minus_copy"], r["ours_vs_llama_minus_copy_wall"],
         r["ours_vs_llama_minus_copy_cpu"]),
    ]
    compared = e2e["outputs_compared"]
    load = result["load_average"]
    lines = [
        f"Checkpoint: {ck['label']}: {ck['bytes'] / mib:.0f} MiB of safetensors, {ck['parameters'] / 1e6:.1f} M "
        f"parameters, {100 * ck['routed_expert_share']:.0f}% of them in routed experts. Threads: {result['threads']}. "
        f"Medians of {result['repeat']} run(s). Load average (1 min) {load['start'][0]:.1f} at start, "
        f"{load['end'][0]:.1f} at end.",
        "",
        "| end to end | one pass | two steps | one pass / two steps |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {a} | {b} | {x:.2f} |" for name, a, b, x in rows),
        "",
        _step_line(e2e) + f" Outputs compared tensor by tensor: {compared['tensors']} tensors, "
        + ("identical." if compared["identical"] else "DIFFERENT: " + ", ".join(compared["differing"]) + "."),
        "",
        f"| expert quantization, {tput['tensors']} tensors, {tput['values'] / 1e6:.1f} M values F32 -> IQ4_XS "
        "| wall s | M values/s | CPU s | ours / this, wall | ours / this, CPU |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {m['wall_s']:.2f} | {tput['values'] / m['wall_s'] / 1e6:.2f} | {m['cpu_s']:.2f} | {w:.2f} | {c:.2f} |"
          for name, m, w, c in speed),
        "",
        f"Copy run: {med['llama_copy']['wall_s']:.2f} s wall, {med['llama_copy']['cpu_s']:.2f} s CPU. "
        f"Quantized bytes identical to llama.cpp's: {'yes' if tput['identical_bytes'] else 'NO'}.",
        "",
        "| target | measured | wanted | met |",
        "|---|---:|---|---|",
        *(f"| {t['what']} | {t['value']:.2f} | {t['target']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]),
    ]
    return "\n".join(lines) + "\n"


# ---- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, help="Hugging Face checkpoint folder (default: write a synthetic one)")
    p.add_argument("--layers", type=int, default=SYNTHETIC["layers"], help="synthetic checkpoint: layers")
    p.add_argument("--experts", type=int, default=SYNTHETIC["n_experts"], help="synthetic checkpoint: routed experts")
    p.add_argument("--vocab", type=int, default=SYNTHETIC["vocab"], help="synthetic checkpoint: vocabulary rows")
    p.add_argument("--converter", help=f"llama.cpp's convert_hf_to_gguf.py (default ${ENV_CONVERTER})")
    p.add_argument("--converter-python", help=f"Python with the converter's requirements (default ${ENV_CONVERTER_PYTHON})")
    p.add_argument("--converter-pre", default="qwen2",
                   help="BPE pre-tokenizer the converter falls back to for a vocabulary it does not know (default qwen2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both quantizers (default: all cores)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are reported (default 3)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--json", type=Path, help="write the full result here")
    p.add_argument("--markdown", type=Path, help="write the tables here (they are printed in any case)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeat < 1:
        p.error("--threads and --repeat must be at least 1")
    return args


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    converter, python = resolve_converter(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="coder-quant-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S %Z"), os.getloadavg()
    try:
        if args.src is None:
            from quantizer.synthetic import write_checkpoint

            shape = {**SYNTHETIC, "layers": args.layers, "n_experts": args.experts, "vocab": args.vocab}
            log(f"writing a synthetic checkpoint {shape}")
            src, label = write_checkpoint(work / "synthetic", **shape).path, f"synthetic {shape}"
        else:
            src, label = args.src.resolve(), args.src.name
        facts = {**checkpoint_facts(src), "label": label}
        warm([src / name for name in facts["files"]])
        e2e = end_to_end(src, work, converter, python, args)
        tput = expert_throughput(src, work, args)
    except BaseException:
        log(f"scratch folder kept for inspection: {work}")
        raise
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    result = {"date": started, "command": shlex.join(["python", "bench/quantize.py", *argv]),
              "machine": machine(), "load_average": {"start": load_start, "end": os.getloadavg()},
              "threads": args.threads, "repeat": args.repeat, "recipe": RECIPE, "converter": converter.name,
              "checkpoint": facts, "end_to_end": e2e, "expert_quantization": tput}
    result["targets"] = targets(e2e, tput)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD]:
        return child_main(argv[1:])
    from quantizer.errors import QuantError

    args = parse_args(argv)
    try:
        result = run(args, argv)
    except (BenchError, QuantError) as exc:
        print(f"bench/quantize.py: error: {exc}", file=sys.stderr)
        return 2
    table = markdown(result)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
