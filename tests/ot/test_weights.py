"""Cost weights: combination, capped-simplex projection, the adaptive closed form, the module's modes."""

from __future__ import annotations

import itertools

import pytest
import torch

from prefkd.ot import AdaptiveCostWeights, adaptive_alpha, combine_costs, project_to_capped_simplex
from tests.helpers.distributed import gloo_group, spawn_ranks


def test_combine_costs():
    costs = [torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    alpha = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    total = combine_costs(costs, alpha)
    torch.testing.assert_close(total, 0.2 * costs[0] + 0.5 * costs[1] + 0.3 * costs[2])
    total.sum().backward()
    torch.testing.assert_close(alpha.grad, torch.stack([c.sum() for c in costs]))
    with pytest.raises(ValueError, match="one per cost"):
        combine_costs(costs, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="shape"):
        combine_costs([costs[0], costs[1][:, :2]], torch.tensor([0.5, 0.5]))


def check_projection(v: torch.Tensor, alpha: torch.Tensor, alpha_min: float) -> None:
    """KKT conditions of min ‖α − v‖² s.t. Σα = 1, α ≥ α_min: α_k = max(v_k − θ, α_min) for one θ."""
    assert alpha.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (alpha >= alpha_min - 1e-7).all()
    free = alpha > alpha_min + 1e-7
    if free.any():
        theta = (v - alpha)[free]
        assert theta.max() - theta.min() < 1e-6  # one multiplier for the free coordinates
        assert ((v - theta[0])[~free] <= alpha_min + 1e-6).all()  # clamped ones would go below α_min


@pytest.mark.parametrize("k,alpha_min", [(2, 0.0), (3, 0.01), (5, 0.05), (8, 0.125)])
def test_projection_kkt(k, alpha_min):
    g = torch.Generator().manual_seed(k)
    for scale in (0.1, 1.0, 100.0):
        v = torch.randn(20, k, generator=g, dtype=torch.float64) * scale
        alpha = project_to_capped_simplex(v, alpha_min)
        assert alpha.shape == v.shape
        for row_v, row_a in zip(v, alpha):
            check_projection(row_v, row_a, alpha_min)
    inside = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    torch.testing.assert_close(project_to_capped_simplex(inside, 0.01), inside)  # a point of the set stays
    with pytest.raises(ValueError, match="alpha_min"):
        project_to_capped_simplex(torch.zeros(3), 0.5)


def test_adaptive_alpha_against_a_fine_grid():
    """K = 3: minimise c̄ᵀα + σ‖α − 1/3‖² over a 1e-3 grid of {Σα = 1, α ≥ α_min}."""
    alpha_min, step = 0.01, 1e-3
    grid = torch.arange(alpha_min, 1 - 2 * alpha_min + step / 2, step, dtype=torch.float64)
    a1, a2 = torch.meshgrid(grid, grid, indexing="ij")
    a3 = 1 - a1 - a2
    keep = a3 >= alpha_min - 1e-12
    pts = torch.stack([a1[keep], a2[keep], a3[keep]], dim=1)  # N×3
    for c_bar, sigma in [((0.3, 0.9, 0.5), 1.0), ((2.0, 0.1, 0.1), 0.7), ((0.5, 0.5, 0.5), 2.0),
                         ((10.0, 0.0, 5.0), 1.5), ((0.2, 0.25, 0.3), 2.0)]:
        c = torch.tensor(c_bar, dtype=torch.float64)
        objective = pts @ c + sigma * ((pts - 1 / 3) ** 2).sum(1)
        best = pts[objective.argmin()]
        got = adaptive_alpha(c, sigma, alpha_min)
        assert (got - best).abs().max() < 2 * step, (c_bar, sigma, got, best)
        got_value = got @ c + sigma * ((got - 1 / 3) ** 2).sum()
        assert got_value <= objective.min() + 1e-12  # the exact minimiser is at least as good as the grid
        check_projection(1 / 3 - c / (2 * sigma), got, alpha_min)


def test_adaptive_alpha_stays_on_the_capped_simplex():
    g = torch.Generator().manual_seed(0)
    for k, sigma, alpha_min in itertools.product((2, 3, 6), (0.7, 2.0), (0.0, 0.01, 0.1)):
        for _ in range(10):
            c = torch.rand(k, generator=g) * torch.tensor(10.0) ** torch.randint(-2, 3, (1,), generator=g)
            alpha = adaptive_alpha(c, sigma, alpha_min)
            assert alpha.sum().item() == pytest.approx(1.0, abs=1e-5)
            assert (alpha >= alpha_min - 1e-6).all()
            assert alpha[c.argmin()] == alpha.max()  # the cheapest cost gets the largest weight
    torch.testing.assert_close(adaptive_alpha(torch.full((4,), 3.0), 1.0), torch.full((4,), 0.25))


def test_fixed_mode_and_validation():
    w = AdaptiveCostWeights(mode="fixed", alpha=[0.2, 0.5, 0.3])
    torch.testing.assert_close(w(), torch.tensor([0.2, 0.5, 0.3]))
    assert w.on_optimizer_step(100) is False
    costs = [torch.full((1, 2, 2), float(k)) for k in range(3)]
    torch.testing.assert_close(w.combine(costs), torch.full((1, 2, 2), 0.5 + 0.6))
    assert list(w.parameters()) == []
    with pytest.raises(ValueError, match="vector of 3"):
        AdaptiveCostWeights(num_costs=3, alpha=[0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        AdaptiveCostWeights(alpha=[1.2, -0.2])
    with pytest.raises(ValueError, match="sum to 1"):
        AdaptiveCostWeights(alpha=[0.2, 0.2])
    with pytest.raises(ValueError, match="mode"):
        AdaptiveCostWeights(3, mode="sometimes")
    with pytest.raises(ValueError, match="alpha_min"):
        AdaptiveCostWeights(3, mode="adaptive", alpha_min=0.5)
    with pytest.raises(ValueError, match="sigma"):
        AdaptiveCostWeights(3, mode="adaptive", sigma=0.0)
    with pytest.raises(ValueError, match="cost means"):
        w.observe(torch.ones(2))


def test_adaptive_mode_updates_every_interval_from_running_means():
    w = AdaptiveCostWeights(3, mode="adaptive", sigma=0.7, alpha_min=0.01, update_interval=4)
    torch.testing.assert_close(w(), torch.full((3,), 1 / 3))
    obs = [torch.tensor([0.9, 0.2, 0.5]), torch.tensor([1.1, 0.4, 0.3]), torch.tensor([1.0, 0.3, 0.4])]
    for step, o in enumerate(obs, start=1):
        w.observe(o)
        assert w.on_optimizer_step(step) is False  # steps 1..3: no update
    torch.testing.assert_close(w(), torch.full((3,), 1 / 3))
    w.observe(torch.tensor([1.0, 0.3, 0.4]))
    assert w.on_optimizer_step(4) is True
    mean = torch.stack(obs + [torch.tensor([1.0, 0.3, 0.4])]).double().mean(0)
    torch.testing.assert_close(w(), adaptive_alpha(mean, 0.7, 0.01).float())
    assert w.cost_count.item() == 0 and (w.cost_sum == 0).all() and w.updates.item() == 1
    assert w.on_optimizer_step(8) is False  # nothing observed since the last update: α kept


def test_adaptive_state_dict_round_trip():
    kw = dict(num_costs=3, mode="adaptive", sigma=2.0, alpha_min=0.01, update_interval=2)
    w = AdaptiveCostWeights(**kw)
    for step in range(1, 6):
        w.observe(torch.tensor([0.1 * step, 0.5, 0.3]))
        w.on_optimizer_step(step)
    state = w.state_dict()
    assert {"alpha", "cost_sum", "cost_count", "updates"} <= set(state)
    restored = AdaptiveCostWeights(**kw)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(), w())
    assert restored.cost_count.item() == 1 and restored.updates.item() == 2
    for module in (w, restored):  # both continue identically
        module.observe(torch.tensor([0.9, 0.1, 0.3]))
        module.on_optimizer_step(6)
    torch.testing.assert_close(restored(), w())


def test_learned_mode_is_softmax_of_a_trainable_beta():
    w = AdaptiveCostWeights(mode="learned", alpha=[0.3, 0.5, 0.2])
    torch.testing.assert_close(w(), torch.tensor([0.3, 0.5, 0.2]))
    assert [name for name, _ in w.named_parameters()] == ["beta"]
    costs = [torch.full((1, 2, 2), float(k)) for k in range(3)]
    opt = torch.optim.SGD(w.parameters(), lr=1.0)
    w.combine(costs).sum().backward()
    opt.step()
    alpha = w()
    assert alpha.sum().item() == pytest.approx(1.0) and alpha[0] > 0.3 and alpha[2] < 0.2  # cheap cost gains
    restored = AdaptiveCostWeights(mode="learned", num_costs=3)
    restored.load_state_dict(w.state_dict())
    torch.testing.assert_close(restored(), alpha.detach())
    with pytest.raises(ValueError, match="> 0"):
        AdaptiveCostWeights(mode="learned", alpha=[1.0, 0.0])


def _adaptive_worker(rank, world, init_file, out_dir):
    with gloo_group(rank, world, init_file):
        w = AdaptiveCostWeights(3, mode="adaptive", sigma=0.5, alpha_min=0.01, update_interval=2)
        observations = [torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.1, 0.7, 0.3])][rank::world]
        for c in observations * 2:  # this rank's observations, twice
            w.observe(c)
        w.on_optimizer_step(2)
        torch.save(w.state_dict(), f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow  # spawns two processes (~4 s)
def test_adaptive_alpha_is_the_same_on_every_process(tmp_path):
    """Two processes with different observations update α from the mean over BOTH (= one process seeing all)."""
    states = spawn_ranks(_adaptive_worker, tmp_path)
    single = AdaptiveCostWeights(3, mode="adaptive", sigma=0.5, alpha_min=0.01, update_interval=2)
    for c in [torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.1, 0.7, 0.3])] * 2:
        single.observe(c)
    single.on_optimizer_step(2)
    expected = adaptive_alpha(torch.tensor([0.15, 0.6, 0.6], dtype=torch.float64), 0.5, 0.01).float()
    for state in states:
        torch.testing.assert_close(state["alpha"], single.alpha)
        torch.testing.assert_close(state["alpha"], expected)
        assert state["updates"] == 1 and state["cost_count"] == 0
