"""The one type every dataset source returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataSplits:
    """Instruction records per split. Each record is a dict with at least ``prompt`` (already templated)
    and ``output`` (a string; a list of reference strings in evaluation sets). ``source`` names where the
    records came from (a file, a hub id, ``embedded(seed=0)``) for error messages and cache keys."""

    train: list[dict]
    dev: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    source: str = ""
