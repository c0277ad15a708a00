"""Speed levers for `--gpu-layers attn`: each one changed alone against the server's defaults, in one run.

Re-run on any machine with an NVIDIA GPU and llama-cpp-python built with CUDA (scripts/gpu-run.sh
installs it offline), from the repository root:

    python bench/gpu_levers.py --out results/                 # 4 layers of Qwen3-Coder-Next's shapes
    python bench/gpu_levers.py --out results/ --phase build   # only write the GGUFs (one per expert type)
    python bench/gpu_levers.py --out dry/ --shape tiny --types iq4_xs --prompts 64 256 --decode 16

What it does:
  1. one synthetic checkpoint with Qwen3-Coder-Next's layer shapes (quantizer.synthetic), built by
     coder-quant once per routed-expert type (`--types`; IQ4_XS is the default recipe; Q4_0, Q4_K,
     IQ4_NL and Q8_0 have repacked CPU layouts in llama.cpp on AVX2 machines, used only where the
     experts are not in the GPU's pinned host buffer: `--no-host-buffer`);
  2. the host's memory read bandwidth (numpy, one slice per thread) and from it the decode bound:
     bandwidth / routed-expert bytes read per token (top-k experts x 3 matrices x every layer);
  3. for each variant a fresh process loads the GGUF through server.loader with `attn` placement and
     times llama_decode for prompts and token-by-token decode (bench/gpu.py's raw measurement). The
     baseline is the server's defaults; every other variant changes one thing. The baseline runs first
     and last, so the spread between its two runs shows the noise.
Writes levers.json and levers.md into --out after every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402  (bench/gpu.py: helpers shared with the placement benchmark)

ROOT = gpu.ROOT
RECIPE_RULES = {"iq4_xs": [], "q4_k": ["--recipe", "attn-bf16-q4k"], "iq4_nl": ["--rule", "class:routed_expert=iq4_nl"],
                "q4_0": ["--rule", "class:routed_expert=q4_0"], "q8_0": ["--recipe", "attn-bf16-q8"],
                # the same IQ4_XS experts, the GPU's preserved tensors in F16 instead of BF16
                "iq4_xs_f16": ["--recipe", "attn-f16-iq4xs"]}
FUSED = "_fused"  # a type's GGUF with gate and up experts in one tensor (bench/fuse_experts.py)
MODEL_TYPES = sorted([*RECIPE_RULES, *(t + FUSED for t in RECIPE_RULES)])


def build_models(args: argparse.Namespace) -> dict[str, Path]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stem = f"{args.shape}-L{args.layers}" + (f"-e{args.experts}" if args.experts else "")
    hf = work / f"hf-{stem}"
    out: dict[str, Path] = {}

    def build(qtype: str) -> Path:
        gguf_path = work / f"{stem}-{qtype}.gguf"
        if qtype == "iq4_xs" and not gguf_path.exists() and (work / f"{stem}.gguf").exists():
            gguf_path = work / f"{stem}.gguf"  # the placement benchmark's build
        if gguf_path.exists():
            pass
        elif qtype.endswith(FUSED):
            from fuse_experts import fuse

            fuse(build(qtype.removesuffix(FUSED)), gguf_path)
            gpu.log(f"fused gate and up experts: {gguf_path}")
        else:
            if not (hf / "config.json").exists():
                gpu.log(f"writing synthetic checkpoint {hf}")
                gpu.write_bench_checkpoint(hf, args.shape, args.layers, args.experts)
            gpu.log(f"building {gguf_path}")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "quantizer.cli", "build", str(hf), str(gguf_path), "--quiet",
                            *RECIPE_RULES[qtype]], cwd=ROOT, env=gpu.child_env(), check=True)
            gpu.log(f"built in {time.perf_counter() - t0:.0f} s")
        out[qtype] = gguf_path
        return gguf_path

    for qtype in args.types:
        build(qtype)
    return out


def read_bandwidth(gib: float = 4.0, threads: int | None = None, repeats: int = 3) -> float:
    """Bytes per second that `threads` threads read from RAM, each summing its own slice (numpy
    releases the GIL in the reduction). The best of `repeats`."""
    threads = threads or os.cpu_count() or 1
    data = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    slices = np.array_split(data, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.sum, args=(s,)) for s in slices]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - t0))
    return best


def expert_bytes_per_token(gguf_path: Path) -> int:
    """Routed-expert bytes one decoded token reads: per layer, n_expert_used of n_expert experts of
    each stacked *_exps tensor."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    arch = str(bytes(reader.get_field("general.architecture").parts[-1]), "utf-8")

    def scalar(key: str) -> int:
        return int(reader.get_field(f"{arch}.{key}").parts[-1][0])

    n_expert, used = scalar("expert_count"), scalar("expert_used_count")
    total = sum(int(t.n_bytes) for t in reader.tensors if t.name.endswith("_exps.weight"))
    return total * used // n_expert


def variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {"type": "iq4_xs"}
    out = [{"label": "baseline", **base}]
    out += [{"label": f"threads {n}", **base, "threads": n} for n in args.threads]
    out += [{"label": f"ubatch {n}", **base, "ubatch": n} for n in args.ubatch]
    out += [{"label": "mmap", **base, "mmap": True},
            {"label": "no pinned host memory", **base, "env": {"GGML_CUDA_NO_PINNED": "1"}},
            {"label": "flash attention off", **base, "flash_attn": False}]
    # Between the GPU's parts of a token the CPU threads wait: OpenMP's wait policy and thread pinning
    # decide how quickly they start the next expert products; CUDA graphs (one per GPU part) cut launches.
    out += [{"label": "omp active wait", **base, "env": {"OMP_WAIT_POLICY": "active"}},
            {"label": "omp threads pinned", **base, "env": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}},
            {"label": "cuda graphs off", **base, "env": {"GGML_CUDA_DISABLE_GRAPHS": "1"}}]
    # Before Ampere, llama.cpp multiplies BF16 matrices of more than 8 tokens through cuBLAS in F32;
    # the variable forces that compute type on every cuBLAS product, which prices the BF16 warning's
    # path on this GPU (not on an older one, whose F32 rate is far lower).
    out.append({"label": "bf16 gemm in f32", **base, "env": {"GGML_CUDA_CUBLAS_COMPUTE_TYPE": "f32"}})
    # Without the GPU's pinned host buffer llama.cpp may repack experts into its CPU layouts (types that
    # have one); "no repack" beside it isolates what the repacking itself does.
    out.append({"label": "iq4_xs, no host buffer", **base, "host_buffer": False})
    # Out of the pinned buffer, the experts are in glibc's malloc memory; with this tunable glibc asks for
    # transparent huge pages there (madvise), so the expert reads walk 2 MiB pages instead of 4 KiB ones.
    out.append({"label": "iq4_xs, no host buffer, huge pages", **base, "host_buffer": False,
                "env": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}})
    for qtype in args.types:
        if qtype.endswith(FUSED):  # the one change against its own type's baseline
            out.append({"label": f"{qtype.removesuffix(FUSED)} fused gate_up", "type": qtype})
        elif qtype == "iq4_xs_f16":
            out.append({"label": "iq4_xs, F16 on the GPU", "type": qtype})
        elif qtype != "iq4_xs":
            out += [{"label": f"{qtype}", "type": qtype},
                    {"label": f"{qtype}, no host buffer", "type": qtype, "host_buffer": False},
                    {"label": f"{qtype}, no host buffer, no repack", "type": qtype, "host_buffer": False, "repack": False}]
    out.append({"label": "server defaults", **base, "threads": None, "ubatch": None, "batch": None})
    out.append({"label": "baseline again", **base})
    return out


