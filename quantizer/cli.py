"""`coder-quant` command line: a thin shell over the library's functions.

Each sub-command lives in a module that exposes `register(subparsers)`; the
handler it sets returns an exit code. Library errors (QuantError) become one
line on stderr and exit status 1; Ctrl-C, SIGTERM and SIGHUP remove what was half
written and exit with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

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

# Signals that end a run as Ctrl-C does: `kill`, systemd, a closed terminal or ssh session.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(BaseException):
    """A stop signal arrived. A BaseException, as KeyboardInterrupt is, so that `except Exception`
    does not swallow it while every `finally` and context manager still removes its partial files."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # every signal raises, as every Ctrl-C does: ignoring repeats would leave no way short of SIGKILL
    # to stop a run whose first exception was dropped (raised inside a ctypes callback, for one)
    raise Terminated(signum)


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise Terminated; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (main() called from a worker thread)
        return
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_cause(exc: BaseException) -> KeyboardInterrupt | Terminated | None:
    """The Ctrl-C or stop signal a library error was raised from, if any: an exception cannot unwind
    through C, so imatrix collection's ctypes callback keeps it and re-raises it as an ImatrixError."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, (KeyboardInterrupt, Terminated)):
        cause = cause.__cause__
    return cause


def _stopped(exc: KeyboardInterrupt | Terminated) -> int:
    """One line, and 128 + the signal number, as a shell reports a command a signal ended."""
    if isinstance(exc, Terminated):
        print(f"coder-quant: terminated by {exc}", file=sys.stderr)
        return 128 + exc.signum
    print("coder-quant: interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


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
        # the handlers are set inside the try, so a signal landing as they are restored is caught too
        with _stop_signals_raise():
            # inside the try: building the parser imports every sub-command (numpy, gguf...), which
            # takes long enough for a Ctrl-C to land there
            args = build_parser().parse_args(argv)
            logging.basicConfig(
                level=logging.DEBUG if args.verbose else logging.INFO,
                format="%(levelname)s %(name)s: %(message)s",
            )
            return int(args.handler(args) or 0)
    except QuantError as exc:
        stop = _stop_cause(exc)
        if stop is not None:
            return _stopped(stop)
        print(f"coder-quant: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        return _stopped(exc)
    except BrokenPipeError:
        # Output piped into `head` and friends: stop quietly, as other tools do.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
