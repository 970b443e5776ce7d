"""The ``lionkit`` command line: ``lionkit demo``, ``lionkit bench``, ``lionkit compare``.

Each command lives in its own module with a ``main(argv) -> int``; this file only routes to
them, importing a command's module when the command is run, so ``lionkit --help`` stays fast
and a command whose optional dependencies are missing cannot break the others.

Example::

    lionkit demo --epochs 20 --out curves.png
    python -m lionkit demo
    lionkit bench --help
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from . import __version__

# Commands whose module parses its own arguments: everything after the command name is handed
# over untouched (so `lionkit bench --help` shows bench's help, not ours).
DELEGATED = {
    "bench": "speed and memory of the optimizers' steps (lionkit.bench)",
    "compare": "convergence study: AdamW, Lion, Lion8bit, bf16 + stochastic rounding on small real tasks (lionkit.compare)",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (used for ``--help``, ``--version`` and ``demo``)."""
    from . import demo  # light: its heavy dependencies are imported only when it runs

    parser = argparse.ArgumentParser(
        prog="lionkit",
        description="lionkit: the Lion optimizer (bitsandbytes-compatible 32/8-bit) for PyTorch.",
        epilog="Run 'lionkit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"lionkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_parser = sub.add_parser(
        "demo",
        help="train a small MLP on scikit-learn's digits with AdamW, Lion and Lion8bit (CPU, < 1 min)",
        description=demo.DESCRIPTION,
    )
    demo.add_arguments(demo_parser)
    for name, text in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _delegate(name: str, argv: list[str]) -> int:
    """Run ``lionkit.<name>.main(argv)``; a missing module is a clear error, not a traceback."""
    module_name = f"{__package__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the module exists but something it imports does not: show that
        print(
            f"lionkit {name}: this command is not available in this installation ({module_name} is missing)",
            file=sys.stderr,
        )
        return 2
    return int(module.main(argv) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lionkit`` console script; returns the exit status.

    ``argv`` defaults to ``sys.argv[1:]``. Usage errors return 2, a missing optional
    dependency returns 1 with the ``pip install`` that fixes it.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] in DELEGATED:
            return _delegate(args_list[0], args_list[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(args_list)
        except SystemExit as e:  # --help, --version, or a usage error already printed
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        from . import demo

        return demo.run_from_args(args)
    except ImportError as e:
        if "pip install" not in str(e):
            raise
        command = args_list[0] if args_list else "lionkit"
        print(f"lionkit {command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into e.g. `head`, which stopped reading: not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
