"""`nemo-adapt` command line: one subcommand per module, each registering its own parser.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets `func`
(called with the parsed namespace, returning an exit code). Modules are imported lazily so
`nemo-adapt --help` and cheap commands do not pay for importing torch and Megatron-Core.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings

from nemo_adapt.errors import NemoAdaptError

# Subcommand name -> module providing `register(subparsers)`.
_SUBCOMMANDS = {
    "run": "nemo_adapt.training.main",
    "models": "nemo_adapt.models.cli",
    "generate": "nemo_adapt.generation.cli",
    "export": "nemo_adapt.models.convert_cli",
    "plan": "nemo_adapt.planner.cli",
    "config": "nemo_adapt.config.cli",
    "launch": "nemo_adapt.launch.cli",
    "eval": "nemo_adapt.eval.cli",
    "compare": "nemo_adapt.eval.compare",
    "merge": "nemo_adapt.merge.cli",
    "registry": "nemo_adapt.artifacts.registry_cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-adapt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for name, module in _SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        if module in seen:
            continue
        seen.add(module)
        importlib.import_module(module).register(sub)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings read as one `warning: ...` line; others keep Python's format (file and line)."""
    if category.__module__.startswith("nemo_adapt."):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    # Megatron-Core warns at import when the optional NVIDIA kernels are absent (always on CPU).
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
    warnings.formatwarning = _format_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the module of the requested subcommand when it is known.
    only = argv[0] if argv and argv[0] in _SUBCOMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    # `run` handles SIGTERM itself (checkpoint and requeue); every other command that writes (merge, export, eval)
    # stages its output in a temporary directory and removes it in `except`/`finally`: SIGTERM (a Slurm time
    # limit, `timeout`, `kill`) has to unwind through that cleanup instead of ending the process where it stands.
    # (Only the main thread may set handlers: an embedding application calling main() elsewhere keeps its own.)
    previous = None
    if args.command != "run" and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return int(args.func(args) or 0)
    except NemoAdaptError as err:
        print(f"nemo-adapt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"nemo-adapt {args.command}: stopped by SIGTERM; nothing partial was left behind", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # the same unwinding as SIGTERM; `run` handles SIGINT itself (it checkpoints)
        print(f"nemo-adapt {args.command}: interrupted (Ctrl-C); nothing partial was left behind", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM arrived: a BaseException, so `except Exception` on the way cannot swallow it."""


def _exit_on_sigterm(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
