"""AdamW with docs/methods.md §2's parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_scheduler

NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm", "rmsnorm")


def _is_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or any(m in name.lower() for m in NO_DECAY_MARKERS)


def param_groups(student: nn.Module, loss: nn.Module, *, lr: float, projector_lr: float,
                 weight_decay: float) -> list[dict]:
    """Three groups: student weights with decay, student biases/norms without, the loss's own modules
    (projectors) with ``projector_lr`` (and decay on their matrices)."""
    decay, no_decay, proj = [], [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (no_decay if _is_no_decay(name, p) else decay).append(p)
    proj = [p for p in loss.parameters() if p.requires_grad]
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "student"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "student_no_decay"},
        {"params": proj, "lr": projector_lr, "weight_decay": weight_decay, "name": "projectors"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(student: nn.Module, loss: nn.Module, cfg) -> torch.optim.Optimizer:
    groups = param_groups(student, loss, lr=cfg.lr, projector_lr=cfg.projector_lr, weight_decay=cfg.weight_decay)
    if not groups:
        raise ValueError("nothing to train: the student has no trainable parameters and the loss has no projectors.")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    """cosine | linear | constant, each after a linear warm-up (warmup_ratio wins when set)."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio else int(cfg.warmup_steps)
    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    if cfg.scheduler not in names:
        raise ValueError(f"trainer.scheduler={cfg.scheduler!r}: choose one of {sorted(names)}.")
    return get_scheduler(names[cfg.scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
