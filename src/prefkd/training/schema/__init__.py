"""What every entry point's config accepts, checked at its start, before any data or model loads (issue 19).

- :mod:`prefkd.training.schema.groups`: the groups read as plain mappings (trainer, dataset, eval, logger, ...).
- :mod:`prefkd.training.schema.entries`: each entry point's top-level keys and the key combinations it refuses.

The checker itself is :mod:`prefkd.utils.config_schema`; ``_target_`` nodes (loss, teacher, student,
dataset.source, ...) are checked against their factories' signatures.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf

from prefkd.training.schema.entries import ENTRIES
from prefkd.utils.config_schema import ConfigError, check, raise_problems

__all__ = ["ConfigError", "check_entry", "check_required", "entry_problems", "reported"]


def unset_keys(cfg) -> list[str]:
    """The keys whose value is still ``???`` (mandatory, unset), dotted."""
    missing = []

    def walk(node, prefix: str) -> None:
        for key in node:
            full = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                missing.append(full)
            elif isinstance(node._get_node(key), DictConfig):  # a nested node (never resolved here)
                walk(node[key], f"{full}.")

    walk(cfg, "")
    return missing


def check_required(cfg) -> None:
    """Every ``???`` (mandatory) value that is still unset is an error naming the key and how to set it."""
    missing = unset_keys(cfg)
    if missing:
        hints = {"path": "a checkpoint directory, hub id or .gguf file", "train": "a JSONL file", "dir": "a folder"}
        items = "; ".join(f"{k}=<{hints.get(k.rsplit('.', 1)[-1], 'a value')}>" for k in missing)
        raise ConfigError([f"the configuration leaves {', '.join(missing)} unset (??? in config/): pass {items} on "
                           f"the command line"])


def entry_problems(cfg, entry: str) -> list[str]:
    """Every problem of ``cfg`` as the config of ``python -m prefkd.<entry>`` (a key of ``ENTRIES``)."""
    return check(cfg, ENTRIES[entry])


def check_entry(cfg, entry: str) -> None:
    """Before anything loads: the unset (``???``) keys (:func:`check_required`), then one :class:`ConfigError` listing
    every problem of ``cfg`` as ``entry``'s config."""
    check_required(cfg)
    raise_problems(entry_problems(cfg, entry))


@contextmanager
def reported() -> Iterator[None]:
    """Around an entry point's work: a :class:`ConfigError` ends the command with its message on stderr and exit
    code 2 (a usage error), without a traceback."""
    try:
        yield
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
