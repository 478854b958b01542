"""What every entry point's config accepts, checked at its start, before any data or model loads (issue 19).

- :mod:`prefkd.training.schema.groups`: the groups read as plain mappings (trainer, dataset, eval, logger, ...).
- :mod:`prefkd.training.schema.entries`: each entry point's top-level keys and the key combinations it refuses.

The checker itself is :mod:`prefkd.utils.config_schema`; ``_target_`` nodes (loss, teacher, student,
dataset.source, ...) are checked against their factories' signatures.
"""

from __future__ import annotations

from prefkd.training.schema.entries import ENTRIES
from prefkd.utils.config_schema import ConfigError, check, raise_problems

__all__ = ["ConfigError", "check_entry", "entry_problems"]


def entry_problems(cfg, entry: str) -> list[str]:
    """Every problem of ``cfg`` as the config of ``python -m prefkd.<entry>`` (a key of ``ENTRIES``)."""
    return check(cfg, ENTRIES[entry])


def check_entry(cfg, entry: str) -> None:
    """Raise one :class:`ConfigError` listing every problem of ``cfg`` as ``entry``'s config."""
    raise_problems(entry_problems(cfg, entry))
