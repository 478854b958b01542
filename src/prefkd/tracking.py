"""Metrics out of a run: ``metrics.jsonl`` always, wandb when configured, plus throughput and memory."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SECRET_MARKERS = ("token", "key", "secret", "password")


def redact(config: dict) -> dict:
    """A copy of a (nested) config dict with values of secret-looking keys replaced."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(m in str(k).lower() for m in SECRET_MARKERS) and v not in (None, "", False):
            out[k] = "***"
        else:
            out[k] = v
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on the CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class Tracker:
    """Writes every logged dict to ``<run>/metrics.jsonl`` and, with ``backend: wandb``, to wandb.

    wandb runs online when WANDB_API_KEY is set, offline otherwise (``mode`` or WANDB_MODE override).
    Only the main process logs.
    """

    def __init__(self, run_dir: Path, cfg: dict, config: dict, *, name: str, enabled: bool = True):
        self.enabled = enabled
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None
        self.wandb = None
        if enabled and cfg.get("backend") == "wandb":
            import wandb

            mode = cfg.get("mode") or os.environ.get("WANDB_MODE") or (
                "online" if os.environ.get("WANDB_API_KEY") else "offline")
            if mode == "offline" and not cfg.get("mode") and not os.environ.get("WANDB_MODE"):
                log.info("wandb: no WANDB_API_KEY, logging offline into %s/wandb (sync later with `wandb sync`)", run_dir)
            self.wandb = wandb.init(project=cfg.get("project"), entity=cfg.get("entity"), group=cfg.get("group"),
                                    tags=list(cfg.get("tags") or []), name=name, dir=str(run_dir), mode=mode,
                                    config=redact(config), settings=wandb.Settings(silent=True))

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, str)):
                    self.wandb.summary[k] = v

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    return v.item() if isinstance(v, torch.Tensor) else v
