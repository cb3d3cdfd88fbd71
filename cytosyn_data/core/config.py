"""Stage configs: a YAML mapping whose sections name the stage, from a file or by the name of one
shipped inside the package (``cytosyn_data/configs/``, so a wheel install without the repository
has them too).

``--config tiny`` / ``--config xl`` (training), ``--config eval``, ``--config tile``: the shipped
ones; anything that names an existing file, or ends in ``.yaml``/``.yml`` or contains a ``/``, is a
path. ``cytosyn-data config show NAME`` prints a shipped config to start your own from.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from cytosyn_data.core.errors import UsageError

__all__ = ["SHIPPED", "load_stage_config", "resolve_config", "shipped_config_text"]

#: shipped config names -> file in cytosyn_data/configs (aliases included)
SHIPPED = {"tile": "tile.yaml", "tiny": "train_tiny.yaml", "train_tiny": "train_tiny.yaml",
           "xl": "train_xl.yaml", "train_xl": "train_xl.yaml", "eval": "eval.yaml"}


def _is_path(value: str) -> bool:
    return Path(value).exists() or value.endswith((".yaml", ".yml")) or "/" in value or "\\" in value


def shipped_config_text(name: str) -> str:
    """The text of the shipped config ``name`` (see :data:`SHIPPED`)."""
    if name not in SHIPPED:
        raise UsageError(f"no shipped config {name!r}; shipped: {', '.join(sorted(SHIPPED))} (or give a YAML file path)")
    return resources.files("cytosyn_data").joinpath("configs", SHIPPED[name]).read_text()


def resolve_config(value: str | Path) -> tuple[str, str]:
    """(where, text) of a config given as a path or a shipped name; where names it in errors."""
    value = str(value)
    if not _is_path(value):
        return f"{value} (shipped config {SHIPPED.get(value, '?')})", shipped_config_text(value)
    path = Path(value)
    if not path.exists():
        raise UsageError(f"{path}: config file not found (shipped configs: {', '.join(sorted(SHIPPED))})")
    return str(path), path.read_text()


def load_stage_config(path: str | Path | None, stage: str) -> dict:
    """The ``stage:`` section of a YAML config (a path or a shipped name; the whole mapping if it has
    no such section); ``{}`` when none is given."""
    if path is None:
        return {}
    where, text = resolve_config(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: a config must be a YAML mapping")
    section = data.get(stage, data) or {}
    if not isinstance(section, dict):
        raise UsageError(f"{where}: section {stage!r} must be a mapping, got {section!r}")
    return dict(section)
