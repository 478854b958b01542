"""Every process starts from the same parameters: checked once, before the module is wrapped for several processes.

DDP copies rank 0's parameters to the others when it wraps the module, but FSDP2 (``fully_shard``) and DeepSpeed keep
what each process built: each shard then comes from a different initialisation, silently, if the processes did not
build the same values (a loss's projectors drawn from an RNG that was seeded differently, or advanced differently, on
some process). :func:`check_replicas_agree` compares a fingerprint of every trainable parameter across the processes
with two small all-reductions and names the first parameter that differs.
"""

from __future__ import annotations

import torch
from torch import nn


def fingerprints(module: nn.Module, device) -> tuple[list[str], torch.Tensor]:
    """(names, P×2 float32 on ``device``): per trainable parameter, the sum of its entries and their L2 norm
    (reductions in fp32, without a copy of the parameter)."""
    names, rows = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            names.append(name)
            rows.append(torch.stack([p.detach().sum(dtype=torch.float32),
                                     torch.linalg.vector_norm(p.detach(), dtype=torch.float32)]).to(device))
    return names, torch.stack(rows) if rows else torch.zeros(0, 2, device=device)


def check_replicas_agree(module: nn.Module, device) -> None:
    """Raise when a trainable parameter of ``module`` differs between the processes of the default process group
    (a no-op without one). Collective: every process calls it, before the module is wrapped."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    names, values = fingerprints(module, device)
    high, low = values.clone(), values.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    differs = (high - low).abs() > 1e-6 * (1 + high.abs())
    if differs.any():
        first = names[int(differs.any(-1).nonzero()[0])]
        raise RuntimeError(f"the processes start from different parameters: {first} (and {int(differs.any(-1).sum())} "
                           f"in all) differs between them. Every process must build the same model and loss modules: "
                           f"the same checkpoint, and the same seed (trainer.seed) before the loss is built, with no "
                           f"process drawing random numbers the others do not")
