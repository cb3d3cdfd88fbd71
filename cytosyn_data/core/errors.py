"""Error classes with an exit code, and the one top-level handler every cytosyn CLI uses.

Usage errors (a bad option or config value) exit 2; data errors (a bad slide, table, shard or
weights file; an output folder made by another run) exit 1. The message is one line naming the
file (and row or key) and the cause; a traceback is printed only with ``--debug``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from cytosyn_data.core.secrets import redact_text


class CytosynError(Exception):
    """An error the user can act on; ``exit_code`` 1 (data) unless a subclass says otherwise."""

    exit_code = 1


class UsageError(CytosynError, ValueError):
    """A command-line option or config value is invalid (exit code 2)."""

    exit_code = 2


class DataError(CytosynError):
    """An input (slide, table, shard, weights) or the output folder's state is unusable (exit code 1)."""


class SlideError(RuntimeError):
    """A slide that cannot be opened or used; the message names the file and the cause (raised by
    the slide readers, the coordinate and region files; a batch run records it and goes on)."""


class RunStateError(DataError):
    """The output folder holds another run (other settings or inputs), or is locked by a running one."""


def run_cli(prog: str, fn: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call ``fn(argv)``; turn errors into one line on stderr and an exit code (2 usage, 1 data).

    ``--debug`` anywhere in ``argv`` re-raises instead, for the full traceback. In a job of several
    processes (torchrun / accelerate launch: ``WORLD_SIZE`` > 1) the line names the process's rank."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        prog = f"{prog} [rank {os.environ.get('RANK', '?')}/{os.environ['WORLD_SIZE']}]"
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        return fn(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        if debug:
            raise
        code = getattr(exc, "exit_code", 1)
        text = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, CytosynError):
            text = f"{type(exc).__name__}: {text}"
        print(f"{prog}: error: {redact_text(text)}" + ("" if code == 2 else "  (--debug for the traceback)"),
              file=sys.stderr)
        return code
