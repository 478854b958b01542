"""prefkd.ot.sinkhorn against POT's log-domain solver, gradients, padding and numerical edge cases."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from prefkd.ot import SinkhornResult, sinkhorn

ot = pytest.importorskip("ot")

EPS = 0.05


def pot_plan(cost: torch.Tensor, eps: float, a=None, b=None) -> np.ndarray:
    """POT's log-domain Sinkhorn (fp64) on one m×n problem, converged far below our tolerances."""
    c = cost.double().numpy()
    m, n = c.shape
    a = np.full(m, 1.0 / m) if a is None else a.double().numpy()
    b = np.full(n, 1.0 / n) if b is None else b.double().numpy()
    return ot.sinkhorn(a, b, c, eps, method="sinkhorn_log", stopThr=1e-14, numItermax=100000)


def rand_cost(*shape, dtype=torch.float64, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("stabilized", [True, False])
def test_matches_pot_fp64(stabilized):
    cost = rand_cost(3, 12, 17)
    res = sinkhorn(cost, EPS, tol=1e-12, max_iter=20000, stabilized=stabilized)
    assert isinstance(res, SinkhornResult) and res.converged and res.plan.dtype == torch.float64
    for k in range(3):
        ref = pot_plan(cost[k], EPS)
        np.testing.assert_allclose(res.plan[k].numpy(), ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(res.plan[k].numpy(), ref, atol=1e-9, rtol=1e-6)  # in fact much closer
        assert abs(res.cost[k].item() - float((ref * cost[k].numpy()).sum())) < 1e-5
        reg = (ref * cost[k].numpy()).sum() + EPS * (ref * np.log(ref)).sum()
        assert abs(res.reg_value[k].item() - reg) < 1e-8


@pytest.mark.parametrize("stabilized", [True, False])
def test_matches_pot_fp32(stabilized):
    cost = rand_cost(3, 20, 15, dtype=torch.float32, seed=1)
    res = sinkhorn(cost, EPS, tol=1e-6, max_iter=5000, stabilized=stabilized)
    assert res.converged and res.plan.dtype == torch.float32
    for k in range(3):
        ref = pot_plan(cost[k], EPS)
        np.testing.assert_allclose(res.plan[k].numpy(), ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(res.plan[k].numpy(), ref, atol=1e-6, rtol=1e-3)
        assert abs(res.cost[k].item() - float((ref * cost[k].double().numpy()).sum())) < 1e-4


def padded_batch(dtype=torch.float64):
    """Four problems of different sizes in one 9×11 batch; padded cost entries hold garbage (inf, NaN)."""
    sizes = [(9, 11), (5, 7), (1, 4), (6, 1)]
    cost = rand_cost(4, 9, 11, dtype=dtype, seed=2) * 3
    mask_x = torch.zeros(4, 9, dtype=torch.bool)
    mask_y = torch.zeros(4, 11, dtype=torch.bool)
    for k, (m, n) in enumerate(sizes):
        mask_x[k, :m], mask_y[k, :n] = True, True
    cost[1, 5:, :] = float("inf")
    cost[1, :, 7:] = float("nan")
    cost[3, :, 1:] = -1e6
    return cost, mask_x, mask_y, sizes


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_masked_matches_pot_on_valid_subproblem(dtype, atol):
    cost, mask_x, mask_y, sizes = padded_batch(dtype)
    res = sinkhorn(cost, 0.1, mask_x, mask_y, tol=1e-12 if dtype == torch.float64 else 1e-6, max_iter=20000)
    assert res.converged
    assert torch.isfinite(res.plan).all() and torch.isfinite(res.cost).all() and torch.isfinite(res.reg_value).all()
    for k, (m, n) in enumerate(sizes):
        sub = cost[k, :m, :n]
        ref = pot_plan(sub, 0.1)
        np.testing.assert_allclose(res.plan[k, :m, :n].double().numpy(), ref, atol=atol, rtol=0)
        assert abs(res.cost[k].item() - float((ref * sub.double().numpy()).sum())) < atol
        pad = torch.ones(9, 11, dtype=torch.bool)
        pad[:m, :n] = False
        assert (res.plan[k][pad] == 0).all()


def test_given_marginals_match_pot():
    g = torch.Generator().manual_seed(3)
    cost = rand_cost(2, 8, 10, seed=3)
    a = torch.rand(2, 8, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(2, 10, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    res = sinkhorn(cost, EPS, a=a, b=b, tol=1e-12, max_iter=20000)
    for k in range(2):
        np.testing.assert_allclose(res.plan[k].numpy(), pot_plan(cost[k], EPS, a[k], b[k]), atol=1e-9)
    torch.testing.assert_close(res.plan.sum(-1), a, atol=1e-11, rtol=0)
    torch.testing.assert_close(res.plan.sum(-2), b, atol=1e-11, rtol=0)


def test_two_dim_input_is_one_problem():
    cost = rand_cost(6, 4)
    res = sinkhorn(cost, EPS, tol=1e-12)
    assert res.plan.shape == (6, 4) and res.cost.shape == () and res.marginal_error.shape == ()
    np.testing.assert_allclose(res.plan.numpy(), pot_plan(cost, EPS), atol=1e-9)


def test_envelope_gradient_is_plan_and_matches_fd_of_regularised_value():
    cost0, mask_x, mask_y, sizes = padded_batch()
    cost0 = torch.where(mask_x[:, :, None] & mask_y[:, None, :], cost0, 0.0)[:2, :6, :8]
    mask_x, mask_y = mask_x[:2, :6], mask_y[:2, :8]
    kw = dict(mask_x=mask_x, mask_y=mask_y, tol=1e-13, max_iter=20000)
    cost = cost0.clone().requires_grad_(True)
    res = sinkhorn(cost, 0.1, **kw)
    (g_reg,) = torch.autograd.grad(res.reg_value.sum(), cost, retain_graph=True)
    (g_cost,) = torch.autograd.grad(res.cost.sum(), cost)
    torch.testing.assert_close(g_reg, res.plan, atol=0, rtol=0)
    torch.testing.assert_close(g_cost, res.plan, atol=0, rtol=0)
    # central finite differences of the regularised value min_P <P,C> + eps sum P log P, on valid entries
    h = 1e-5
    for k, j, i in [(0, 0, 0), (0, 3, 5), (0, 5, 7), (1, 0, 2), (1, 4, 6), (1, 2, 3)]:
        e = torch.zeros_like(cost0)
        e[k, j, i] = h
        fd = (sinkhorn(cost0 + e, 0.1, **kw).reg_value[k] - sinkhorn(cost0 - e, 0.1, **kw).reg_value[k]) / (2 * h)
        assert abs(fd.item() - res.plan[k, j, i].item()) < 1e-8
    assert g_reg[1, 5:, :].abs().max() == 0  # padded rows of problem 1 (5 valid rows)


def test_unrolled_gradients():
    cost0 = rand_cost(2, 4, 5, seed=4)
    kw = dict(tol=1e-13, max_iter=20000)
    cost = cost0.clone().requires_grad_(True)
    env = sinkhorn(cost, 0.1, **kw)
    unr = sinkhorn(cost, 0.1, grad="unrolled", **kw)
    (g_reg,) = torch.autograd.grad(unr.reg_value.sum(), cost, retain_graph=True)
    torch.testing.assert_close(g_reg, env.plan, atol=1e-9, rtol=0)  # envelope theorem at convergence
    (g_cost,) = torch.autograd.grad(unr.cost.sum(), cost)  # the full derivative of <P*(C), C>
    h = 1e-6
    for k, j, i in [(0, 0, 0), (0, 2, 3), (1, 3, 4), (1, 1, 0)]:
        e = torch.zeros_like(cost0)
        e[k, j, i] = h
        fd = (sinkhorn(cost0 + e, 0.1, **kw).cost[k] - sinkhorn(cost0 - e, 0.1, **kw).cost[k]) / (2 * h)
        assert abs(fd.item() - g_cost[k, j, i].item()) < 1e-7


def test_unrolled_masked_gradient_is_finite():
    cost, mask_x, mask_y, _ = padded_batch(torch.float32)
    cost = cost.requires_grad_(True)
    res = sinkhorn(cost, 0.1, mask_x, mask_y, grad="unrolled", max_iter=50)
    (res.cost.sum() + res.reg_value.sum()).backward()
    assert torch.isfinite(cost.grad).all()
    valid = mask_x[:, :, None] & mask_y[:, None, :]
    assert (cost.grad[~valid] == 0).all()


@pytest.mark.parametrize("low", [0.0, -100.0])
def test_small_eps_on_unnormalised_costs_stays_finite(low):
    cost = low + rand_cost(2, 30, 40, dtype=torch.float32, seed=5) * (100 - low)
    mask_y = torch.ones(2, 40, dtype=torch.bool)
    mask_y[1, 25:] = False
    res = sinkhorn(cost, 0.01, mask_y=mask_y, max_iter=200)
    for t in (res.plan, res.cost, res.reg_value, res.marginal_error):
        assert torch.isfinite(t).all()
    assert res.iterations == 200 and not res.converged
    # columns are exact after every iteration, up to fp32 rounding of potentials of size |C|/ε ~ 1e4
    col = res.plan.sum(-2)
    torch.testing.assert_close(col[0], torch.full((40,), 1 / 40), atol=0, rtol=2e-3)
    torch.testing.assert_close(col[1, :25], torch.full((25,), 1 / 25), atol=0, rtol=2e-3)
    assert (col[1, 25:] == 0).all()
    assert (res.marginal_error <= 2.0 + 1e-5).all()


def _count_calls(monkeypatch, name):
    module = sys.modules["prefkd.ot.sinkhorn"]
    original, calls = getattr(module, name), []

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_stabilized_and_log_domain_give_the_same_iterates():
    cost = rand_cost(2, 15, 20, seed=10) * 100
    fast = sinkhorn(cost, 0.01, max_iter=300, tol=0.0)
    slow = sinkhorn(cost, 0.01, max_iter=300, tol=0.0, stabilized=False)
    assert fast.iterations == slow.iterations == 300
    torch.testing.assert_close(fast.plan, slow.plan, atol=1e-11, rtol=0)
    torch.testing.assert_close(fast.marginal_error, slow.marginal_error, atol=1e-11, rtol=0)


def test_log_domain_fallback_when_rows_are_far_off(monkeypatch):
    """A point of tiny mass that is the cheapest in an expensive column: after the first iteration its
    row sum is ~e^30 times its mass, so the next block must run in the log domain; still POT's answer."""
    g = torch.Generator().manual_seed(11)
    cost = rand_cost(2, 8, 10, seed=11)
    cost[:, :, 0] += 10
    cost[:, 0, 0] -= 5
    a = torch.rand(2, 8, generator=g, dtype=torch.float64)
    a[:, 0] = 1e-14
    b = torch.rand(2, 10, generator=g, dtype=torch.float64)
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    log_steps = _count_calls(monkeypatch, "_log_step")
    exp_blocks = _count_calls(monkeypatch, "_exp_block")
    res = sinkhorn(cost, 0.05, a=a, b=b, tol=1e-12, max_iter=20000)
    assert res.converged and len(log_steps) > 1 and len(exp_blocks) > 1
    for k in range(2):
        np.testing.assert_allclose(res.plan[k].numpy(), pot_plan(cost[k], 0.05, a[k], b[k]), atol=1e-10)


def test_broken_exp_block_is_undone_and_redone_in_log_domain(monkeypatch):
    module = sys.modules["prefkd.ot.sinkhorn"]
    original, calls = module._exp_block, []

    def broken_once(kernel, a, b, beta, *rest):
        calls.append(1)
        alpha, beta = original(kernel, a, b, beta, *rest)
        return (alpha * float("nan"), beta) if len(calls) == 2 else (alpha, beta)

    monkeypatch.setattr(module, "_exp_block", broken_once)
    cost = rand_cost(2, 12, 9, seed=12)
    res = sinkhorn(cost, 0.05, tol=1e-12, max_iter=20000)
    assert len(calls) > 2 and res.converged and torch.isfinite(res.plan).all()
    for k in range(2):
        np.testing.assert_allclose(res.plan[k].numpy(), pot_plan(cost[k], 0.05), atol=1e-10)


def test_one_valid_point():
    cost = rand_cost(2, 5, 6, seed=6)
    mask_x = torch.zeros(2, 5, dtype=torch.bool)
    mask_x[:, 2] = True
    mask_y = torch.ones(2, 6, dtype=torch.bool)
    mask_y[1] = False
    mask_y[1, 4] = True
    res = sinkhorn(cost, 0.1, mask_x, mask_y)
    assert res.converged
    torch.testing.assert_close(res.plan[0, 2], torch.full((6,), 1 / 6, dtype=torch.float64))
    assert res.plan[1, 2, 4] == pytest.approx(1.0) and res.plan[1].sum() == pytest.approx(1.0)
    assert res.cost[0].item() == pytest.approx(cost[0, 2].mean().item())
    assert res.cost[1].item() == pytest.approx(cost[1, 2, 4].item())


def test_fully_masked_problem_is_zero_and_does_not_disturb_the_batch():
    cost = rand_cost(3, 7, 8, seed=7)
    mask_x = torch.ones(3, 7, dtype=torch.bool)
    mask_y = torch.ones(3, 8, dtype=torch.bool)
    mask_y[1] = False  # no valid student point
    mask_x[2] = False  # no valid teacher point
    mask_x[0, 5:] = False  # and padded rows in problem 0
    cost[1:] = float("nan")
    res = sinkhorn(cost, 0.1, mask_x, mask_y, tol=1e-12)
    assert res.converged
    assert (res.plan[1:] == 0).all() and (res.cost[1:] == 0).all() and (res.reg_value[1:] == 0).all()
    assert (res.marginal_error[1:] == 0).all() and torch.isfinite(res.plan).all()
    alone = sinkhorn(cost[0, :5], 0.1, tol=1e-12)
    torch.testing.assert_close(res.plan[0, :5], alone.plan, atol=1e-12, rtol=0)


def test_bf16_is_upcast():
    cost = rand_cost(2, 10, 12, dtype=torch.bfloat16, seed=8)
    res = sinkhorn(cost, 0.1)
    assert res.plan.dtype == torch.float32 and res.cost.dtype == torch.float32
    ref = sinkhorn(cost.float(), 0.1)
    torch.testing.assert_close(res.plan, ref.plan, atol=0, rtol=0)
    cost.requires_grad_(True)
    sinkhorn(cost, 0.1).cost.sum().backward()
    assert cost.grad.dtype == torch.bfloat16


def test_iterations_reported():
    cost = rand_cost(4, 16, 16, dtype=torch.float32, seed=9)
    res = sinkhorn(cost, 0.1, tol=1e-5, max_iter=1000)
    assert res.converged and 1 < res.iterations < 1000
    assert res.marginal_error.shape == (4,) and (res.marginal_error < 1e-5).all()
    every = sinkhorn(cost, 0.1, tol=1e-5, check_every=1)
    assert every.converged and every.iterations <= res.iterations
    capped = sinkhorn(cost, 0.05, tol=1e-12, max_iter=7)
    assert capped.iterations == 7 and not capped.converged
    err = (capped.plan.sum(-1) - 1 / 16).abs().sum(-1)
    torch.testing.assert_close(capped.marginal_error, err, atol=1e-6, rtol=0)


def test_invalid_arguments():
    cost = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="grad"):
        sinkhorn(cost, 0.1, grad="implicit")
    with pytest.raises(ValueError, match="eps"):
        sinkhorn(cost, 0.0)
    with pytest.raises(ValueError, match="masks"):
        sinkhorn(cost, 0.1, mask_x=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(FloatingPointError):
        bad = cost.clone()
        bad[0, 1, :] = float("inf")
        sinkhorn(bad, 0.1)
