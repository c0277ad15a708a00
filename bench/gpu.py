"""GPU placement benchmark: coder-serve over HTTP next to in-process llama.cpp, for each placement.

Re-run on any machine with an NVIDIA GPU and llama-cpp-python built with CUDA (scripts/gpu-run.sh
does the whole job on a machine without network), from the repository root:

    python bench/gpu.py --out results/                    # Qwen3-Coder-Next layer shapes, 4 layers
    python bench/gpu.py --out results/ --layers 8 --cpu-moe 2 4
    python bench/gpu.py --out dry-run/ --shape tiny --prompts 64 256 --decode 16  # minutes, any CPU

Steps:
  1. write a checkpoint with Qwen3-Coder-Next's layer shapes and random weights
     (quantizer.synthetic.write_checkpoint, preset "coder-next") and build it with coder-quant's
     default recipe;
  2. for each placement (attn, all, none, attn with --cpu-moe-layers K):
     a. `coder-serve MODEL --plan --json` (nothing loaded);
     b. coder-serve as a subprocess, measured through HTTP streaming with token-id prompts: time to
        first token and prompt tokens/s for each prompt length, decode tokens/s, GPU memory of the
        process (nvidia-smi), its RSS, and the buffer sizes llama.cpp logged (from /health);
     c. a fresh process loads the same GGUF through server.loader (same overrides) and times
        llama_decode directly: the raw figures that the HTTP ones are set beside;
     d. the plan is checked against the buffer sizes llama.cpp reported (server.loader.compare_buffers).
Writes gpu-bench.json and gpu-bench.md into --out after every placement, so a run cut short still
leaves what it measured. Speeds are reported as measured and as HTTP/raw ratios of the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


# --- utilities --------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_json(cmd: list[str], timeout: float) -> Any:
    out = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({out.returncode}): {out.stderr[-2000:]}")
    text = out.stdout.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # something else printed first: the JSON is the last line
        return json.loads(text.splitlines()[-1])


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODER_SERVE_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nvidia_smi(query: str, *extra: str) -> list[list[str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits", *extra],
                         capture_output=True, text=True, timeout=30)
    return [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def gpu_mib_of(pid: int) -> int | None:
    rows = nvidia_smi("compute-apps=pid,used_memory")
    used = [int(r[1]) for r in rows if len(r) == 2 and r[0] == str(pid) and r[1].isdigit()]
    return sum(used) if used else None


def rss_mib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) // 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "AnonHugePages":  # memory backed by transparent huge pages
                out[key] = int(value.split()[0]) // 1024
    except OSError:
        pass
    return out


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)  # a new prompt per request: no prefix-cache hits between requests
    return [rng.randrange(300, vocab) for _ in range(n)]


def write_bench_checkpoint(hf: Path, shape: str, layers: int, experts: int | None = None) -> None:
    """quantizer.synthetic's checkpoint, one shard per CPU written in parallel (minutes become seconds)."""
    from quantizer.synthetic import write_checkpoint

    cpus = os.cpu_count() or 1
    write_checkpoint(hf, preset=shape, layers=layers, n_experts=experts, shards=max(2, cpus), workers=cpus)


def tokenizer_size(gguf_path: Path) -> int:
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).get_field("tokenizer.ggml.tokens")
    n = len(field.data) if field is not None else 1000
    return max(400, min(n - 300, 150_000))  # ordinary tokens only, clear of the special ones at the end


# --- step 1: the model --------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    work = Path(args.work)
    gguf = Path(args.gguf) if args.gguf else work / f"{args.shape}-L{args.layers}.gguf"
    info: dict[str, Any] = {"gguf": str(gguf), "shape": args.shape, "layers": args.layers, "recipe": "default"}
    if not gguf.exists():
        hf = work / f"hf-{args.shape}-L{args.layers}"
        t0 = time.perf_counter()
        log(f"writing synthetic checkpoint {hf}")
        write_bench_checkpoint(hf, args.shape, args.layers)
        info["checkpoint_seconds"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        log(f"building {gguf} with coder-quant's default recipe")
        subprocess.run([sys.executable, "-m", "quantizer.cli", "build", str(hf), str(gguf), "--quiet"],
                       cwd=ROOT, env=child_env(), check=True)
        info["build_seconds"] = round(time.perf_counter() - t0, 1)
        if not args.keep_checkpoint:
            shutil.rmtree(hf)
    info["gguf_bytes"] = gguf.stat().st_size
    return gguf, info


# --- step 2b: HTTP ------------------------------------------------------------------------------


def stream_completion(port: int, model: str, prompt: list[int], max_tokens: int) -> dict[str, float]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                       "temperature": 0, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t_send = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"completion failed: {resp.status} {resp.read()[:500]!r}")
    t_first = t_last = None
    chunks, usage = 0, {}
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        event = json.loads(line[5:])
        if event.get("choices"):
            now = time.perf_counter()
            t_first = t_first or now
            t_last = now
            chunks += 1
        usage = event.get("usage") or usage
    conn.close()
    t_end = time.perf_counter()
    if t_first is None:
        raise RuntimeError("the stream carried no tokens")
    completion = int(usage.get("completion_tokens", chunks))
    ttft = t_first - t_send
    return {
        "prompt_tokens": int(usage.get("prompt_tokens", len(prompt))),
        "completion_tokens": completion,
        "ttft_s": ttft,
        "total_s": t_end - t_send,
        "prompt_tok_s": len(prompt) / ttft,
        # from chunk arrival times: text the server holds back (an incomplete UTF-8 sequence, a possible
        # stop string) arrives late and skews this; decode_tok_s in measure_http does not depend on it
        "chunk_tok_s": (completion - 1) / (t_last - t_first) if completion > 1 and t_last > t_first else None,
    }


