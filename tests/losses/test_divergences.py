"""docs/methods.md §3 divergences against naive per-token references written here from the formulas.

The references loop over tokens in Python, work in float64 and write every sum over the vocabulary
explicitly; gradients come from autograd through them.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefkd.losses.divergences import (
    DIVERGENCES,
    LOGP_FLOOR,
    adaptive_kl_gaps,
    cross_entropy_sum,
    divergence_fn,
    kd_divergence_sum,
    log_probs,
)

NAMES = ["forward_kl", "reverse_kl", "skewed_forward_kl", "skewed_reverse_kl", "js", "gjsd", "tvd", "adaptive_kl"]
LAM, ALPHA, BETA = 0.1, 0.5, 0.5


# --------------------------------------------------------------------------- naive references (float64)


def _softmax(z: torch.Tensor, tau: float, floor: float | None = None):
    """Explicit softmax of one row: lists (p_v, log p_v), v = 0..V-1."""
    zs = [z[v] / tau for v in range(z.shape[0])]
    top = max(x.item() for x in zs)
    exps = [torch.exp(x - top) for x in zs]
    total = sum(exps)
    logp = [x - top - torch.log(total) for x in zs]
    if floor is not None:
        logp = [torch.clamp(lp, min=floor) for lp in logp]
    return [torch.exp(lp) for lp in logp], logp


def _kl(p, logp, logq):
    """Σ_v p_v (log p_v − log q_v), 0·log 0 = 0."""
    return sum(p[v] * (logp[v] - logq[v]) for v in range(len(p)) if p[v].item() > 0)


def ref_token(name, zs, zt, tau=1.0, tau_t=1.0, lam=LAM, alpha=ALPHA, floor=None, beta=BETA):
    """One token's divergence from docs/methods.md §3, zs/zt 1-D float64 rows of the shared vocabulary."""
    v_n = min(zs.shape[0], zt.shape[0])
    zs, zt = zs[:v_n], zt[:v_n]
    ps, ls = _softmax(zs, tau)
    pt, lt = _softmax(zt.detach(), tau * tau_t, floor)
    V = range(v_n)
    if name == "forward_kl":
        return _kl(pt, lt, ls)
    if name == "reverse_kl":
        return _kl(ps, ls, lt)
    if name == "skewed_forward_kl":
        mix = [torch.log(lam * pt[v] + (1 - lam) * ps[v]) for v in V]
        return _kl(pt, lt, mix)
    if name == "skewed_reverse_kl":
        mix = [torch.log((1 - lam) * pt[v] + lam * ps[v]) for v in V]
        return _kl(ps, ls, mix)
    if name == "js":
        m = [torch.log((pt[v] + ps[v]) / 2) for v in V]
        return 0.5 * _kl(pt, lt, m) + 0.5 * _kl(ps, ls, m)
    if name == "gjsd":  # GKD: β·KL(p_T‖m) + (1−β)·KL(p_S‖m), m = β p_T + (1−β) p_S; β = 0 / 1: forward / reverse KL
        if beta == 0:
            return _kl(pt, lt, ls)
        if beta == 1:
            return _kl(ps, ls, lt)
        m = [torch.log(beta * pt[v] + (1 - beta) * ps[v]) for v in V]
        return beta * _kl(pt, lt, m) + (1 - beta) * _kl(ps, ls, m)
    if name == "tvd":
        return 0.5 * sum(torch.abs(pt[v] - ps[v]) for v in V)
    if name == "adaptive_kl":
        order = sorted(V, key=lambda v: pt[v].item())
        cum, g_head, g_tail = 0.0, 0.0, 0.0
        for v in order:
            cum += pt[v].item()
            gap = abs(pt[v].item() - ps[v].item())
            if cum <= alpha:
                g_tail += gap
            else:
                g_head += gap
        return (g_head * _kl(pt, lt, ls) + g_tail * _kl(ps, ls, lt)) / (g_head + g_tail)
    raise KeyError(name)


