"""Batched entropic optimal transport: log-stabilised Sinkhorn over B padded problems (docs/methods.md §8).

For each problem b (dropped below), with cost C (m×n), marginals a (m), b (n) and ε > 0, the plan is

    P* = argmin_{P ≥ 0, P 1 = a, Pᵀ 1 = b}  ⟨P, C⟩ + ε Σ_ji P_ji log P_ji               (POT's objective)

whose solution is P*_ji = exp((f_j + g_i − C_ji) / ε) for dual potentials f (m), g (n). We keep the scaled
potentials u = f/ε, v = g/ε and alternate the log-domain (Sinkhorn) updates

    u_j ← log a_j − LSE_i(v_i − C_ji/ε),        v_i ← log b_i − LSE_j(u_j − C_ji/ε)

(row update first, so after each iteration the column marginals are exact and the row error measures
convergence). Two ways of running the same iterations:

* ``stabilized=True`` (default, fast): log-stabilised scaling (Schmitzer 2019). The potentials are
  absorbed into a kernel K̃ = exp(u_j + v_i − C_ji/ε) (the plan at the absorbed potentials, so no entry
  overflows) and the iterations run as the equivalent exp-domain scalings α ← a / (K̃β), β ← b / (K̃ᵀα)
  (two batched mat-vecs instead of two logsumexps; plan = diag(α) K̃ diag(β)). At a check, the scalings
  are absorbed (u += log α, v += log β, K̃ recomputed) once some |log α|, |log β| exceeds ``ABSORB``.
  Exp-domain blocks only run while every valid row sum is within a factor e^``LOG_SAFE`` of its target
  (early iterations at small ε run in the log domain); a block that produced a non-finite value is
  undone and redone in the log domain. In exact arithmetic both give POT's ``sinkhorn_log`` iterates,
  and the returned plan is always exp(log-domain potentials − C/ε).
* ``stabilized=False`` or ``grad="unrolled"``: plain log-domain updates (logsumexp).

Padding: boolean masks ``mask_x`` (B×m) and ``mask_y`` (B×n) mark valid points; padded points get zero
mass, zero potential, zero scaling, a log-kernel of −1e30 and a plan entry of exactly 0, so no NaN or inf
appears whatever the padded cost entries hold (inf and NaN included), and no gradient reaches them. A
problem with no valid point on one side is inactive: zero plan, zero cost, zero error.

Numerics: fp32 for every input but fp64 (kept for tests). Exponents are clamped at ``_cutoff(dtype)``
(log of the smallest normal number + 25) before exp, so no subnormal is ever produced (they make CPU exp
and matmul 10–50× slower); plan entries below e^cutoff (1e-27 in fp32) are returned as 0. With costs
~100 and ε = 0.01 the potentials are ~1e4, so fp32 plans carry a relative error ~1e-3 (rounding of
u + v − C/ε), but nothing overflows.

Convergence: the marginal error of problem b is ‖P 1 − a‖₁ (L1 over rows; columns are exact). It is
measured only every ``check_every`` iterations (one host synchronisation per check, none in between);
the solver stops when the largest error over the batch is below ``tol`` or after ``max_iter`` iterations.

Gradients (``grad``):

* ``"envelope"`` (default): iterations under ``no_grad``; ``cost = Σ P*·C`` and
  ``reg_value = Σ P*·C + ε Σ P* log P*`` with P* detached, so ∂cost/∂C = ∂reg_value/∂C = P*. For
  ``reg_value`` this is the exact derivative of the regularised OT value (envelope theorem); for ``cost``
  it ignores ∂P*/∂C, as docs/methods.md §8 prescribes.
* ``"unrolled"``: autograd through every iteration (memory grows with the iteration count); ``cost`` then
  has its full derivative ⟨∂P/∂C, C⟩ + P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEG = -1e30  # log-kernel value of padded entries (their plan entry is set to exactly 0)
LOG_SAFE = 20.0  # exp-domain blocks only when every row sum is within e^±20 of its target
ABSORB = 10.0  # absorb the exp-domain scalings into the potentials once some |log α|, |log β| > 10


def _cutoff(dtype: torch.dtype) -> float:
    """Exponents below this are clamped, so exp stays a normal number (−62.3 in fp32, −683.4 in fp64).

    Subnormal results make CPU exp and matmul 10–50× slower; the clamp changes a sum by at most
    n·e^cutoff relative to its largest term (~1e-27 in fp32), and plan entries below e^cutoff are set to 0.
    """
    return math.log(torch.finfo(dtype).tiny) + 2 * ABSORB + 5


def _lse(x: torch.Tensor, dim: int, cut: float) -> torch.Tensor:
    """log Σ exp(x) over ``dim``, with exponents relative to the max clamped at ``cut`` (no subnormals)."""
    mx = x.detach().amax(dim, keepdim=True)
    if torch.is_grad_enabled():
        return (x - mx).clamp_min(cut).exp().sum(dim).log() + mx.squeeze(dim)
    return (x - mx).clamp_min_(cut).exp_().sum(dim).log_() + mx.squeeze(dim)


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn` (shapes for a batched call; a 2-D call drops the leading B).

    plan: B×m×n transport plan P (zero on padded rows/columns and for inactive problems).
    cost: B, the transport cost ⟨P, C⟩ (padded entries of C ignored).
    reg_value: B, the regularised OT value ⟨P, C⟩ + ε Σ P log P (0·log 0 = 0), POT's entropic objective.
    iterations: Sinkhorn iterations performed (one row and one column update each), same for the batch.
    marginal_error: B, ‖P 1 − a‖₁ of the returned plan (0 for inactive problems).
    converged: whether max(marginal_error) < tol.
    """

    plan: torch.Tensor
    cost: torch.Tensor
    reg_value: torch.Tensor
    iterations: int
    marginal_error: torch.Tensor
    converged: bool


