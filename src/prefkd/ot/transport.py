"""The transport of a multi-cost OT term (docs/methods.md §8): the value OT_b of one transport problem per example over
several scaled costs Ĉ_k combined by weights α, solved entropically (Sinkhorn) or through the semi-dual.

Both transports share one interface, so a loss swaps the solver, not its own class:

    transport.build({branch: point_dim}, device)                 # once, when the models' sizes are known
    ot_b, diagnostics = transport(branch, points, scaled, weights, valid_t, valid_s, pairs)

``points`` B×m×p: the teacher cloud (the semi-dual's potential reads it); ``scaled``: [Ĉ_k] each B×m×n; ``weights``:
the branch's :class:`~prefkd.ot.weights.AdaptiveCostWeights` (α = ``weights()``); ``valid_t`` B×m, ``valid_s`` B×n:
the points; ``pairs`` B×m×n: their valid pairs. ``ot_b`` (B) carries the gradient to the costs and α.

- :class:`SinkhornTransport`: OT_b = ⟨P*, Σ_k α_k Ĉ_k⟩ with P* the entropic plan of
  :func:`~prefkd.ot.sinkhorn.sinkhorn`. Adaptive α observes the batch mean of ⟨P*, Ĉ_k⟩ over the problems
  with points on both sides (training only).
- :class:`SemiDualTransport`: OT_b = max_φ Σ_j μ_j φ(x_j) + Σ_i ν_i Σ_k α_k φ^{c_k}(y_i), one potential network φ
  per branch (:class:`~prefkd.ot.semidual.SemiDualOT`), fitted by its own inner steps on each training forward.
"""

from __future__ import annotations

import torch
from torch import nn

from prefkd.ot.semidual import SemiDualOT
from prefkd.ot.sinkhorn import sinkhorn
from prefkd.ot.weights import AdaptiveCostWeights


class SinkhornTransport(nn.Module):
    """Entropic OT by log-stabilised Sinkhorn (ε ``eps``, ``max_iter``, ``tol``; gradient ``grad``: envelope or
    unrolled). No parameters. Diagnostics: ``iters`` (iterations of the batch) and ``marginal_err`` (the mean marginal
    error of the problems with points on both sides)."""

    supports_adaptive = True

    def __init__(self, eps: float = 0.1, max_iter: int = 1000, tol: float = 1e-6, grad: str = "envelope"):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps={eps}: need eps > 0")
        if grad not in ("envelope", "unrolled"):
            raise ValueError(f"sinkhorn_grad must be 'envelope' or 'unrolled', got {grad!r}")
        self.eps, self.max_iter, self.tol, self.grad = eps, int(max_iter), tol, grad

    def build(self, dims: dict[str, int], device: torch.device | None) -> None:
        """Nothing to build (no parameters)."""

    def forward(self, branch: str, points: torch.Tensor, scaled: list[torch.Tensor], weights: AdaptiveCostWeights,
                valid_t: torch.Tensor, valid_s: torch.Tensor,
                pairs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        res = sinkhorn(weights.combine(scaled), self.eps, mask_x=valid_t, mask_y=valid_s, max_iter=self.max_iter,
                       tol=self.tol, grad=self.grad)
        active = valid_t.any(1) & valid_s.any(1)  # problems with points on both sides
        if weights.mode == "adaptive" and torch.is_grad_enabled():  # training only: dev batches do not move α
            plan = res.plan.detach()
            per_cost = torch.stack([(plan * torch.where(pairs, c.detach(), 0)).sum((1, 2)) for c in scaled], -1)
            on = active.to(per_cost.dtype)
            weights.observe((per_cost * on[:, None]).sum(0) / on.sum().clamp_min(1))
        error = res.marginal_error[active].mean() if active.any() else res.marginal_error.new_zeros(())
        return res.cost, {"iters": torch.as_tensor(float(res.iterations)), "marginal_err": error.detach()}


class SemiDualTransport(nn.Module):
    """Semi-dual OT with one tanh-bounded potential network φ per branch (width ``hidden``, bound ``bound``), built by
    :meth:`build` from the branches' point sizes. Each training forward first runs ``inner_steps`` Adam steps (lr
    ``inner_lr``) on φ with the costs and points detached; the value at the current φ then carries gradients to the
    costs, the points and α, never to φ. φ's weights and inner Adam state are in the state_dict. Refuses adaptive α
    (it needs a plan)."""

    supports_adaptive = False

    def __init__(self, eps: float = 0.1, hidden: int = 64, bound: float = 10.0, inner_steps: int = 5,
                 inner_lr: float = 1e-2):
        super().__init__()
        self.eps, self.hidden, self.bound = float(eps), int(hidden), float(bound)
        self.inner_steps, self.inner_lr = int(inner_steps), float(inner_lr)
        self.potentials = nn.ModuleDict()  # per branch, from build()

    def build(self, dims: dict[str, int], device: torch.device | None) -> None:
        """One potential per branch of ``dims`` (branch → point size); idempotent."""
        if len(self.potentials):
            return
        self.potentials.update({
            branch: SemiDualOT(dim, eps=self.eps, hidden=self.hidden, bound=self.bound, inner_steps=self.inner_steps,
                               inner_lr=self.inner_lr).to(device)
            for branch, dim in dims.items()})

    def forward(self, branch: str, points: torch.Tensor, scaled: list[torch.Tensor], weights: AdaptiveCostWeights,
                valid_t: torch.Tensor, valid_s: torch.Tensor,
                pairs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if branch not in self.potentials:
            raise RuntimeError("the semi-dual transport has no potential for the "
                               f"{branch} branch: call loss.build(student_model, teacher_model) first")
        alpha = weights()
        potential = self.potentials[branch]
        if torch.is_grad_enabled() and self.training:
            potential.fit(points, scaled, alpha, valid_t, valid_s)
        return potential(points, scaled, alpha, valid_t, valid_s), {}