def http_get_json(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def engine_decode_tok_s(port: int) -> float | None:
    """The server's own decode speed for its last request (from /metrics): llama_decode and sampling,
    without the HTTP side."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode("utf-8", "replace")
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith("coder_serve_decode_tokens_per_second "):
            return float(line.split()[-1])
    return None


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"coder-serve exited with {proc.returncode} while loading")
        try:
            status, body = http_get_json(port, "/health")
            if status == 200:
                return body
        except (OSError, http.client.HTTPException, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise RuntimeError("coder-serve did not become healthy in time")


def median_of(runs: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def measure_http(args: argparse.Namespace, gguf: Path, case: dict[str, Any], vocab: int, logfile: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "info", *case["flags"], *common_flags(args)]
    with open(logfile, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=sink, stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        try:
            health = wait_healthy(proc, port, args.load_timeout)
            load_s = time.perf_counter() - t0
            _, models = http_get_json(port, "/v1/models")
            model_id = models["data"][0]["id"]
            stream_completion(port, model_id, prompt_ids(32, vocab, 1), 4)  # warm-up
            out: dict[str, Any] = {"load_s": round(load_s, 1), "prompts": {}}
            seed = 100
            for n in args.prompts:
                runs = []
                for _ in range(args.repeat):
                    seed += 1
                    # one token: its text is sent when the request ends, so the first chunk marks the
                    # first token even where a random model's text would be held back as incomplete UTF-8
                    runs.append(stream_completion(port, model_id, prompt_ids(n, vocab, seed), 1))
                out["prompts"][str(n)] = {k: median_of(runs, k) for k in ("ttft_s", "prompt_tok_s")}
            # Decode speed from whole-request times: a request for `decode` tokens against one for a single
            # token with a prompt of the same length; no chunk timing involved.
            n0, long_runs, short_runs = args.prompts[0], [], []
            engine = []
            for _ in range(args.repeat):
                seed += 2
                long_runs.append(stream_completion(port, model_id, prompt_ids(n0, vocab, seed), args.decode))
                engine.append(engine_decode_tok_s(port))
                short_runs.append(stream_completion(port, model_id, prompt_ids(n0, vocab, seed + 1), 1))
            out["engine_decode_tok_s"] = statistics.median(e for e in engine if e) if any(engine) else None
            extra = statistics.median(r["total_s"] for r in long_runs) - statistics.median(r["total_s"] for r in short_runs)
            generated = statistics.median(r["completion_tokens"] for r in long_runs)
            out["decode_tok_s"] = (generated - 1) / extra if extra > 0 else None
            out["chunk_tok_s"] = median_of(long_runs, "chunk_tok_s")
            out["gpu_mib_smi"] = gpu_mib_of(proc.pid)
            out["rss_mib"] = rss_mib(proc.pid)
            out["placement"] = health.get("placement", {})
            return out
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def common_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--ctx-size", str(args.ctx_size)]
    for name in ("batch", "ubatch", "threads"):  # left out: the server's defaults
        if getattr(args, name):
            flags += [f"--{name}", str(getattr(args, name))]
    return flags


def open_like_server(model: str, serve_flags: list[str], parser: argparse.ArgumentParser) -> tuple[Any, dict[str, Any]]:
    """Load MODEL with coder-serve's flags as coder-serve loads it: OpenMP's binding first where
    --pin-threads asks (OpenMP reads it only when llama.cpp's library loads), then server.loader. A
    missing or unreadable file, or a bad flag, ends the script in one line through parser.error."""
    if not Path(model).is_file():
        parser.error(f"model file not found: {model}")
    from server.cli import build_parser, settings_from_args

    settings = settings_from_args(build_parser().parse_args([model, *serve_flags]))
    if settings.pin_threads:
        from server.affinity import pin_llama_threads

        pin_llama_threads()
    from server.loader import ModelLoadError, open_model
    from server.placement import PlacementError

    try:
        return open_model(model, settings)
    except (ModelLoadError, PlacementError) as exc:
        parser.error(str(exc))


# --- step 2c: raw llama.cpp in a fresh process --------------------------------------------------


DECODE_HEAD = 32  # the first decoded tokens, timed apart from the rest


def raw_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Load through server.loader (the server's own path) and time llama_decode directly."""
    import llama_cpp

    from server.loader import open_model

    settings = SimpleNamespace(gpu_layers=spec["gpu_layers"], cpu_moe_layers=spec["cpu_moe_layers"],
                               ctx_size=spec["ctx_size"], threads=spec["threads"], batch=spec["batch"],
                               **{k: spec[k] for k in ("ubatch", "threads_batch", "mmap", "repack", "host_buffer",
                                                       "flash_attn")
                                  if spec.get(k) is not None})
    t0 = time.perf_counter()
    llm, summary = open_model(spec["gguf"], settings)
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 1), "summary": summary, "prompts": {},
                           "n_threads": llm.n_threads, "n_threads_batch": llm.context_params.n_threads_batch}

    def timed(tokens: list[int]) -> float:
        t = time.perf_counter()
        llm.eval(tokens)
        llama_cpp.llama_synchronize(llm._ctx.ctx)
        return time.perf_counter() - t

    llm.reset()
    timed(prompt_ids(32, spec["vocab"], 1))  # warm-up
    seed = 100
    for n in spec["prompts"]:
        speeds, decode, head, tail = [], [], [], []
        for _ in range(spec["repeat"]):
            seed += 1
            llm.reset()
            speeds.append(n / timed(prompt_ids(n, spec["vocab"], seed)))
            if n == spec["prompts"][0]:
                steps = [timed([t]) for t in prompt_ids(spec["decode"], spec["vocab"], seed + 7)]
                decode.append(len(steps) / sum(steps))
                if len(steps) > DECODE_HEAD:  # does decoding start slower than it goes on?
                    head.append(DECODE_HEAD / sum(steps[:DECODE_HEAD]))
                    tail.append((len(steps) - DECODE_HEAD) / sum(steps[DECODE_HEAD:]))
        out["prompts"][str(n)] = {"prompt_tok_s": statistics.median(speeds)}
        if decode:
            out["decode_tok_s"] = statistics.median(decode)
        if head:
            out["decode_head_tok_s"], out["decode_tail_tok_s"] = statistics.median(head), statistics.median(tail)
    out["gpu_mib_smi"] = gpu_mib_of(os.getpid())
    out["rss_mib"] = rss_mib(os.getpid())
    return out