def _marginal(mask: torch.Tensor, given: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Uniform over the valid points of each row of ``mask``, or ``given`` with padded entries zeroed."""
    if given is not None:
        return torch.where(mask, given.to(dtype), torch.zeros((), dtype=dtype, device=mask.device))
    count = mask.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    return mask.to(dtype) / count


def _log_step(log_k, u, v, log_a, log_b, mask_x, mask_y, cut):
    """One log-domain Sinkhorn iteration (row update, then column update); padded potentials stay 0."""
    u = torch.where(mask_x, log_a - _lse(log_k + v[:, None, :], 2, cut), 0.0)
    v = torch.where(mask_y, log_b - _lse(log_k + u[:, :, None], 1, cut), 0.0)
    return u, v


def _kernel(log_k, u, v, cut):
    """K̃ = exp(max(log K + u_j + v_i, cut)), B×m×n (no autograd; in place on one buffer)."""
    return torch.add(log_k, u[:, :, None]).add_(v[:, None, :]).clamp_min_(cut).exp_()


def _log(scaling, mask):
    """log of an exp-domain scaling, 0 on padded points (where the scaling is 0)."""
    return torch.where(mask, scaling.log(), 0.0)


def _max_abs_log(scaling, mask):
    """max over valid points of |log scaling| (a 0-dim tensor)."""
    return torch.where(mask, scaling.log().abs(), 0.0).max()


def _exp_block(kernel, a, b, beta, pad_x, pad_y, steps):
    """``steps`` exp-domain iterations α ← a / (K̃β), β ← b / (K̃ᵀα) on the kernel K̃ (B×m×n) → (α, β).

    ``pad_x``/``pad_y`` (1 on padded points) keep padded denominators non-zero; padded scalings are 0.
    """
    kernel_t = kernel.transpose(1, 2)
    for _ in range(steps):
        alpha = a / (torch.bmm(beta[:, None, :], kernel_t)[:, 0] + pad_x)
        beta = b / (torch.bmm(alpha[:, None, :], kernel)[:, 0] + pad_y)
    return alpha, beta


def sinkhorn(
    cost: torch.Tensor,
    eps: float,
    mask_x: torch.Tensor | None = None,
    mask_y: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    check_every: int = 10,
    grad: str = "envelope",
    stabilized: bool = True,
) -> SinkhornResult:
    """Entropic OT plans for a batch of problems (module docstring for the equations).

    Args:
        cost: B×m×n costs C[b, j, i] (or m×n for one problem; the result is then squeezed back). Computed
            in fp32 (bf16/fp16 upcast) or fp64 for fp64 input.
        eps: entropic regularisation ε > 0 (in the units of ``cost``).
        mask_x, mask_y: boolean B×m, B×n, True on valid points (None: all valid).
        a, b: B×m, B×n marginals (None: uniform over valid points). Points with zero mass are treated as
            padded. Each problem's a and b must have the same total mass.
        max_iter: maximum number of iterations.
        tol: stop once max over the batch of ‖P 1 − a‖₁ < tol.
        check_every: iterations between convergence checks (and host synchronisations).
        grad: "envelope" (default) or "unrolled".
        stabilized: run the absorbed exp-domain blocks when safe (faster, same iterates); False for plain
            log-domain updates. Ignored (log-domain) for ``grad="unrolled"``.
    """
    if grad not in ("envelope", "unrolled"):
        raise ValueError(f"grad must be 'envelope' or 'unrolled', got {grad!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if max_iter < 1 or check_every < 1:
        raise ValueError(f"max_iter and check_every must be >= 1, got {max_iter}, {check_every}")
    single = cost.dim() == 2
    if single:
        cost = cost[None]
        mask_x, mask_y, a, b = (t if t is None else t[None] for t in (mask_x, mask_y, a, b))
    if cost.dim() != 3:
        raise ValueError(f"cost must be m×n or B×m×n, got shape {tuple(cost.shape)}")
    bsz, m, n = cost.shape
    dev = cost.device
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    cost = cost.to(dtype)
    if cost.numel() == 0:
        zero = cost.new_zeros(bsz)
        result = SinkhornResult(cost.new_zeros(bsz, m, n), zero, zero, 0, zero, True)
        return _squeeze(result) if single else result

    mask_x = torch.ones(bsz, m, dtype=torch.bool, device=dev) if mask_x is None else mask_x.to(dev, torch.bool)
    mask_y = torch.ones(bsz, n, dtype=torch.bool, device=dev) if mask_y is None else mask_y.to(dev, torch.bool)
    if mask_x.shape != (bsz, m) or mask_y.shape != (bsz, n):
        raise ValueError(
            f"masks must be {(bsz, m)} and {(bsz, n)}, got {tuple(mask_x.shape)}, {tuple(mask_y.shape)}"
        )
    if a is not None:
        mask_x = mask_x & (a > 0)
    if b is not None:
        mask_y = mask_y & (b > 0)
    active = mask_x.any(-1) & mask_y.any(-1)  # B: a problem needs a valid point on both sides
    mask_x, mask_y = mask_x & active[:, None], mask_y & active[:, None]
    a, b = _marginal(mask_x, a, dtype), _marginal(mask_y, b, dtype)
    log_a = torch.where(mask_x, a.clamp_min(torch.finfo(dtype).tiny).log(), 0.0)
    log_b = torch.where(mask_y, b.clamp_min(torch.finfo(dtype).tiny).log(), 0.0)
    mask_xy = mask_x[:, :, None] & mask_y[:, None, :]
    cost = torch.where(mask_xy, cost, 0.0)  # padded entries may hold anything (inf, NaN)

    unrolled = grad == "unrolled"
    fast = stabilized and not unrolled
    cut = _cutoff(dtype)
    with torch.set_grad_enabled(unrolled and torch.is_grad_enabled()):
        log_k = torch.where(mask_xy, cost * (-1.0 / eps), NEG)
        u = torch.zeros(bsz, m, dtype=dtype, device=dev)
        v = torch.zeros(bsz, n, dtype=dtype, device=dev)
        u, v = _log_step(log_k, u, v, log_a, log_b, mask_x, mask_y, cut)
        it, force_log, last_exp = 1, False, False
        saved = (u, v, it)  # the potentials before the last exp-domain block (set before each such block)
        kernel = None  # K̃ at the absorbed (u, v); the current plan is diag(α) K̃ diag(β)
        valid_x, valid_y = mask_x.to(dtype), mask_y.to(dtype)
        pad_x, pad_y = 1.0 - valid_x, 1.0 - valid_y
        while True:
            with torch.no_grad():
                if kernel is None:
                    kernel = _kernel(log_k, u, v, cut)
                    alpha, beta = valid_x, valid_y
                row = alpha * torch.bmm(beta[:, None, :], kernel.transpose(1, 2))[:, 0]  # P 1
                err = (row - a).abs().sum(-1)
                ratio = torch.where(mask_x, (row.log() - log_a).abs(), 0.0).max()
                scale = torch.maximum(_max_abs_log(alpha, mask_x), _max_abs_log(beta, mask_y))
                ok = torch.isfinite(err).all() & torch.isfinite(scale)
                worst, ratio, scale, ok = torch.stack([err.max(), ratio, scale, ok.to(dtype)]).tolist()
            if not ok:  # the last exp-domain block broke down: undo it and redo it in the log domain
                if not last_exp:
                    raise FloatingPointError("sinkhorn: non-finite potentials (inf/NaN cost on a valid entry?)")
                u, v, it = saved
                kernel, force_log, last_exp = None, True, False
                continue
            if worst < tol or it >= max_iter:
                break
            steps = min(check_every, max_iter - it)
            last_exp = fast and not force_log and ratio < LOG_SAFE
            force_log = False
            if scale > 0 and (not last_exp or scale > ABSORB):  # absorb the scalings into the potentials
                u, v = u + _log(alpha, mask_x), v + _log(beta, mask_y)
                kernel, alpha, beta, scale = None, valid_x, valid_y, 0.0
            if last_exp:
                saved = (u + _log(alpha, mask_x), v + _log(beta, mask_y), it)
                if kernel is None:
                    kernel = _kernel(log_k, u, v, cut)
                alpha, beta = _exp_block(kernel, a, b, beta, pad_x, pad_y, steps)
            else:
                for _ in range(steps):
                    u, v = _log_step(log_k, u, v, log_a, log_b, mask_x, mask_y, cut)
                kernel = None
            it += steps

        if scale > 0:
            u, v = u + _log(alpha, mask_x), v + _log(beta, mask_y)
        log_plan = log_k + u[:, :, None] + v[:, None, :]  # −1e30 on padded entries
        plan = torch.where(log_plan > cut, log_plan.clamp_min(cut).exp(), 0.0)

    transport = (plan * cost).sum((-2, -1))
    reg_value = transport + eps * (plan * log_plan.clamp_min(cut)).sum((-2, -1))  # 0·log 0 = 0
    result = SinkhornResult(plan, transport, reg_value, it, err, bool(worst < tol))
    return _squeeze(result) if single else result


def _squeeze(r: SinkhornResult) -> SinkhornResult:
    return SinkhornResult(r.plan[0], r.cost[0], r.reg_value[0], r.iterations, r.marginal_error[0], r.converged)
