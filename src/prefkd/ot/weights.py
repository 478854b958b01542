"""Cost weights α for the multi-cost OT problem C = Σ_k α_k Ĉ_k (docs/methods.md §8).

Modes of :class:`AdaptiveCostWeights`:

- ``fixed``: α given (K non-negative weights summing to 1).
- ``adaptive``: every ``update_interval`` optimizer steps, with c̄ the mean of the cost means observed
  since the last update,
      α = argmin_{Σα = 1, α ≥ α_min} c̄ᵀα + σ‖α − 1/K‖² = Π(1/K − c̄/(2σ)),
  Π the Euclidean projection onto {Σα = 1, α ≥ α_min} (:func:`adaptive_alpha`). Cheap costs get more weight.
- ``learned``: α = softmax(β), β a trainable parameter (trained with the projectors).

All state (α, the running sums, β) lives in buffers/parameters, so ``state_dict`` checkpoints it.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("fixed", "adaptive", "learned")


def combine_costs(costs: list[torch.Tensor] | tuple[torch.Tensor, ...], alpha: torch.Tensor) -> torch.Tensor:
    """C = Σ_k α_k C_k for K costs of the same shape (B×m×n) and α a K tensor (gradients flow to both)."""
    if alpha.dim() != 1 or alpha.shape[0] != len(costs):
        raise ValueError(f"alpha must be a vector of {len(costs)} weights (one per cost), got {tuple(alpha.shape)}")
    if not costs:
        raise ValueError("combine_costs needs at least one cost")
    shape = costs[0].shape
    if any(c.shape != shape for c in costs):
        raise ValueError(f"costs must share one shape, got {[tuple(c.shape) for c in costs]}")
    total = alpha[0] * costs[0]
    for k in range(1, len(costs)):
        total = total + alpha[k] * costs[k]
    return total


def project_to_capped_simplex(v: torch.Tensor, alpha_min: float = 0.0) -> torch.Tensor:
    """Euclidean projection of v (…×K) onto {α : Σ_k α_k = 1, α_k ≥ α_min}, exactly (sort-based).

    With w = α − α_min this is the projection of v − α_min onto the simplex of radius r = 1 − K·α_min:
    w = max(y − θ, 0) with y = v − α_min, θ = (Σ_{k≤ρ} y_(k) − r)/ρ over the ρ largest y (Held et al.).
    Requires 0 ≤ α_min ≤ 1/K.
    """
    k = v.shape[-1]
    if not 0.0 <= alpha_min <= 1.0 / k + 1e-12:
        raise ValueError(f"alpha_min must be in [0, 1/K] = [0, {1.0 / k:.4g}], got {alpha_min}")
    dtype = torch.promote_types(v.dtype, torch.float32)
    y = v.to(dtype) - alpha_min
    r = max(1.0 - k * alpha_min, 0.0)
    srt = y.sort(dim=-1, descending=True).values
    css = srt.cumsum(-1) - r
    idx = torch.arange(1, k + 1, dtype=dtype, device=v.device)
    rho = ((srt - css / idx) > 0).sum(-1, keepdim=True).clamp_min(1)  # number of positive coordinates
    theta = css.gather(-1, rho - 1) / rho.to(dtype)
    return (y - theta).clamp_min(0) + alpha_min


def adaptive_alpha(cost_means: torch.Tensor, sigma: float, alpha_min: float = 0.01) -> torch.Tensor:
    """α = Π(1/K − c̄/(2σ)), the minimiser of c̄ᵀα + σ‖α − 1/K‖² over {Σα = 1, α ≥ α_min} (docs/methods.md §8)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    c = cost_means.detach()
    return project_to_capped_simplex(1.0 / c.shape[-1] - c / (2.0 * sigma), alpha_min)


def _check_simplex(alpha: torch.Tensor, k: int | None) -> torch.Tensor:
    alpha = torch.as_tensor(alpha, dtype=torch.float32).detach().clone()
    if alpha.dim() != 1 or (k is not None and alpha.shape[0] != k):
        raise ValueError(f"cost weights must be a vector of {k} numbers, got shape {tuple(alpha.shape)}")
    if not torch.isfinite(alpha).all() or (alpha < 0).any():
        raise ValueError(f"cost weights must be finite and non-negative, got {alpha.tolist()}")
    if abs(alpha.sum().item() - 1.0) > 1e-5:
        raise ValueError(f"cost weights must sum to 1, got {alpha.tolist()} (sum {alpha.sum().item():.6g})")
    return alpha