def measure_raw(args: argparse.Namespace, gguf: Path, case: dict[str, Any], vocab: int) -> dict[str, Any]:
    spec = {"gguf": str(gguf), "gpu_layers": case["gpu_layers"], "cpu_moe_layers": case["cpu_moe_layers"],
            "ctx_size": args.ctx_size, "threads": args.threads, "batch": args.batch, "ubatch": args.ubatch, "vocab": vocab,
            "prompts": args.prompts, "decode": args.decode, "repeat": args.repeat}
    return run_json([sys.executable, str(Path(__file__).resolve()), "--raw", json.dumps(spec)], args.load_timeout + 600)


# --- driving ------------------------------------------------------------------------------------


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = [{"label": p, "gpu_layers": p, "cpu_moe_layers": None, "flags": ["--gpu-layers", p]} for p in args.presets]
    for k in args.cpu_moe:
        out.append({"label": f"attn+cpu-moe={k}", "gpu_layers": "attn", "cpu_moe_layers": k,
                    "flags": ["--gpu-layers", "attn", "--cpu-moe-layers", str(k)]})
    return out


def machine() -> dict[str, Any]:
    import llama_cpp

    gpus = nvidia_smi("gpu=name,memory.total,driver_version")
    return {"gpus": [{"name": g[0], "memory_mib": g[1], "driver": g[2]} for g in gpus if len(g) == 3],
            "cpu_count": os.cpu_count(), **cpu_model(), "python": platform.python_version(),
            "platform": platform.platform(), "llama_cpp_python": llama_cpp.__version__,
            "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}


def cpu_model() -> dict[str, Any]:
    """The CPU's name and the vector extensions that decide llama.cpp's CPU kernels (Linux only)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    flags = set(fields.get("flags\t\t", fields.get("flags", "")).split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return {"cpu": fields.get("model name\t", "").strip(), "cpu_flags": [f for f in wanted if f in flags]}


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def markdown(report: dict[str, Any]) -> str:
    p0, p1 = str(report["settings"]["prompts"][0]), str(report["settings"]["prompts"][-1])
    lines = [
        f"# GPU placement benchmark ({report['model']['shape']}, {report['model']['layers']} layers)",
        "",
        f"Machine: {json.dumps(report['machine'])}",
        f"Model: {json.dumps(report['model'])}",
        "",
        f"| placement | GPU weights MiB | CPU weights MiB | pp{p0} tok/s HTTP (raw) | pp{p1} tok/s HTTP (raw) "
        f"| decode tok/s HTTP (raw) | HTTP/raw decode | engine decode tok/s | TTFT {p0} ms | GPU MiB (smi) | RSS MiB "
        "| plan = llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:80]} |" + " |" * 10)
            continue
        h, raw, plan = r["http"], r["raw"], r["plan"]
        hp, rp = h["prompts"], raw["prompts"]
        lines.append(
            f"| {r['label']} | {plan['weights']['gpu']['total'] / MiB:.0f} | {plan['weights']['cpu']['total'] / MiB:.0f} "
            f"| {fmt(hp[p0]['prompt_tok_s'])} ({fmt(rp[p0]['prompt_tok_s'])}) "
            f"| {fmt(hp.get(p1, {}).get('prompt_tok_s'))} ({fmt(rp.get(p1, {}).get('prompt_tok_s'))}) "
            f"| {fmt(h['decode_tok_s'])} ({fmt(raw.get('decode_tok_s'))}) | {ratio(h['decode_tok_s'], raw.get('decode_tok_s'))} "
            f"| {fmt(h.get('engine_decode_tok_s'))} "
            f"| {fmt(hp[p0]['ttft_s'] * 1000, 0)} | {h.get('gpu_mib_smi') or '-'} | {h['rss_mib'].get('VmRSS', '-')} "
            f"| {'yes' if r['plan_check']['ok'] else 'NO'} |"
        )
    lines += ["", "pp = prompt tokens / time to first token (HTTP) or / llama_decode time (raw); "
              "decode after the first prompt; medians of the repeats.", ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-bench.md").write_text(markdown(report))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for gpu-bench.json and gpu-bench.md (required)")
    p.add_argument("--work", default=str(ROOT / ".offline-bundle" / "work"), help="checkpoint, GGUF and logs")
    p.add_argument("--gguf", help="benchmark this GGUF instead of building one")
    p.add_argument("--shape", default="coder-next", help="synthetic preset: coder-next, demo or tiny")
    p.add_argument("--layers", type=int, default=4, help="layers of the synthetic model")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep the synthetic safetensors")
    p.add_argument("--presets", nargs="+", default=["attn", "all", "none"])
    p.add_argument("--cpu-moe", nargs="*", type=int, default=[2], help="K values for attn + --cpu-moe-layers K")
    p.add_argument("--prompts", nargs="+", type=int, default=[512, 4096], help="prompt lengths in tokens")
    p.add_argument("--decode", type=int, default=128, help="tokens generated after the first prompt")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--ctx-size", type=int, default=8192)
    p.add_argument("--batch", type=int, default=None, help="default: the server's")
    p.add_argument("--ubatch", type=int, default=None, help="default: the server's")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--load-timeout", type=float, default=900)
    p.add_argument("--raw", help=argparse.SUPPRESS)  # internal: one raw measurement, JSON spec
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from server.loader import compare_buffers

    args = parse_args(argv)
    if args.raw:
        print(json.dumps(raw_main(json.loads(args.raw))))
        return 0
    if not args.out:
        print("gpu.py: error: --out is required", file=sys.stderr)
        return 2
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf, model = build_model(args)
    vocab = tokenizer_size(gguf)
    report: dict[str, Any] = {"machine": machine(), "model": model, "results": [],
                              "settings": {k: getattr(args, k) for k in ("prompts", "decode", "repeat", "ctx_size",
                                                                        "batch", "threads")}}
    write_report(out, report)
    for case in cases(args):
        log(f"placement {case['label']}")
        result: dict[str, Any] = {"label": case["label"]}
        try:
            plan_cmd = [sys.executable, "-m", "server.cli", str(gguf), "--plan", "--json", *case["flags"],
                        *common_flags(args)]
            result["plan"] = run_json(plan_cmd, 300)
            result["http"] = measure_http(args, gguf, case, vocab, work / f"serve-{case['label']}.log")
            result["raw"] = measure_raw(args, gguf, case, vocab)
            result["plan_check"] = compare_buffers(result["plan"], result["raw"]["summary"]["buffers"])
            result["plan_check_server"] = compare_buffers(result["plan"], result["http"]["placement"].get("buffers", {}))
            result["plan"] = {k: v for k, v in result["plan"].items() if k != "tensors"}  # keep the report short
        except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            log(result["error"])
        report["results"].append(result)
        write_report(out, report)
    log(f"wrote {out / 'gpu-bench.json'} and {out / 'gpu-bench.md'}")
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