def ref_sum(name, s, t, mask, weights=None, **kw):
    """(Σ_masked w·D, d/ds) with a Python loop over tokens, float64."""
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask[b, i]:
                w = 1.0 if weights is None else float(weights[b, i])
                total = total + w * ref_token(name, s64[b, i], t64[b, i], **kw)
    (grad,) = torch.autograd.grad(total, s64, allow_unused=True)
    return total.detach(), (torch.zeros_like(s64) if grad is None else grad)


def run_op(name, s, t, mask, chunk_size=1024, weights=None, **kw):
    """(value, grad) of the module's chunked op."""
    s = s.detach().clone().requires_grad_(True)
    loss = kd_divergence_sum(s, t, mask, name, chunk_size=chunk_size, weights=weights, **kw)
    loss.backward()
    return loss.detach(), s.grad


def make(B=2, T=4, Vs=9, Vt=None, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, Vs, generator=g) * scale
    t = torch.randn(B, T, Vt or Vs, generator=g) * scale
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    return s, t, mask


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- value and gradient vs SPEC


def test_registry_has_every_spec_divergence():
    assert sorted(DIVERGENCES) == sorted(NAMES)


@pytest.mark.parametrize("tau,tau_t", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.5)])
@pytest.mark.parametrize("name", NAMES)
def test_matches_naive_reference(name, tau, tau_t):
    s, t, mask = make(seed=10 * NAMES.index(name) + int(4 * tau))
    ref_v, ref_g = ref_sum(name, s, t, mask, tau=tau, tau_t=tau_t)
    val, grad = run_op(name, s, t, mask, chunk_size=3, temperature=tau, teacher_temperature=tau_t)
    assert val.dtype == torch.float32
    close(val, ref_v)
    close(grad, ref_g)


@pytest.mark.parametrize("name", ["skewed_forward_kl", "skewed_reverse_kl"])
def test_skew_lambda_is_used(name):
    s, t, mask = make(seed=3)
    ref_v, ref_g = ref_sum(name, s, t, mask, lam=0.3)
    val, grad = run_op(name, s, t, mask, skew_lambda=0.3)
    close(val, ref_v)
    close(grad, ref_g)


def test_true_kl_keeps_teacher_entropy():
    """FKL(p‖p) = 0, not −H(p) (DistiLLM's variant drops the entropy term)."""
    s, _, mask = make(seed=4)
    assert kd_divergence_sum(s, s, mask, "forward_kl").abs() < 1e-5


# --------------------------------------------------------------------------- adaptive KL split


def test_adaptive_kl_hand_checked_split():
    p_t = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    p_s = torch.tensor([0.1, 0.1, 0.1, 0.7], dtype=torch.float64)
    # ascending p_T: cumulative 0.1, 0.3, 0.6, 1.0 -> tail {0, 1}, head {2, 3}
    # g_tail = |0.1-0.1| + |0.2-0.1| = 0.1 ; g_head = |0.3-0.1| + |0.4-0.7| = 0.5
    g_head, g_tail = adaptive_kl_gaps(p_s.log()[None], p_t.log()[None], 0.5)
    assert g_head.item() == pytest.approx(0.5)
    assert g_tail.item() == pytest.approx(0.1)
    fkl = sum(a * math.log(a / b) for a, b in zip(p_t.tolist(), p_s.tolist()))
    rkl = sum(b * math.log(b / a) for a, b in zip(p_t.tolist(), p_s.tolist()))
    expected = (0.5 * fkl + 0.1 * rkl) / 0.6
    got = divergence_fn("adaptive_kl")(p_s.log()[None], p_t.log()[None])
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # α = 0.05: nothing in the tail -> pure forward KL; α = 1: everything -> pure reverse KL
    assert divergence_fn("adaptive_kl", adaptive_alpha=0.05)(p_s.log()[None], p_t.log()[None]).item() == (
        pytest.approx(fkl, rel=1e-9)
    )
    assert divergence_fn("adaptive_kl", adaptive_alpha=1.0)(p_s.log()[None], p_t.log()[None]).item() == (
        pytest.approx(rkl, rel=1e-9)
    )


