"""Stage configs from ``pipelines/*.yaml``: a YAML mapping whose sections name the stage."""

from __future__ import annotations

from pathlib import Path

import yaml


def load_stage_config(path: str | Path | None, stage: str) -> dict:
    """The ``stage:`` section of a YAML config (or the whole mapping if it has no such section)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: config file not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    return dict(data.get(stage, data) or {})
