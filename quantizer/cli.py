"""`coder-quant` command line: a thin shell over the library's functions.

Each sub-command lives in a module that exposes `register(subparsers)`; the
handler it sets returns an exit code. Library errors (QuantError) become one
line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from quantizer import __version__
from quantizer.errors import QuantError

# Modules that contribute sub-commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "quantizer.commands.build",
    "quantizer.commands.plan",
    "quantizer.commands.verify",
    "quantizer.commands.inspect",
    "quantizer.commands.eval",
    "quantizer.commands.imatrix",
    "quantizer.commands.suggest",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coder-quant", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"coder-quant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # sub-command not part of this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        # inside the try: building the parser imports every sub-command (numpy, gguf...), which takes
        # long enough for a Ctrl-C to land there
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
        )
        return int(args.handler(args) or 0)
    except QuantError as exc:
        print(f"coder-quant: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("coder-quant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and friends: stop quietly, as other tools do.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
