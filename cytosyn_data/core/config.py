"""Stage configs from ``pipelines/*.yaml``: a YAML mapping whose sections name the stage."""

from __future__ import annotations

from pathlib import Path

import yaml

from cytosyn_data.core.errors import UsageError


def load_stage_config(path: str | Path | None, stage: str) -> dict:
    """The ``stage:`` section of a YAML config (or the whole mapping if it has no such section)."""
    if path is None:
        return {}

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a config must be a YAML mapping")
    section = data.get(stage, data) or {}
    if not isinstance(section, dict):
        raise UsageError(f"{path}: section {stage!r} must be a mapping, got {section!r}")
    return dict(section)
