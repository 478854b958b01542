"""Device names from configs (``auto``, ``cpu``, ``cuda``, ``cuda:1``) to ``torch.device``."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