def test_adaptive_kl_equal_distributions_is_zero_not_nan():
    z = torch.randn(3, 6, requires_grad=True)
    out = divergence_fn("adaptive_kl")(z, z.detach())
    out.sum().backward()
    assert torch.isfinite(out).all() and out.abs().max() < 1e-6
    assert torch.isfinite(z.grad).all()


# --------------------------------------------------------------------------- chunking, masking, weights


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked(name):
    s, t, mask = make(B=3, T=5, seed=5)
    v_full, g_full = run_op(name, s, t, mask, chunk_size=10_000)
    for cs in (1, 3):
        v, g = run_op(name, s, t, mask, chunk_size=cs)
        close(v, v_full)
        close(g, g_full)


def test_masked_positions_get_zero_gradient_and_do_not_count():
    s, t, mask = make(B=2, T=6, seed=6)
    val, grad = run_op("forward_kl", s, t, mask, chunk_size=2)
    assert (grad[~mask] == 0).all()
    assert (grad[mask].abs().sum(-1) > 0).all()
    ref_v, _ = ref_sum("forward_kl", s, t, mask)
    close(val, ref_v)
    # changing logits at masked positions changes nothing
    s2 = s.clone()
    s2[~mask] = 100.0 * torch.randn_like(s2[~mask])
    close(run_op("forward_kl", s2, t, mask)[0], val)


@pytest.mark.parametrize("name", ["forward_kl", "adaptive_kl"])
def test_weights(name):
    s, t, mask = make(seed=7)
    w = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) * 2
    ref_v, ref_g = ref_sum(name, s, t, mask, weights=w)
    val, grad = run_op(name, s, t, mask, chunk_size=3, weights=w)
    close(val, ref_v)
    close(grad, ref_g)


# --------------------------------------------------------------------------- vocab prefix, -inf, dtypes


@pytest.mark.parametrize("vs,vt", [(9, 12), (12, 9)])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "js"])
def test_vocab_prefix_when_sizes_differ(name, vs, vt):
    s, t, mask = make(Vs=vs, Vt=vt, seed=8)
    ref_v, ref_g = ref_sum(name, s, t, mask)  # the reference cuts both rows to min(V_s, V_t)
    val, grad = run_op(name, s, t, mask, chunk_size=2)
    close(val, ref_v)
    close(grad, ref_g)
    assert (grad[..., min(vs, vt) :] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_no_nan_with_minus_inf_teacher_logits(name):
    s, t, mask = make(seed=9)
    t[..., :3] = float("-inf")  # ids the teacher rules out
    val, grad = run_op(name, s, t, mask, chunk_size=3)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    # the teacher's log-probabilities are floored at LOGP_FLOOR (the documented convention)
    ref_v, ref_g = ref_sum(name, s, t, mask, floor=LOGP_FLOOR)
    close(val, ref_v, rtol=1e-5, atol=1e-3 if name in ("reverse_kl", "adaptive_kl") else 1e-6)
    close(grad, ref_g, rtol=1e-5, atol=1e-3 if name in ("reverse_kl", "adaptive_kl") else 1e-6)


def test_minus_inf_teacher_forward_kl_is_exact():
    """Forward direction: ruled-out ids simply contribute 0·log 0 = 0."""
    s, t, mask = make(seed=10)
    t[..., -2:] = float("-inf")
    ref_v, _ = ref_sum("forward_kl", s, t, mask)
    close(run_op("forward_kl", s, t, mask)[0], ref_v)


def test_underflowing_student_probabilities_are_safe():
    s, t, mask = make(seed=11)
    s[..., 0] = -300.0  # p_S underflows to exactly 0 in fp32
    for name in NAMES:
        val, grad = run_op(name, s, t, mask)
        assert torch.isfinite(val) and torch.isfinite(grad).all(), name


@pytest.mark.parametrize("name", NAMES)
def test_bf16_student_gives_fp32_close_to_fp32(name):
    s, t, mask = make(seed=12)
    s_bf = s.bfloat16().requires_grad_(True)
    loss = kd_divergence_sum(s_bf, t.bfloat16(), mask, name, chunk_size=2)
    loss.backward()
    assert loss.dtype == torch.float32 and s_bf.grad.dtype == torch.bfloat16
    val, grad = run_op(name, s, t, mask)
    close(loss, val, rtol=3e-2, atol=3e-2)
    close(s_bf.grad, grad, rtol=5e-2, atol=2e-2)


def test_gradient_flows_only_to_student():
    s, t, mask = make(seed=13)
    s.requires_grad_(True)
    t.requires_grad_(True)
    w = torch.rand(mask.shape, requires_grad=True)
    for name in NAMES:
        kd_divergence_sum(s, t, mask, name, weights=w).backward()
        assert t.grad is None and w.grad is None
        assert s.grad is not None
        s.grad = None


def test_student_without_grad_gives_a_plain_value():
    s, t, mask = make(seed=14)
    val = kd_divergence_sum(s, t, mask, "js", chunk_size=2)
    assert val.grad_fn is None
    close(val, ref_sum("js", s, t, mask)[0])


# --------------------------------------------------------------------------- API details


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="forward_kl.*adaptive_kl"):
        divergence_fn("kl_forward")


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        divergence_fn("skewed_forward_kl", skew_lambda=0.0)
    with pytest.raises(ValueError):
        divergence_fn("forward_kl", temperature=0.0)


