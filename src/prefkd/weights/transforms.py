"""Parent-weight formula and TIS-DPO's per-response transforms (docs/methods.md §10).

**Weights** (:func:`parent_weights`, :func:`transform_weights`): w_p = k·exp(μ·clamp(ℓ⁺_p − ℓ⁻_p, L, U)),
then one of TIS-DPO's per-response transforms. Weights are data: every loss reads them detached.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


# ----------------------------------------------------------------------------------------- public: weights
def parent_weights(lp_pos: torch.Tensor, lp_neg: torch.Tensor, chosen: bool, k: float = 1.0,
                   lower: float = -0.5, upper: float = 1.5) -> torch.Tensor:
    """w_p = k·exp(μ·clamp(ℓ⁺_p − ℓ⁻_p, L, U)), μ = +1 on the chosen response, −1 on the rejected one.

    lp_pos, lp_neg: parent (or token) log-probs under π⁺ (DPO-trained) and π⁻ (trained on the reversed
    data), any equal shapes. The clamp is applied before the sign: on a rejected response the weights lie in
    [k·e^{−U}, k·e^{−L}]. Defaults k = 1, L = −0.5, U = 1.5 (docs/methods.md §10). Returns the same shape.
    """
    if lower > upper:
        raise ValueError(f"lower must be <= upper, got {lower} > {upper}")
    lp_pos, lp_neg = torch.as_tensor(lp_pos), torch.as_tensor(lp_neg)
    if lp_pos.shape != lp_neg.shape:
        raise ValueError(f"lp_pos {tuple(lp_pos.shape)} and lp_neg {tuple(lp_neg.shape)} differ")
    mu = 1.0 if chosen else -1.0
    return k * torch.exp(mu * (lp_pos - lp_neg).clamp(lower, upper))


def _float_like(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.is_floating_point() else torch.get_default_dtype()


def _origin(w: torch.Tensor) -> torch.Tensor:
    return w.to(_float_like(w)).clone()


def _binary(w: torch.Tensor, *, q: float) -> torch.Tensor:
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"binary: q is a percentage in [0, 100], got {q}")
    w, n = w.to(_float_like(w)), w.numel()
    k = math.floor(q * n / 100.0 + 1e-9)
    out = torch.zeros(n, dtype=_float_like(w), device=w.device)
    if k == 0:
        return out
    kth = torch.topk(w, k).values[-1]
    return (w >= kth).to(out.dtype)


def _threshold(w: torch.Tensor, *, lo: float, hi: float) -> torch.Tensor:
    if lo > hi:
        raise ValueError(f"threshold: lo must be <= hi, got {lo} > {hi}")
    return w.to(_float_like(w)).clamp(lo, hi)


def _threshold_and_scale(w: torch.Tensor, *, lo: float, hi: float, s_min: float, s_max: float) -> torch.Tensor:
    if not lo < hi:
        raise ValueError(f"threshold_and_scale: lo must be < hi, got {lo}, {hi}")
    clipped = w.to(_float_like(w)).clamp(lo, hi)
    return s_min + (clipped - lo) / (hi - lo) * (s_max - s_min)


def _random(w: torch.Tensor, *, a: float, b: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if a > b:
        raise ValueError(f"random: a must be <= b, got {a} > {b}")
    u = torch.rand(w.shape, generator=generator, dtype=_float_like(w), device=w.device)
    return a + (b - a) * u


def _rank_based(w: torch.Tensor, *, s_min: float, s_max: float) -> torch.Tensor:
    n, dtype = w.numel(), _float_like(w)
    if n <= 1:
        return torch.ones(n, dtype=dtype, device=w.device)
    sorted_w, order = torch.sort(w, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_w, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0) - 1
    mean_rank = (ends - (counts - 1) / 2.0).to(dtype)  # average of the ordinal ranks of each tie group
    ranks = torch.empty(n, dtype=dtype, device=w.device)
    ranks[order] = mean_rank[inverse]
    return s_min + ranks / (n - 1) * (s_max - s_min)


TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {
    "origin": _origin,
    "binary": _binary,
    "threshold": _threshold,
    "threshold_and_scale": _threshold_and_scale,
    "random": _random,
    "rank_based": _rank_based,
}


def transform_weights(w: torch.Tensor, kind: str, **params) -> torch.Tensor:
    """One response's weights (1-D, n values) through a TIS-DPO transform (docs/methods.md §10). Returns n floats
    (the input's float dtype, else the default dtype); no gradient is meant to flow.

    - ``origin``: unchanged (a copy).
    - ``binary(q)``: the top q % → 1, the rest → 0. k = ⌊q·n/100⌋ elements are asked for (rounded down, so
      a q giving less than one element marks none: all 0); an element gets 1 iff its value is ≥ the k-th
      largest value, so **ties at the cut are all kept** (more than k ones possible; order never matters).
    - ``threshold(lo, hi)``: clip to [lo, hi].
    - ``threshold_and_scale(lo, hi, s_min, s_max)``: clip to [lo, hi] (lo < hi), then map [lo, hi] linearly
      onto [s_min, s_max]: s_min + (clip(w) − lo)/(hi − lo)·(s_max − s_min).
    - ``random(a, b, generator=None)``: fresh U(a, b) values (the input only gives n, dtype and device);
      pass a ``torch.Generator`` (on that device) for reproducibility.
    - ``rank_based(s_min, s_max)``: ascending ranks r ∈ [0, n−1] mapped to s_min + r/(n−1)·(s_max − s_min)
      (the largest weight gets s_max); **ties share the average of their ranks** (scipy's "average"), so
      equal weights stay equal (all equal: all (s_min+s_max)/2). A single element → 1; empty → empty.

    TIS-DPO's public transform code was not available to check, so these follow the words of docs/methods.md §10.
    """
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown weight transform {kind!r}; valid kinds: {', '.join(TRANSFORMS)}")
    w = torch.as_tensor(w).detach()
    if w.dim() != 1:
        raise ValueError(f"transform_weights takes one response's weights (1-D), got shape {tuple(w.shape)}")
    return TRANSFORMS[kind](w, **params)
