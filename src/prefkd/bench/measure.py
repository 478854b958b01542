"""What the benchmark measures with: median wall times and the peak bytes of live tensors (a dispatch mode)."""

from __future__ import annotations

import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors allocated by aten ops while active and still alive (views / in-place ops excluded).
    Tensors shaped as one of ``skip`` are not counted (a head weight's gradient)."""

    def __init__(self, skip: tuple[tuple[int, ...], ...] = ()):
        super().__init__()
        self.live = self.peak = 0
        self.skip = set(skip)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and tuple(t.shape) not in self.skip:
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