class AdaptiveCostWeights(nn.Module):
    """The K cost weights α of one OT branch, in one of the modes ``fixed``, ``adaptive``, ``learned``.

    ``forward()`` returns α (K); ``combine(costs)`` returns Σ_k α_k C_k. For ``adaptive``, call
    ``observe(cost_means)`` after each batch (K values, e.g. the transport cost ⟨P, Ĉ_k⟩ of each scaled
    cost averaged over the batch) and ``on_optimizer_step(step)`` after each optimizer step: when
    ``step % update_interval == 0`` α becomes :func:`adaptive_alpha` of the mean of the observations since
    the last update, and the accumulator is reset. α starts at ``alpha`` (default uniform).

    Buffers: ``alpha`` (K; for ``learned`` it mirrors softmax(β) as of the last forward), ``cost_sum`` (K),
    ``cost_count`` (scalar), ``updates`` (number of adaptive updates). Under torch.distributed the sums and counts
are summed over processes at each update step (all processes call ``on_optimizer_step`` at the same steps), so
every process computes the same α. Parameter: ``beta`` (learned only,
    initialised to log α so that softmax(β) = α).
    """

    def __init__(
        self,
        num_costs: int | None = None,
        mode: str = "fixed",
        alpha: list[float] | torch.Tensor | None = None,
        sigma: float = 1.0,
        alpha_min: float = 0.01,
        update_interval: int = 100,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if alpha is None and num_costs is None:
            raise ValueError("give num_costs or alpha")
        k = num_costs if num_costs is not None else len(alpha)
        if k < 1:
            raise ValueError(f"num_costs must be >= 1, got {k}")
        alpha = torch.full((k,), 1.0 / k) if alpha is None else _check_simplex(alpha, k)
        if mode == "adaptive":
            if not sigma > 0:
                raise ValueError(f"sigma must be > 0, got {sigma}")
            if not 0.0 <= alpha_min <= 1.0 / k:
                raise ValueError(f"alpha_min must be in [0, 1/K] = [0, {1.0 / k:.4g}], got {alpha_min}")
            if int(update_interval) < 1:
                raise ValueError(f"update_interval must be >= 1, got {update_interval}")
        if mode == "learned" and (alpha <= 0).any():
            raise ValueError(f"learned weights start at softmax(log α): α must be > 0, got {alpha.tolist()}")
        self.mode, self.num_costs = mode, k
        self.sigma, self.alpha_min, self.update_interval = float(sigma), float(alpha_min), int(update_interval)
        self.register_buffer("alpha", alpha)
        self.register_buffer("cost_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("cost_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.beta = nn.Parameter(alpha.log()) if mode == "learned" else None

    def forward(self) -> torch.Tensor:
        """α, a K tensor on the simplex (differentiable in β for ``learned``)."""
        if self.mode == "learned":
            alpha = torch.softmax(self.beta, dim=0)
            self.alpha.copy_(alpha.detach())
            return alpha
        return self.alpha

    def combine(self, costs: list[torch.Tensor]) -> torch.Tensor:
        """Σ_k α_k C_k with the current α (K costs, each B×m×n)."""
        alpha = self()
        return combine_costs(costs, alpha.to(costs[0].dtype))

    @torch.no_grad()
    def observe(self, cost_means: torch.Tensor) -> None:
        """Accumulate one observation of the K cost means (detached; stays on device, no host sync)."""
        c = torch.as_tensor(cost_means).detach().reshape(-1)
        if c.shape[0] != self.num_costs:
            raise ValueError(f"expected {self.num_costs} cost means, got shape {tuple(c.shape)}")
        self.cost_sum += c.to(self.cost_sum)
        self.cost_count += 1

    @torch.no_grad()
    def on_optimizer_step(self, step: int) -> bool:
        """Adaptive mode: at ``step % update_interval == 0`` set α from the running means; True if updated."""
        if self.mode != "adaptive" or step % self.update_interval != 0:
            return False
        self._all_reduce()  # every process must see the same c̄ (docs/methods.md §2: 1×8 examples = 2×4 examples)
        if self.cost_count.item() == 0:
            return False
        means = self.cost_sum / self.cost_count
        self.alpha.copy_(adaptive_alpha(means, self.sigma, self.alpha_min).to(self.alpha))
        self.cost_sum.zero_()
        self.cost_count.zero_()
        self.updates += 1
        return True

    def _all_reduce(self) -> None:
        """Sum the running sums and counts over processes (torch.distributed, when initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.cat([self.cost_sum, self.cost_count.reshape(1)])
            dist.all_reduce(packed)
            self.cost_sum.copy_(packed[:-1])
            self.cost_count.copy_(packed[-1])

    def extra_repr(self) -> str:
        extra = f", sigma={self.sigma}, alpha_min={self.alpha_min}, update_interval={self.update_interval}"
        return f"mode={self.mode}, num_costs={self.num_costs}" + (extra if self.mode == "adaptive" else "")
