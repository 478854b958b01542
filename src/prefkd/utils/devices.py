"""Device names from configs (``auto``, ``cpu``, ``cuda``, ``cuda:1``) to ``torch.device``."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_num_threads(num_threads: int | None) -> None:
    """``num_threads`` keys (``trainer.num_threads``, ``num_threads``): a number sets torch's intra-op threads for the
    process; 0 or null leaves torch's default."""
    if num_threads:
        torch.set_num_threads(num_threads)
