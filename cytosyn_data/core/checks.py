"""Checks of values at the edge (CLI options, YAML keys, table cells): each failure is one
:class:`UsageError` naming where the value came from (``where``) and what is wrong with it."""

from __future__ import annotations

import argparse
import math
import re

from cytosyn_data.core.errors import UsageError


def _number(value, where: str, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise UsageError(f"{where}: must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def integer(value, where: str) -> int:
    """An int (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{where}: must be an integer, got {value!r}")
    return value


def positive(value, where: str, kind=float):
    """A finite number > 0."""
    v = _number(value, where, kind)
    if not math.isfinite(v) or v <= 0:
        raise UsageError(f"{where}: must be a finite number > 0, got {value!r}")
    return v


def non_negative(value, where: str, kind=float):
    v = _number(value, where, kind)
    if not math.isfinite(v) or v < 0:
        raise UsageError(f"{where}: must be a finite number >= 0, got {value!r}")
    return v


def fraction(value, where: str, closed: bool = False):
    """A number in [0, 1) (or [0, 1] with ``closed``)."""
    v = _number(value, where)
    if not (0 <= v <= 1 if closed else 0 <= v < 1):
        raise UsageError(f"{where}: must be in [0, 1{']' if closed else ')'}, got {value!r}")
    return v


def one_of(value, where: str, choices) -> str:
    if value not in choices:
        raise UsageError(f"{where}: unknown value {value!r}; valid: {', '.join(sorted(map(str, choices)))}")
    return value


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_slide_id(name: str, where: str) -> str:
    """A slide_id usable as a file name and a WebDataset key prefix: every run of characters other
    than letters, digits, '_' and '-' ('.', '/', spaces ...) becomes one '-'; leading '-' removed."""
    sid = _UNSAFE.sub("-", str(name)).strip("-")
    if not sid:
        raise UsageError(f"{where}: slide_id {name!r} has no usable characters")
    return sid


def cli_type(check, *args):
    """An argparse ``type`` that parses a number and applies ``check`` (argparse turns the error into
    ``error: argument --x: ...`` and exit code 2)."""
    kind = args[0] if args and args[0] in (int, float) else float

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        try:
            return check(value, "value", *args)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    return parse
