"""Tolerant readers: a JSON object, a YAML document, metrics.jsonl. Problems become warnings, never exceptions.

Each warning is logged (logger ``prefkd.report``) and appended to the ``warnings`` list the caller passes,
which report.md lists at its end.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import yaml

log = logging.getLogger("prefkd.report")


def warn(warnings: list[str], message: str) -> None:
    """Log ``message`` as a warning and keep it in ``warnings``."""
    log.warning(message)
    warnings.append(message)


def read_json(path: Path, warnings: list[str]) -> dict | None:
    """The JSON object in ``path``, or None (with a warning) when it is unreadable, corrupt or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        warn(warnings, f"{path}: cannot read JSON ({err}): skipped")
        return None
    if not isinstance(data, dict):
        warn(warnings, f"{path}: holds a {type(data).__name__}, not a JSON object: skipped")
        return None
    return data


def read_yaml(path: Path, warnings: list[str]):
    """The YAML document in ``path`` (None when missing; None with a warning when unreadable)."""
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        warn(warnings, f"{path}: cannot read YAML ({err}): ignored")
        return None


def read_metrics(path: Path, warnings: list[str]) -> dict[str, dict[int, float]]:
    """metrics.jsonl -> ``{key: {step: value}}`` for every numeric key; a repeated step keeps its last value.
    Corrupt lines (JSON errors, no integer step) are skipped with a warning naming the file and line."""
    series: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return series
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        warn(warnings, f"{path}: cannot read ({err}): no curves for this run")
        return series
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, TypeError, KeyError) as err:
            warn(warnings, f"{path}:{number}: corrupt metrics line ({type(err).__name__}: {err}): skipped")
            continue
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
    return {k: dict(sorted(v.items())) for k, v in series.items()}


def finite(value) -> bool:
    """A real, finite number (not None, not a bool, not NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
