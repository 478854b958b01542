"""Semi-dual multi-cost entropic OT (docs/methods.md §8, "Semi-dual variant" of MCW-KD).

Per problem (batch index dropped): teacher points x_j (j ≤ m, marginal μ), student points y_i (i ≤ n,
marginal ν), K costs C_k (m×n, C_k[j, i] as everywhere in ``prefkd.ot``), weights α (K, e.g. softmax(β)),
a potential φ_j = φ(x_j) and its c-transforms (ε > 0, default 0.1)

    φ^{c_k}(y_i) = −ε log Σ_j μ_j exp((φ_j − C_k[j, i]) / ε)
    S(φ) = Σ_j μ_j φ_j + Σ_i ν_i Σ_k α_k φ^{c_k}(y_i)

For one cost and probability marginals, S is concave in φ, invariant to φ + const, and
max_φ S(φ) = min_P ⟨P, C⟩ + ε KL(P ‖ μ⊗ν) over the couplings P of μ and ν (the entropic OT value;
every φ gives a lower bound). φ is a small tanh-bounded network on the teacher points
(:class:`PotentialNetwork`).

Gradient convention (:class:`SemiDualOT`): ``fit`` runs a few Adam ascent steps on φ's parameters with
x, costs and α detached; ``forward`` returns S with φ's parameters detached, so the gradient reaches
x, the costs and α (envelope theorem at the fitted φ) but never φ, which the outer (minimising) optimizer
must not train.

Shapes: x B×m×d, costs K tensors B×m×n, α K, masks B×m / B×n (True = valid), result B. Padded points
have zero mass and padded cost/point entries may hold anything (inf, NaN: masked with ``torch.where``);
a problem without a valid point on one side gives 0. Compute in fp32 (bf16/fp16 upcast), fp64 kept.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from prefkd.ot.sinkhorn import NEG, _marginal


def _masks(shape, mask_x, mask_y, mu, nu, device):
    """Boolean B×m / B×n masks (points with zero given mass count as padded, inactive problems cleared)."""
    bsz, m, n = shape
    mx = torch.ones(bsz, m, dtype=torch.bool, device=device) if mask_x is None else mask_x.to(device, torch.bool)
    my = torch.ones(bsz, n, dtype=torch.bool, device=device) if mask_y is None else mask_y.to(device, torch.bool)
    if mx.shape != (bsz, m) or my.shape != (bsz, n):
        raise ValueError(f"masks must be {(bsz, m)} and {(bsz, n)}, got {tuple(mx.shape)}, {tuple(my.shape)}")
    mx = mx if mu is None else mx & (mu.to(device) > 0)
    my = my if nu is None else my & (nu.to(device) > 0)
    active = mx.any(-1) & my.any(-1)
    return mx & active[:, None], my & active[:, None]


def _dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _c_transform(phi, cost, eps, mx, my, log_mu):
    valid = mx[:, :, None] & my[:, None, :]
    z = torch.where(valid, (phi[:, :, None] - cost) / eps + log_mu[:, :, None], NEG)
    return torch.where(my, -eps * torch.logsumexp(z, dim=1), 0.0)


def c_transform(phi_x, cost, eps, mask_x=None, mask_y=None, mu=None) -> torch.Tensor:
    """φ^c(y_i) = −ε log Σ_j μ_j exp((φ_j − C[j, i]) / ε) over valid j, B×n (0 at padded i).

    phi_x: B×m potentials; cost: B×m×n; mu: B×m marginal (None: uniform over valid j).
    """
    dtype = _dtype(phi_x, cost)
    mx, my = _masks(cost.shape, mask_x, mask_y, mu, None, cost.device)
    mu = _marginal(mx, mu, dtype)
    log_mu = torch.where(mx, mu.clamp_min(torch.finfo(dtype).tiny).log(), 0.0)
    return _c_transform(torch.where(mx, phi_x.to(dtype), 0.0), cost.to(dtype), eps, mx, my, log_mu)


def semidual_objective(phi_x, costs, alpha, eps, mask_x=None, mask_y=None, mu=None, nu=None) -> torch.Tensor:
    """S(φ) = Σ_j μ_j φ_j + Σ_i ν_i Σ_k α_k φ^{c_k}(y_i), one value per problem (B).

    Args:
        phi_x: B×m potentials φ_j = φ(x_j) (values at padded j ignored).
        costs: K costs B×m×n (or one B×m×n tensor); alpha: K weights (None: uniform 1/K).
        eps: ε > 0. mask_x, mask_y: B×m, B×n bool. mu, nu: B×m, B×n marginals, each summing to 1
            (None: uniform over valid points).

    For K = 1 and the optimal φ, S equals the entropic OT value min_P ⟨P, C⟩ + ε KL(P ‖ μ⊗ν) (P a
    coupling of μ, ν); any other φ gives a lower bound. Differentiable in phi_x, the costs and alpha.
    """
    costs = [costs] if torch.is_tensor(costs) else list(costs)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    dtype = _dtype(phi_x, *costs)
    alpha = torch.full((len(costs),), 1.0 / len(costs), dtype=dtype, device=costs[0].device) if alpha is None else alpha
    if alpha.dim() != 1 or alpha.shape[0] != len(costs) or any(c.shape != costs[0].shape for c in costs):
        raise ValueError(f"need K costs of one shape and K weights, got {[tuple(c.shape) for c in costs]}, "
                         f"alpha {tuple(alpha.shape)}")
    mx, my = _masks(costs[0].shape, mask_x, mask_y, mu, nu, costs[0].device)
    mu, nu = _marginal(mx, mu, dtype), _marginal(my, nu, dtype)
    log_mu = torch.where(mx, mu.clamp_min(torch.finfo(dtype).tiny).log(), 0.0)
    phi = torch.where(mx, phi_x.to(dtype), 0.0)
    alpha = alpha.to(device=phi.device, dtype=dtype)
    dual = sum(alpha[k] * _c_transform(phi, c.to(dtype), eps, mx, my, log_mu) for k, c in enumerate(costs))
    return (mu * phi).sum(-1) + (nu * dual).sum(-1)


class PotentialNetwork(nn.Module):
    """φ(x) = bound · tanh(MLP(x) / bound), MLP = Linear(d, hidden) → SiLU → Linear(hidden, 1); B×m×d → B×m.

    The tanh keeps |φ| < ``bound`` (no runaway potentials) and is ≈ the identity for |MLP| ≪ bound. The
    optimal φ is defined up to a constant and spans about the cost range, ~1 for scaled costs
    (``scale_cost``), so the default bound 10 never binds at the optimum. fp32 parameters; inputs are cast
    to the parameters' dtype (:class:`SemiDualOT` runs it with autocast off).
    """

    def __init__(self, point_dim: int, hidden: int = 64, bound: float = 10.0):
        super().__init__()
        if not bound > 0:
            raise ValueError(f"bound must be > 0, got {bound}")
        self.bound = float(bound)
        self.mlp = nn.Sequential(nn.Linear(point_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x.to(self.mlp[0].weight.dtype))[..., 0]
        return self.bound * torch.tanh(out / self.bound)


class SemiDualOT(nn.Module):
    """Semi-dual multi-cost OT with a learned potential (module docstring for the equations).

    ``fit(x, costs, alpha, mask_x, mask_y)``: ``inner_steps`` Adam steps (lr ``inner_lr``) ascending the
    batch mean of S over φ's parameters, inputs detached; only when ``self.training`` and grad mode is on
    (so eval / ``no_grad`` / ``inference_mode`` passes never change φ; returns None then). Returns the
    detached batch mean of S at the last evaluated φ (before the last step). Under torch.distributed, φ is
    broadcast from rank 0 when the optimizer is created and gradients are averaged over ranks at each step,
    so all ranks keep the same φ (every rank must call ``fit`` equally often).

    ``forward(...)``: S (B) with φ's parameters detached (gradients to x, the costs and α only).

    ``state_dict`` holds φ's weights and, under ``_extra_state``, the inner Adam state as one flat fp64
    tensor [step, exp_avg…, exp_avg_sq…] (a tensor, so it fits safetensors checkpoints).
    """

    def __init__(self, point_dim: int, eps: float = 0.1, hidden: int = 64, bound: float = 10.0,
                 inner_steps: int = 5, inner_lr: float = 1e-2):
        super().__init__()
        if not eps > 0 or inner_steps < 0 or not inner_lr > 0:
            raise ValueError(f"need eps > 0, inner_steps >= 0, inner_lr > 0; got {eps}, {inner_steps}, {inner_lr}")
        self.eps, self.inner_steps, self.inner_lr = float(eps), int(inner_steps), float(inner_lr)
        self.potential = PotentialNetwork(point_dim, hidden, bound)
        self._opt: torch.optim.Adam | None = None

    def _optimizer(self) -> torch.optim.Adam:
        if self._opt is None:
            self._opt = torch.optim.Adam(self.potential.parameters(), lr=self.inner_lr)
        return self._opt

    def _phi(self, x, mask_x, params=None):
        if mask_x is not None:  # padded points may hold garbage: NaN inputs would poison the weight grads
            x = torch.where(mask_x.to(x.device, torch.bool)[..., None], x, 0.0)
        try:  # fp32 even inside the trainer's autocast region
            region = torch.autocast(device_type=x.device.type, enabled=False)
        except RuntimeError:  # a device type without autocast support
            region = nullcontext()
        with region:
            return self.potential(x) if params is None else torch.func.functional_call(self.potential, params, (x,))

    def fit(self, x, costs, alpha, mask_x=None, mask_y=None) -> torch.Tensor | None:
        if not (self.training and torch.is_grad_enabled()) or self.inner_steps == 0:
            return None
        distributed = dist.is_available() and dist.is_initialized()
        params = list(self.potential.parameters())
        if self._opt is None and distributed:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p, src=0)
        opt = self._optimizer()
        x, alpha = x.detach(), alpha.detach()
        costs = [costs.detach()] if torch.is_tensor(costs) else [c.detach() for c in costs]
        with torch.enable_grad():
            for _ in range(self.inner_steps):
                opt.zero_grad(set_to_none=True)
                value = semidual_objective(self._phi(x, mask_x), costs, alpha, self.eps, mask_x, mask_y).mean()
                (-value).backward()
                if distributed:
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    dist.all_reduce(flat)
                    flat /= dist.get_world_size()
                    for p, g in zip(params, flat.split([p.numel() for p in params])):
                        p.grad = g.view_as(p).clone()
                opt.step()
            opt.zero_grad(set_to_none=True)  # φ holds no gradient between fits (none ever comes from outside)
        return value.detach()

    def forward(self, x, costs, alpha, mask_x=None, mask_y=None) -> torch.Tensor:
        params = {name: p.detach() for name, p in self.potential.named_parameters()}
        return semidual_objective(self._phi(x, mask_x, params), costs, alpha, self.eps, mask_x, mask_y)

    def get_extra_state(self) -> torch.Tensor:
        params = list(self.potential.parameters())
        state = [] if self._opt is None else [self._opt.state.get(p, {}) for p in params]
        if not state or any("step" not in s for s in state):
            return torch.zeros(1 + 2 * sum(p.numel() for p in params), dtype=torch.float64, device=params[0].device)
        parts = [state[0]["step"].reshape(1).to(params[0].device)]
        parts += [s[key].reshape(-1) for key in ("exp_avg", "exp_avg_sq") for s in state]
        return torch.cat([t.to(torch.float64) for t in parts])

    def set_extra_state(self, state: torch.Tensor) -> None:
        params = list(self.potential.parameters())
        sizes = [p.numel() for p in params]
        if state.numel() != 1 + 2 * sum(sizes):
            raise ValueError(f"SemiDualOT optimizer state has {state.numel()} values, expected {1 + 2 * sum(sizes)}")
        self._opt = None
        step = float(state[0])
        if step == 0:  # never fitted: the optimizer is created at the first fit
            return
        opt = self._optimizer()
        chunks = state[1:].split(sizes + sizes)
        for p, avg, avg_sq in zip(params, chunks[: len(params)], chunks[len(params):]):
            opt.state[p] = {"step": torch.tensor(step, dtype=torch.float32),
                            "exp_avg": avg.to(p.device, p.dtype).view_as(p).clone(),
                            "exp_avg_sq": avg_sq.to(p.device, p.dtype).view_as(p).clone()}

    def extra_repr(self) -> str:
        return f"eps={self.eps}, inner_steps={self.inner_steps}, inner_lr={self.inner_lr}"
