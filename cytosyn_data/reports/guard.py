"""A report, a picture or a log never fails a stage: :func:`never_fail` runs one and, on any error,
prints one warning line naming what was not written and why; the stage's data outputs stand."""

from __future__ import annotations

import sys
from typing import Any, Callable

__all__ = ["never_fail"]


def never_fail(what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``, or None after a warning on stderr when it raises."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a report's failure is reported, never raised
        print(f"warning: {what} not written ({type(exc).__name__}: {exc}); the stage's data outputs stand",
              file=sys.stderr)
        return None