def test_teacher_temperature_divides_teacher_by_product():
    s, t, _ = make(seed=15)
    ls, lt = log_probs(s[0], t[0], temperature=2.0, teacher_temperature=1.5)
    close(ls, torch.log_softmax(s[0] / 2.0, -1))
    close(lt, torch.log_softmax(t[0] / 3.0, -1))


def test_cross_entropy_sum_against_reference():
    s, _, _ = make(B=2, T=5, Vs=7, seed=16)
    labels = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = -100
    labels[1, 4] = -100
    s64 = s.double().requires_grad_(True)
    ref = torch.zeros((), dtype=torch.float64)
    for b in range(2):
        for i in range(5):
            y = int(labels[b, i])
            if y != -100:
                row = s64[b, i]
                ref = ref - (row[y] - torch.log(sum(torch.exp(row[v]) for v in range(7))))
    ref.backward()
    x = s.clone().requires_grad_(True)
    val = cross_entropy_sum(x, labels, chunk_size=3)
    val.backward()
    close(val, ref)
    close(x.grad, s64.grad)
    assert (x.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.9, 1.0])
def test_gjsd_matches_its_formula_for_every_beta(beta):
    """GKD's generalised JSD, value and gradient, against the naive sum (β = 0 and 1 are GKD's exact KLs)."""
    s, t, mask = make(seed=int(100 * beta) + 7)
    ref_v, ref_g = ref_sum("gjsd", s, t, mask, tau=2.0, beta=beta)
    val, grad = run_op("gjsd", s, t, mask, chunk_size=3, temperature=2.0, beta=beta)
    close(val, ref_v)
    close(grad, ref_g)


def test_gjsd_at_beta_0_and_1_is_exactly_the_forward_and_reverse_kl():
    s, t, _ = make(seed=3)
    rows_s, rows_t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    for beta, name in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        assert torch.equal(divergence_fn("gjsd", beta=beta)(rows_s, rows_t), divergence_fn(name)(rows_s, rows_t))
    mid = divergence_fn("gjsd", beta=0.5)(rows_s, rows_t)
    torch.testing.assert_close(mid, divergence_fn("js")(rows_s, rows_t))  # β = ½ is the JS divergence
    with pytest.raises(ValueError, match="beta must be in"):
        divergence_fn("gjsd", beta=1.5)