def measure(args: argparse.Namespace, gguf_path: Path, variant: dict[str, Any], vocab: int) -> dict[str, Any]:
    spec = {"gguf": str(gguf_path), "gpu_layers": "attn", "cpu_moe_layers": None, "ctx_size": args.ctx_size,
            "threads": variant.get("threads", args.base_threads or max(1, (os.cpu_count() or 2) // 2)), "vocab": vocab,
            "batch": variant["batch"] if "batch" in variant else max(args.batch, variant.get("ubatch", 0)),
            "ubatch": variant.get("ubatch", args.base_ubatch),
            "prompts": args.prompts, "decode": args.decode, "repeat": args.repeat,
            **{k: variant[k] for k in ("mmap", "repack", "host_buffer", "flash_attn") if k in variant}}
    env = gpu.child_env() | dict(args.with_env) | variant.get("env", {})
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--raw", json.dumps(spec)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.load_timeout + 600)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(report: dict[str, Any]) -> str:
    sizes = list(dict.fromkeys(str(p) for p in report["settings"]["prompts"]))  # one column per prompt length
    base = next((r for r in report["results"] if "raw" in r), None)
    lines = [f"# Speed levers, `--gpu-layers attn` ({report['shape']}, {report['layers']} layers"
             + (f", {report['experts']} experts a layer" if report.get("experts") else "") + ")", "",
             f"Machine: {json.dumps(report['machine'])}",
             f"Read bandwidth: {report['bandwidth_gb_s']:.1f} GB/s ({report['bandwidth_threads']} threads, numpy; "
             + (f"the higher of {report['bandwidth_before_gb_s']:.1f} before and "
                f"{report['bandwidth_after_gb_s']:.1f} after the variants)" if "bandwidth_after_gb_s" in report
                else "measured before the variants; the reading after them was not taken)"),
             f"Environment for every variant: {json.dumps(report.get('with_env', {}))}", "",
             "| variant | threads (decode/batch) | " + "".join(f"pp{n} tok/s | " for n in sizes)
             + "decode tok/s | first 32 / after | decode / baseline | decode / bound | CPU buffers |",
             "|---|---|" + "---|" * len(sizes) + "---|---|---|---|---|"]
    for r in report["results"]:
        if "raw" not in r:
            lines.append(f"| {r['label']} | error: {' '.join(r.get('error', '').split())[:100]} |" + "|" * (len(sizes) + 5))
            continue
        raw, bound = r["raw"], r["bound_tok_s"]
        dec = raw.get("decode_tok_s")
        head, tail = raw.get("decode_head_tok_s"), raw.get("decode_tail_tok_s")
        split = f"{gpu.fmt(head)} / {gpu.fmt(tail)}" if head and tail else ""
        huge = raw.get("rss_mib", {}).get("AnonHugePages")
        cpu_bufs = (f"huge pages {huge} MiB; " if huge else "") + ", ".join(f"{k} {v / gpu.MiB:.0f} MiB" for k, v in raw["summary"]["buffers"].get("model", {}).items()
                             if not k.startswith("CUDA") or k == "CUDA_Host")
        lines.append(
            f"| {r['label']} | {raw.get('n_threads')}/{raw.get('n_threads_batch')} "
            + "".join(f"| {gpu.fmt(raw['prompts'].get(n, {}).get('prompt_tok_s'))} " for n in sizes)
            + f"| {gpu.fmt(dec)} | {split} | {gpu.ratio(dec, base['raw'].get('decode_tok_s'))} "
            f"| {(dec / bound * 100) if dec else 0:.0f} % of {bound:.0f} | {cpu_bufs} |")
    lines += ["", "Bound = read bandwidth / routed-expert bytes per decoded token (that type's file). "
              "Raw llama_decode timings in a fresh process per variant; medians of the repeats.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for levers.json and levers.md")
    p.add_argument("--work", default=str(ROOT / "build" / "gpu-bench"), help="checkpoint and GGUFs")
    p.add_argument("--phase", choices=("build", "measure", "all"), default="all")
    p.add_argument("--shape", default="coder-next")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=None,
                   help="routed experts per layer (default: the shape's); fewer experts keep each token's "
                        "expert reads but shrink the files, e.g. for all 48 layers of Coder-Next")
    p.add_argument("--cycles", type=int, default=1, help="run the chosen variants this many times in turn")
    p.add_argument("--types", nargs="+", default=["iq4_xs", "q4_k", "iq4_nl"], choices=MODEL_TYPES)
    p.add_argument("--threads", nargs="*", type=int, default=[4, 12, 16], help="decode thread counts to try")
    p.add_argument("--ubatch", nargs="*", type=int, default=[1024, 2048, 4096], help="ubatch sizes to try")
    p.add_argument("--only", nargs="*", default=None, help="run only variants whose label starts with one of these")
    p.add_argument("--prompts", nargs="+", type=int, default=[512, 4096])
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--ctx-size", type=int, default=8192)
    # The baseline: the settings these levers were first measured against (llama-cpp-python's 8 decode
    # threads of 16, llama.cpp's batch 2048 / ubatch 512); the server's defaults now follow the winners.
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--base-ubatch", type=int, default=512)
    p.add_argument("--base-threads", type=int, default=None, help="default: llama-cpp-python's (half the CPUs)")
    p.add_argument("--with-env", nargs="*", type=env_pair, default=[], metavar="KEY=VALUE",
                   help="environment for every variant's process (a lever measured on top of the others)")
    p.add_argument("--load-timeout", type=float, default=600)
    return p.parse_args(argv)


def env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = build_models(args)
    if args.phase == "build":
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = read_bandwidth()
    report: dict[str, Any] = {"machine": gpu.machine(), "shape": args.shape, "layers": args.layers,
                              "experts": args.experts,
                              "bandwidth_gb_s": bandwidth / 1e9, "bandwidth_threads": os.cpu_count(),
                              "with_env": dict(args.with_env),
                              "settings": {k: getattr(args, k) for k in ("prompts", "decode", "repeat", "ctx_size", "batch")},
                              "models": {k: {"path": str(v), "bytes": v.stat().st_size,
                                             "expert_bytes_per_token": expert_bytes_per_token(v)} for k, v in models.items()},
                              "results": []}
    vocab = gpu.tokenizer_size(next(iter(models.values())))
    chosen = [v for v in variants(args) if v["type"] in models
              and (args.only is None or any(v["label"].startswith(o) for o in args.only))]
    if args.cycles > 1:  # interleaved, so that a drift of the machine shows in every variant alike
        chosen = [v | {"label": f"{v['label']} ({c + 1})"} for c in range(args.cycles) for v in chosen]
    for variant in chosen:
        gpu.log(f"variant {variant['label']}")
        result: dict[str, Any] = {"label": variant["label"], "variant": variant,
                                  "bound_tok_s": bandwidth / report["models"][variant["type"]]["expert_bytes_per_token"]}
        try:
            result["raw"] = measure(args, models[variant["type"]], variant, vocab)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            gpu.log(result["error"])
        report["results"].append(result)
        (out / "levers.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "levers.md").write_text(markdown(report))
    # Measured again at the end: the bound the table uses is the higher of the two (the harder target).
    after = read_bandwidth()
    report["bandwidth_before_gb_s"], report["bandwidth_after_gb_s"] = bandwidth / 1e9, after / 1e9
    if after > bandwidth:
        for r in report["results"]:
            r["bound_tok_s"] *= after / bandwidth
        report["bandwidth_gb_s"] = after / 1e9
    (out / "levers.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "levers.md").write_text(markdown(report))
    gpu.log(f"wrote {out / 'levers.md'}")
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
