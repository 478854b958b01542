"""Semi-dual multi-cost OT: c-transform / objective against naive loops, duality with Sinkhorn, the
potential's fit, gradient routing, checkpointing of the inner optimizer, padding and dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from prefkd.ot import euclidean_cost, sinkhorn
from prefkd.ot.semidual import PotentialNetwork, SemiDualOT, c_transform, semidual_objective
from tests.helpers.distributed import gloo_group, spawn_ranks

EPS = 0.1


def gen(seed):
    return torch.Generator().manual_seed(seed)


def naive_c_transform(phi, cost, eps, mx, my, mu):
    """One problem, plain Python floats: φ^c(y_i) = −ε log Σ_{valid j} μ_j exp((φ_j − C_ji)/ε)."""
    m, n = cost.shape
    out = [0.0] * n
    for i in range(n):
        if my[i] and any(mx):
            s = sum(float(mu[j]) * math.exp((float(phi[j]) - float(cost[j, i])) / eps) for j in range(m) if mx[j])
            out[i] = -eps * math.log(s)
    return out


def naive_objective(phi, costs, alpha, eps, mx, my, mu, nu):
    if not (any(mx) and any(my)):
        return 0.0
    value = sum(float(mu[j] * phi[j]) for j in range(len(mx)) if mx[j])
    for k, cost in enumerate(costs):
        ct = naive_c_transform(phi, cost, eps, mx, my, mu)
        value += float(alpha[k]) * sum(float(nu[i]) * ct[i] for i in range(len(my)) if my[i])
    return value


def uniform(mask):
    return mask.double() / mask.sum(-1, keepdim=True).clamp_min(1)


def random_problem(bsz=4, m=6, n=5, k=3, seed=0, garbage=True):
    g = gen(seed)
    costs = [torch.rand(bsz, m, n, generator=g, dtype=torch.float64) * 2 for _ in range(k)]
    phi = torch.randn(bsz, m, generator=g, dtype=torch.float64)
    mx = torch.rand(bsz, m, generator=g) > 0.3
    my = torch.rand(bsz, n, generator=g) > 0.3
    mx[:, 0] = my[:, 0] = True
    alpha = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
    if garbage:  # padded entries hold inf / NaN
        pad = ~(mx[:, :, None] & my[:, None, :])
        costs = [c.masked_fill(pad, float("inf") if t % 2 else float("nan")) for t, c in enumerate(costs)]
        phi = phi.masked_fill(~mx, float("nan"))
    return phi, costs, alpha, mx, my


def test_c_transform_and_objective_match_naive_loops():
    phi, costs, alpha, mx, my = random_problem()
    mu = torch.rand(*mx.shape, generator=gen(5), dtype=torch.float64) * mx
    mu = mu / mu.sum(-1, keepdim=True)
    nu = torch.rand(*my.shape, generator=gen(6), dtype=torch.float64) * my
    nu = nu / nu.sum(-1, keepdim=True)
    for mu_, nu_ in ((None, None), (mu, nu)):
        ct = c_transform(phi, costs[0], EPS, mx, my, mu=mu_)
        obj = semidual_objective(phi, costs, alpha, EPS, mx, my, mu=mu_, nu=nu_)
        assert ct.dtype == obj.dtype == torch.float64 and torch.isfinite(ct).all() and torch.isfinite(obj).all()
        mu_r = uniform(mx) if mu_ is None else mu_
        nu_r = uniform(my) if nu_ is None else nu_
        for b in range(phi.shape[0]):
            ref = naive_c_transform(phi[b], costs[0][b], EPS, mx[b], my[b], mu_r[b])
            torch.testing.assert_close(ct[b], torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
            ref = naive_objective(phi[b], [c[b] for c in costs], alpha, EPS, mx[b], my[b], mu_r[b], nu_r[b])
            assert obj[b].item() == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_padding_equals_unpadded_problem_alone():
    phi, costs, alpha, mx, my = random_problem(seed=1)
    obj = semidual_objective(phi, costs, alpha, EPS, mx, my)
    for b in range(phi.shape[0]):
        jx, iy = mx[b].nonzero()[:, 0], my[b].nonzero()[:, 0]
        alone = semidual_objective(phi[b, jx][None], [c[b][jx][:, iy][None] for c in costs], alpha, EPS)
        assert obj[b].item() == pytest.approx(alone.item(), rel=1e-12, abs=1e-12)
    # gradients through padded garbage stay finite and are zero on padded entries
    phi = phi.clone().requires_grad_()
    costs = [c.clone().requires_grad_() for c in costs]
    semidual_objective(phi, costs, alpha, EPS, mx, my).sum().backward()
    pad = ~(mx[:, :, None] & my[:, None, :])
    assert torch.isfinite(phi.grad).all() and (phi.grad[~mx] == 0).all()
    for c in costs:
        assert torch.isfinite(c.grad).all() and (c.grad[pad] == 0).all() and (c.grad[~pad] != 0).any()


@pytest.mark.parametrize("marginals", [False, True])
def test_optimal_potential_gives_entropic_ot_value(marginals):
    bsz, m, n = 3, 7, 5
    _, costs, _, mx, my = random_problem(bsz, m, n, k=1, seed=2, garbage=False)
    cost = costs[0]
    a = b = None
    if marginals:
        a = (torch.rand(bsz, m, generator=gen(3), dtype=torch.float64) + 0.1) * mx
        b = (torch.rand(bsz, n, generator=gen(4), dtype=torch.float64) + 0.1) * my
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    mu = uniform(mx) if a is None else a
    nu = uniform(my) if b is None else b
    res = sinkhorn(cost, EPS, mx, my, a=a, b=b, tol=1e-10, max_iter=10000)
    assert res.converged
    plan, valid = res.plan, mx[:, :, None] & my[:, None, :]
    ratio = torch.where(valid, plan / (mu[:, :, None] * nu[:, None, :]), 1.0)
    value = (plan * cost).sum((1, 2)) + EPS * (plan * ratio.log()).sum((1, 2))  # ⟨P, C⟩ + ε KL(P ‖ μ⊗ν)
    # φ_j from the plan's first column: log P_j0 = log μ_j + log ν_0 + (φ_j + ψ_0 − C_j0)/ε, ψ_0 a constant
    phi = EPS * (plan[:, :, 0].clamp_min(1e-300).log() - mu.clamp_min(1e-300).log()) + cost[:, :, 0]
    phi = torch.where(mx, phi, 0.0).requires_grad_()
    cost = cost.clone().requires_grad_()
    obj = semidual_objective(phi, [cost], torch.ones(1, dtype=torch.float64), EPS, mx, my, mu=a, nu=b)
    torch.testing.assert_close(obj, value, rtol=0, atol=1e-8)
    obj.sum().backward()
    torch.testing.assert_close(cost.grad, plan, rtol=0, atol=1e-9)  # envelope: ∂S/∂C = P at the optimum
    assert phi.grad.abs().max() < 1e-9  # stationary point
    shifted = semidual_objective(phi.detach() + 3.0, [cost.detach()], None, EPS, mx, my, mu=a, nu=b)
    torch.testing.assert_close(shifted, value, rtol=0, atol=1e-8)  # invariant to φ + const
    for seed in range(5):  # weak duality: every other φ gives a lower value
        noise = 0.3 * torch.randn(bsz, m, generator=gen(seed), dtype=torch.float64)
        worse = semidual_objective(phi.detach() + noise, [cost.detach()], None, EPS, mx, my, mu=a, nu=b)
        assert (worse < value - 1e-6).all()


def test_multi_cost_one_hot_and_linearity():
    phi, costs, alpha, mx, my = random_problem(seed=3)
    singles = [semidual_objective(phi, [c], torch.ones(1, dtype=torch.float64), EPS, mx, my) for c in costs]
    for k in range(len(costs)):
        one_hot = torch.nn.functional.one_hot(torch.tensor(k), len(costs)).double()
        torch.testing.assert_close(semidual_objective(phi, costs, one_hot, EPS, mx, my), singles[k])
    # Σ_k α_k = 1: S is the α-mixture of the single-cost objectives, and ∂S/∂α_k = ⟨ν, φ^{c_k}⟩
    alpha = alpha.clone().requires_grad_()
    mixed = semidual_objective(phi, costs, alpha, EPS, mx, my)
    torch.testing.assert_close(mixed, sum(alpha[k].detach() * singles[k] for k in range(len(costs))))
    mixed.sum().backward()
    nu = uniform(my)
    expected = [(nu * c_transform(phi, c, EPS, mx, my)).sum() for c in costs]
    torch.testing.assert_close(alpha.grad, torch.stack(expected))
    with pytest.raises(ValueError, match="K weights"):
        semidual_objective(phi, costs, alpha[:2], EPS, mx, my)


def fit_problem(seed=0, bsz=2, m=6, n=5, d=3):
    g = gen(seed)
    x, y = torch.randn(bsz, m, d, generator=g), torch.randn(bsz, n, d, generator=g)
    mx, my = torch.ones(bsz, m, dtype=torch.bool), torch.ones(bsz, n, dtype=torch.bool)
    mx[1, -1] = my[1, -2:] = False
    x = x.masked_fill(~mx[..., None], float("nan"))  # padded points hold garbage
    c1 = euclidean_cost(x.nan_to_num(), y)
    c2 = (x.nan_to_num()[:, :, None, :1] - y[:, None, :, :1]).abs()[..., 0]
    costs = [c1 / c1.mean(), c2 / c2.mean()]
    return x, costs, torch.tensor([0.7, 0.3]), mx, my


def kl_value(cost, mx, my):
    """min_P ⟨P, C⟩ + ε KL(P ‖ μ⊗ν) with uniform marginals, from a converged fp64 Sinkhorn plan."""
    res = sinkhorn(cost.double(), EPS, mx, my, tol=1e-10, max_iter=10000)
    mu, nu = uniform(mx), uniform(my)
    ratio = torch.where(res.plan > 0, res.plan / (mu[:, :, None] * nu[:, None, :]), 1.0)
    return (res.plan * cost.double()).sum((1, 2)) + EPS * (res.plan * ratio.log()).sum((1, 2))


def free_optimum(costs, alpha, mx, my):
    """max over a free B×m tensor φ of the semi-dual objective (concave; LBFGS in fp64)."""
    phi = torch.zeros(mx.shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([phi], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    costs, alpha = [c.double() for c in costs], alpha.double()

    def closure():
        opt.zero_grad()
        loss = -semidual_objective(phi, costs, alpha, EPS, mx, my).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return semidual_objective(phi, costs, alpha, EPS, mx, my).detach()


@pytest.mark.parametrize("single", [True, False])
def test_fit_ascends_to_the_optimum(single):
    x, costs, alpha, mx, my = fit_problem()
    if single:
        costs, alpha = costs[:1], torch.ones(1)
        best = kl_value(costs[0], mx, my)  # the entropic OT value (strong duality)
    else:
        best = free_optimum(costs, alpha, mx, my)
        upper = sum(alpha[k] * kl_value(costs[k], mx, my) for k in range(2))  # S = Σ α_k S_k ≤ Σ α_k OT_k
        assert (best <= upper).all()
    torch.manual_seed(0)
    ot = SemiDualOT(point_dim=3)  # defaults: 5 Adam steps at lr 1e-2 per fit
    values = [ot(x, costs, alpha, mx, my).double()]
    for _ in range(100):
        ot.fit(x, costs, alpha, mx, my)
        values.append(ot(x, costs, alpha, mx, my).double())
    assert (values[10] > values[0] + 0.05).all() and (values[100] > values[10]).all()
    assert (values[100] <= best + 1e-5).all()  # weak duality: a lower bound
    assert (best - values[100]).max() < 1e-4, (best, values[0], values[100])


def test_forward_gradients_reach_inputs_not_potential():
    x, costs, alpha, mx, my = fit_problem(seed=1)
    torch.manual_seed(0)
    ot = SemiDualOT(point_dim=3)
    x = x.clone().requires_grad_()
    costs = [c.clone().requires_grad_() for c in costs]
    beta = torch.zeros(2, requires_grad=True)
    ot(x, costs, torch.softmax(beta, 0) + torch.tensor([0.2, -0.2]), mx, my).sum().backward()
    assert all(p.grad is None for p in ot.potential.parameters())
    assert torch.isfinite(x.grad).all() and x.grad[mx].abs().sum() > 0 and (x.grad[~mx] == 0).all()
    assert all(torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0 for c in costs)
    assert torch.isfinite(beta.grad).all() and beta.grad.abs().sum() > 0
    # fit touches neither the inputs' grads nor the outer graph, and gives φ (only) fresh values
    before = [p.detach().clone() for p in ot.potential.parameters()]
    grads = (x.grad.clone(), beta.grad.clone())
    value = ot.fit(x, costs, torch.softmax(beta, 0), mx, my)
    assert value.shape == () and not value.requires_grad and torch.isfinite(value)
    assert torch.equal(x.grad, grads[0]) and torch.equal(beta.grad, grads[1])
    assert all(not torch.equal(p, q) for p, q in zip(ot.potential.parameters(), before))
    assert all(torch.isfinite(p).all() for p in ot.potential.parameters())


def test_fit_skipped_in_eval_and_no_grad():
    x, costs, alpha, mx, my = fit_problem()
    ot = SemiDualOT(point_dim=3)
    before = [p.detach().clone() for p in ot.potential.parameters()]
    with torch.no_grad():
        assert ot.fit(x, costs, alpha, mx, my) is None
    ot.eval()
    assert ot.fit(x, costs, alpha, mx, my) is None
    assert all(torch.equal(p, q) for p, q in zip(ot.potential.parameters(), before))
    ot.train()
    assert ot.fit(x, costs, alpha, mx, my) is not None
    assert not all(torch.equal(p, q) for p, q in zip(ot.potential.parameters(), before))


def test_state_dict_round_trip_restores_optimizer(tmp_path):
    from safetensors.torch import load_file, save_file

    x, costs, alpha, mx, my = fit_problem(seed=2)
    torch.manual_seed(0)
    a = SemiDualOT(point_dim=3, inner_steps=3)
    b = SemiDualOT(point_dim=3, inner_steps=3)  # different initial weights
    fresh = {k: v.clone() for k, v in b.state_dict().items()}
    assert fresh["_extra_state"].abs().sum() == 0  # never fitted: empty optimizer state
    for _ in range(3):
        a.fit(x, costs, alpha, mx, my)
    save_file({k: v.detach().contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "s.safetensors"))
    b.load_state_dict(load_file(str(tmp_path / "s.safetensors")))
    weights_only = SemiDualOT(point_dim=3, inner_steps=3)
    weights_only.potential.load_state_dict(a.potential.state_dict())
    assert torch.equal(a(x, costs, alpha, mx, my), b(x, costs, alpha, mx, my))
    a.fit(x, costs, alpha, mx, my)
    b.fit(x, costs, alpha, mx, my)
    weights_only.fit(x, costs, alpha, mx, my)
    for p, q, _r in zip(a.potential.parameters(), b.potential.parameters(), weights_only.potential.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, r) for p, r in zip(a.potential.parameters(), weights_only.potential.parameters()))
    assert torch.equal(a.state_dict()["_extra_state"], b.state_dict()["_extra_state"])
    assert a.state_dict()["_extra_state"][0] == 4 * 3  # Adam step count
    b.load_state_dict(fresh)  # back to a never-fitted module: the optimizer is reset
    assert b._opt is None and torch.equal(b.state_dict()["_extra_state"], fresh["_extra_state"])


def test_inactive_problems_and_low_precision():
    phi, costs, alpha, mx, my = random_problem(bsz=3, seed=4)
    mx[0] = False  # no teacher point
    my[1] = False  # no student point
    phi_g = phi.clone().requires_grad_()
    obj = semidual_objective(phi_g, costs, alpha, EPS, mx, my)
    assert obj[0] == 0 and obj[1] == 0 and torch.isfinite(obj).all() and obj[2] != 0
    assert (c_transform(phi, costs[0], EPS, mx, my)[:2] == 0).all()
    obj.sum().backward()
    assert torch.isfinite(phi_g.grad).all() and (phi_g.grad[:2] == 0).all()
    # bf16 inputs are computed in fp32
    phi, costs, alpha, mx, my = random_problem(seed=5, garbage=False)
    lo = [c.to(torch.bfloat16) for c in costs]
    obj = semidual_objective(phi.to(torch.bfloat16), lo, alpha.to(torch.bfloat16), EPS, mx, my)
    ref = semidual_objective(phi.to(torch.bfloat16).double(), [c.double() for c in lo],
                             alpha.to(torch.bfloat16).double(), EPS, mx, my)
    assert obj.dtype == torch.float32
    torch.testing.assert_close(obj.double(), ref, rtol=1e-5, atol=1e-5)
    x, costs, alpha, mx, my = fit_problem()
    ot = SemiDualOT(point_dim=3)
    out = ot(x.to(torch.bfloat16), [c.to(torch.bfloat16) for c in costs], alpha.to(torch.bfloat16), mx, my)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert ot.fit(x.to(torch.bfloat16), [c.to(torch.bfloat16) for c in costs], alpha, mx, my).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in ot.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the potential stays fp32 under autocast
        auto = ot(x, costs, alpha, mx, my)
    assert auto.dtype == torch.float32 and torch.equal(auto, ot(x, costs, alpha, mx, my))


def test_potential_network_is_bounded():
    net = PotentialNetwork(point_dim=4, hidden=8, bound=2.0)
    x = 1e3 * torch.randn(2, 5, 4, generator=gen(0))
    out = net(x)
    assert out.shape == (2, 5) and (out.abs() <= 2.0).all() and (out.abs() > 1.0).any()


def _distributed_worker(rank, world, init_file, out_dir):
    with gloo_group(rank, world, init_file):
        x, costs, alpha, mx, my = fit_problem(seed=rank)  # different data on each rank
        torch.manual_seed(100 + rank)  # and different initial φ: the first fit broadcasts rank 0's
        ot = SemiDualOT(point_dim=3, inner_steps=3)
        for _ in range(2):
            ot.fit(x, costs, alpha, mx, my)
        torch.save({k: v.clone() for k, v in ot.state_dict().items()}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow  # spawns two processes (~5 s)
def test_distributed_ranks_share_one_potential(tmp_path):
    """Two gloo ranks = one process fitting on both batches (same mean gradient), φ identical across ranks."""
    states = spawn_ranks(_distributed_worker, tmp_path)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    problems = [fit_problem(seed=r) for r in range(2)]
    x = torch.cat([p[0] for p in problems])
    costs = [torch.cat([p[1][k] for p in problems]) for k in range(2)]
    mx, my = torch.cat([p[3] for p in problems]), torch.cat([p[4] for p in problems])
    torch.manual_seed(100)
    ref = SemiDualOT(point_dim=3, inner_steps=3)
    for _ in range(2):
        ref.fit(x, costs, problems[0][2], mx, my)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(states[0][key], value, rtol=1e-4, atol=1e-5)  # Adam amplifies rounding of g ≈ 0
