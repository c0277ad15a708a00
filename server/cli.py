"""`coder-serve [MODEL.gguf] [options]`: a thin shell over Settings, create_app and uvicorn.

Flags map one to one onto server.settings.Settings; a flag left out keeps the CODER_SERVE_* variable or
the default there. `--plan` prints where the model's tensors would go and exits without loading it.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from server import __version__
from server.settings import Settings

DEFAULT = {name: field.default for name, field in Settings.model_fields.items()}

# flag -> Settings field, for flags whose value is copied as given.
FLAG_FIELDS = (
    "host", "port", "gpu_layers", "cpu_moe_layers", "ctx_size", "threads", "batch", "alias",
    "api_key", "max_queue", "max_body_bytes", "log_level", "cache_dir", "cache_ram",
    "vram_budget", "threads_batch", "ubatch", "mmap", "repack", "host_buffer", "flash_attn", "pin_threads",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coder-serve",
        description="Serve a GGUF (Qwen3-Coder-Next and models like it) through an OpenAI-compatible API.",
        epilog="Every option can also be set as an environment variable: CODER_SERVE_<OPTION>, e.g. "
        "CODER_SERVE_API_KEY (better than --api-key, which other users can see in the process list).",
    )
    p.add_argument("model", nargs="?", type=Path, metavar="MODEL.gguf",
                   help="GGUF to serve (default: the built-in demo model, built on first run)")
    p.add_argument("--version", action="version", version=f"coder-serve {__version__}")
    p.add_argument("--host", help=f"address to bind (default {DEFAULT['host']}: this machine only)")
    p.add_argument("--port", type=int, help=f"port (default {DEFAULT['port']})")
    p.add_argument("--gpu-layers", metavar="attn|all|none|auto|N",
                   help="what goes to the GPU: attn = all layers but routed experts, all, none, auto = attn plus "
                        f"the experts that fit, or the last N layers (default {DEFAULT['gpu_layers']})")
    p.add_argument("--vram-budget", metavar="SIZE",
                   help="with --gpu-layers auto: GPU memory to plan for at most, e.g. 24GiB (default: all free)")
    p.add_argument("--cpu-moe-layers", type=int, metavar="N", help="keep routed experts of the first N layers in RAM")
    p.add_argument("--ctx-size", type=int, metavar="N", help=f"context length in tokens, 0 for the model's own (default {DEFAULT['ctx_size']})")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for decoding (default: one per physical core, within the CPU quota)")
    p.add_argument("--threads-batch", type=int, metavar="N",
                   help="CPU threads for prompts (default: as --threads if given, else every CPU, within the quota)")
    p.add_argument("--batch", type=int, metavar="N",
                   help="prompt tokens per evaluation step (default 4096 with routed experts in RAM beside a GPU, "
                   "except under auto; else 2048)")
    p.add_argument("--ubatch", type=int, metavar="N",
                   help="tokens per compute pass within a step (default 4096 with routed experts in RAM beside a "
                   "GPU, except under auto; else 512)")
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction,
                   help="map the file instead of loading it (default: no mmap when routed experts stay in RAM "
                   "beside a GPU, so they land in pinned memory)")
    p.add_argument("--repack", action=argparse.BooleanOptionalAction,
                   help="let llama.cpp repack weights in RAM into its faster CPU layouts (default on)")
    p.add_argument("--host-buffer", action=argparse.BooleanOptionalAction,
                   help="keep weights in RAM in the GPU's pinned host memory, so prompts use the GPU (default "
                   "on); --no-host-buffer lets them be repacked for faster CPU decoding instead")
    p.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, help="flash attention (default: llama.cpp's)")
    p.add_argument("--pin-threads", action=argparse.BooleanOptionalAction,
                   help="bind llama.cpp's CPU threads one per core (OpenMP; default off)")
    p.add_argument("--cache-ram", metavar="SIZE",
                   help="RAM for prompt checkpoints of hybrid/recurrent models, e.g. 2GiB; 0 turns them off "
                        f"(default {DEFAULT['cache_ram'] >> 30}GiB)")
    p.add_argument("--alias", metavar="NAME", help="model id shown to clients (default: the file name)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/* and /metrics")
    p.add_argument("--cors-origin", dest="cors_origins", action="extend", nargs="+", metavar="ORIGIN",
                   help="allow browser requests from these origins (CORS is off by default)")
    p.add_argument("--max-queue", type=int, metavar="N", help=f"requests waiting behind the running one (default {DEFAULT['max_queue']})")
    p.add_argument("--max-body-bytes", type=int, metavar="N", help=f"largest request body in bytes (default {DEFAULT['max_body_bytes']})")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="where the demo model is built")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help=f"(default {DEFAULT['log_level']})")
    p.add_argument("--plan", action="store_true", help="print the tensor placement and exit without loading")
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None}
    if args.model is not None:
        values["model"] = args.model
    if args.cors_origins:
        values["cors_origins"] = args.cors_origins
    return Settings(**values)


def _first_error(exc: ValidationError, flags: dict[str, str]) -> str:
    """The first problem, named by its flag, or by its environment variable for a setting without one."""
    err = exc.errors()[0]
    loc = err.get("loc", ())
    name = str(loc[0]) if loc else ""
    where = flags.get(name) or (f"CODER_SERVE_{name.upper()}" if name else "settings")
    return f"{where}: {err.get('msg', 'invalid value')}"


def _port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (in use, not an address of this machine), or None.
    A probe, bound and closed as uvicorn binds (SO_REUSEADDR), so a port taken meanwhile still fails later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _placement_problem(settings: Settings) -> str | None:
    """What planning the placement finds wrong with the model file and the placement flags, or None."""
    from server.placement import PlacementError, plan_for_gguf

    try:
        plan_for_gguf(str(settings.model), settings)
    except (PlacementError, ValueError, OSError) as exc:
        return str(exc)
    return None


def _plan(settings: Settings, as_json: bool) -> int:
    from server.placement import PlacementError, plan_for_gguf

    if settings.model is None:
        from server.demo import ensure_demo_model

        settings = settings.model_copy(update={"model": ensure_demo_model(settings.cache_dir)})
    try:
        plan = plan_for_gguf(str(settings.model), settings)
    except (PlacementError, ValueError, OSError) as exc:
        print(f"coder-serve: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(plan.to_json(), indent=2) if as_json else plan.render())
    return 0


def _serve(settings: Settings) -> int:
    import uvicorn

    from server.app import create_app, create_engine

    engine = create_engine(settings)
    app = create_app(settings, engine)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.log_level == "debug", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if not settings.loopback_only and settings.api_key is None:
        logging.getLogger("server").warning("listening on %s without --api-key: anyone who can reach it can use it",
                                            settings.host)

    def stop_if_load_failed() -> None:
        if engine.wait_loaded() == "failed":
            server.should_exit = True

    engine_watch = threading.Thread(target=stop_if_load_failed, name="load-watch", daemon=True)
    try:
        engine.start()
        engine_watch.start()
        server.run()
    finally:
        failed = engine.state == "failed"
        engine.close()
    if failed or not server.started:
        print("coder-serve: error: the server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"coder-serve: error: {_first_error(exc, flags)}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # a CODER_SERVE_* variable that does not parse (lists take JSON)
        print(f"coder-serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.model is not None and not Path(settings.model).is_file():
        print(f"coder-serve: error: model file not found: {settings.model}", file=sys.stderr)
        return 1
    if args.json and not args.plan:
        print("coder-serve: error: --json only applies to --plan", file=sys.stderr)
        return 2
    if args.plan:
        return _plan(settings, args.json)
    if settings.pin_threads:
        from server.affinity import PinningError, pin_llama_threads

        try:
            pinned = pin_llama_threads()
        except PinningError as exc:
            print(f"coder-serve: error: {exc}", file=sys.stderr)
            return 2
        logging.getLogger("server").info("llama.cpp's CPU threads bound one per core (%s)",
                                         ", ".join(f"{k}={v}" for k, v in pinned.items()))
    if problem := _port_problem(settings.host, settings.port):  # before minutes of loading, not after
        print(f"coder-serve: error: {problem}", file=sys.stderr)
        return 1
    if settings.model is not None and (problem := _placement_problem(settings)):
        # (after the pinning, which must precede llama.cpp's loading) the loader would find the same
        # once uvicorn had started, as a traceback
        print(f"coder-serve: error: {problem}", file=sys.stderr)
        return 1
    return _serve(settings)


if __name__ == "__main__":
    sys.exit(main())
