"""Preference maths (docs/methods.md §10): chunked log-probs, parent sums, DPO/IPO/cDPO/TIS-DPO/PrefKD losses, weights.

Every reference here is written from the SPEC's formulas with plain torch (log_softmax + gather + autograd)
or by hand in float64, and compared on values and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefkd.align.parent_tokens import parent_index_map, response_parents
from prefkd.losses.logps import (
    parent_mask,
    parent_sums,
    sequence_kl,
    sequence_logps,
    token_kl,
    token_logps,
    token_logps_and_kl,
    tokens_from_parents,
    weighted_sums,
)
from prefkd.losses.preference import (
    dpo_loss,
    dpo_margin,
    ipo_loss,
    kd_tisdpo_loss,
    kd_tisdpo_margin,
    preference_metrics,
    tisdpo_loss,
    tisdpo_margin,
)
from prefkd.models.tiny import build_tiny
from prefkd.weights.transforms import parent_weights, transform_weights
from tests.helpers.memory import LargeTensorTracker
from tests.helpers.shared import REAL_PAIRS

F64 = torch.float64


def make(B=3, T=6, V=11, seed=0, dtype=torch.float32, pad_rows=True):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[0, :2] = -100  # a prompt
    if pad_rows:
        labels[-1] = -100  # a row with no label at all
    return logits, labels


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def plain_token_logps(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The naive B×T×V computation: log_softmax in fp32 (fp64 kept), gather, zero where labels = −100."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    lp = torch.log_softmax(x.to(dtype), -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return lp * labels.ne(-100)


def plain_kl(x: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_v p_θ (log p_θ − log p_ref) per position, zero where labels = −100."""
    log_p = torch.log_softmax(x.to(torch.promote_types(x.dtype, torch.float32)), -1)
    log_q = torch.log_softmax(ref.to(log_p.dtype), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * labels.ne(-100)


# --------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 3, 10_000])
@pytest.mark.parametrize("weighted", [False, True])
def test_sequence_logps_value_and_gradient(dtype, chunk_size, weighted):
    logits, labels = make(dtype=dtype, seed=chunk_size)
    weights = torch.rand(labels.shape, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32)) \
        if weighted else None
    coef = torch.tensor([0.7, -1.3, 2.0])  # a different incoming gradient per sequence

    x_ref = leaf(logits)
    tok = plain_token_logps(x_ref, labels)
    ref = (tok * (weights if weighted else 1)).sum(-1)
    (ref * coef.to(ref.dtype)).sum().backward()

    x = leaf(logits)
    out = sequence_logps(x, labels, weights, chunk_size=chunk_size)
    (out * coef.to(out.dtype)).sum().backward()

    assert out.shape == (3,) and out.dtype == torch.promote_types(dtype, torch.float32)
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert out[-1] == 0 and (x.grad[labels.eq(-100)] == 0).all()


def test_gradient_is_weight_times_onehot_minus_softmax():
    logits, labels = make(B=2, T=4, V=5, seed=4, dtype=torch.float64, pad_rows=False)
    w = torch.rand(2, 4, dtype=F64)
    x = leaf(logits)
    sequence_logps(x, labels, w, chunk_size=2).sum().backward()
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), 5).to(F64)
    expected = (w * labels.ne(-100))[..., None] * (onehot - logits.softmax(-1))
    torch.testing.assert_close(x.grad, expected)


def test_token_logps_no_grad_equals_plain_and_zero_at_ignored():
    logits, labels = make(seed=5)
    with torch.no_grad():
        out = token_logps(logits, labels, chunk_size=4)
    assert out.grad_fn is None and out.shape == labels.shape
    torch.testing.assert_close(out, plain_token_logps(logits, labels))
    assert (out[labels.eq(-100)] == 0).all()
    # logits that need no gradient: the no-grad path too, even with grad enabled
    assert token_logps(logits, labels).grad_fn is None


def test_token_logps_differentiable_per_token():
    logits, labels = make(seed=6)
    g = torch.randn(labels.shape)
    x_ref, x = leaf(logits), leaf(logits)
    (plain_token_logps(x_ref, labels) * g).sum().backward()
    (token_logps(x, labels, chunk_size=2) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_weights_and_padding_garbage_never_enter():
    logits, labels = make(seed=7)
    w = torch.rand(labels.shape, requires_grad=True)
    w_garbage = w.detach().clone()
    w_garbage[labels.eq(-100)] = float("nan")
    x = leaf(logits)
    out = sequence_logps(x, labels, w_garbage)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out, sequence_logps(logits, labels, w.detach()))
    x2 = leaf(logits)
    sequence_logps(x2, labels, w).sum().backward()
    assert w.grad is None  # weights are read detached


def test_gradient_reaches_a_non_leaf_logits():
    logits, labels = make(seed=8)
    head = torch.randn(11, 11, dtype=torch.float32, requires_grad=True)
    head_ref = leaf(head)
    sequence_logps(logits @ head, labels, chunk_size=3).sum().backward()
    plain_token_logps(logits @ head_ref, labels).sum().backward()
    torch.testing.assert_close(head.grad, head_ref.grad)


def test_backward_runs_once():
    logits, labels = make(seed=9)
    out = sequence_logps(leaf(logits), labels).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.backward()


@pytest.mark.parametrize("which", ["logps", "logps_and_kl"])
def test_only_one_logits_sized_tensor_alive(which):
    logits, labels = make(B=4, T=32, V=50, seed=10, pad_rows=False)
    ref_logits = torch.randn(4, 32, 50)
    x = leaf(logits)
    with LargeTensorTracker(x.numel() // 4) as tracker:
        if which == "logps":
            loss = sequence_logps(x, labels, chunk_size=4).sum()
        else:
            pol, ref, kl = token_logps_and_kl(x, ref_logits, labels, chunk_size=4)
            loss = (pol - ref).sum() + 0.5 * kl.sum()
        (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
    assert tracker.peak <= 1, f"{tracker.peak} logits-sized tensors alive at once: {tracker.allocated}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_token_kl_and_fused_pass_match_plain(dtype):
    logits, labels = make(seed=11, dtype=dtype)
    ref_logits = (2 * torch.randn(logits.shape)).to(dtype)
    g1, g2, w = torch.randn(labels.shape), torch.randn(labels.shape), torch.rand(labels.shape)

    x_ref = leaf(logits)
    plain_lp, plain_ref, kl = (plain_token_logps(x_ref, labels), plain_token_logps(ref_logits, labels),
                               plain_kl(x_ref, ref_logits, labels))
    ((plain_lp * g1).sum() + (kl * g2).sum()).backward()

    x = leaf(logits)
    lp, ref_lp, kl_ours = token_logps_and_kl(x, ref_logits, labels, chunk_size=3)
    ((lp * g1).sum() + (kl_ours * g2).sum()).backward()
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(lp, plain_lp.detach())
    torch.testing.assert_close(ref_lp, plain_ref)
    assert ref_lp.grad_fn is None
    torch.testing.assert_close(kl_ours, kl.detach(), **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)

    # token_kl alone and its weighted sequence sum
    x2, x3 = leaf(logits), leaf(logits)
    (token_kl(x2, ref_logits, labels, chunk_size=2) * g2).sum().backward()
    (plain_kl(x3, ref_logits, labels) * g2).sum().backward()
    torch.testing.assert_close(x2.grad, x3.grad, **tol)
    seq = sequence_kl(logits, ref_logits, labels, w)
    torch.testing.assert_close(seq, (plain_kl(logits, ref_logits, labels) * w).sum(-1), **tol)
    assert (kl_ours.detach() >= -1e-6).all()


# ------------------------------------------------------------------------------------------------ parents
def _side_rows(text: str, tok, parents, side: str, offset: int = 3):
    """labels (1×T) with a 3-token prompt and one padding position; the parent index map (1×T)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    T = offset + len(ids) + 1
    labels = torch.full((1, T), -100, dtype=torch.long)
    labels[0, offset:offset + len(ids)] = torch.tensor(ids)
    index = parent_index_map(parents, T, side, offset=offset)[None]
    return ids, labels, index


@pytest.mark.parametrize("teacher, student", REAL_PAIRS)
def test_parent_logprob_is_the_sum_of_its_children_real_pair(teacher, student, real_tokenizer):
    s_tok, t_tok = real_tokenizer(student), real_tokenizer(teacher)
    text = " The unbelievably naïve straße costs 1234 dollars 😀, don't it?"
    parents = response_parents(text, s_tok, t_tok)
    P = len(parents)
    assert any(len(p.student) > 1 or len(p.teacher) > 1 for p in parents)  # real multi-token parents
    g = torch.Generator().manual_seed(0)
    for side, tok in (("student", s_tok), ("teacher", t_tok)):
        ids, labels, index = _side_rows(text, tok, parents, side)
        logits = torch.randn(1, labels.shape[1], len(tok), generator=g)
        x = leaf(logits)
        lp = token_logps(x, labels, chunk_size=5)
        ell = parent_sums(lp, index, P)
        assert ell.shape == (1, P)
        log_sm = torch.log_softmax(logits[0], -1)
        for p_idx, parent in enumerate(parents):
            children = getattr(parent, side)
            assert children, "every parent has children on both sides"
            expected = sum(log_sm[3 + i, ids[i]] for i in children)
            torch.testing.assert_close(ell[0, p_idx], expected)
        # the parents add up to the sequence log-prob; −100 works like −1 as "no parent"
        torch.testing.assert_close(ell.sum(), sequence_logps(logits, labels)[0])
        torch.testing.assert_close(parent_sums(lp, index.masked_fill(index < 0, -100), P), ell)
        assert parent_mask(index, P).all()
        # gradient of a weighted parent sum = the plain autograd computation
        c = torch.randn(P, generator=g)
        (ell[0] * c).sum().backward()
        x_ref = leaf(logits)
        ref = torch.stack([sum(torch.log_softmax(x_ref[0, 3 + i], -1)[ids[i]] for i in getattr(p, side))
                           for p in parents])
        (ref * c).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        # weighted parent sums through token weights: Σ_p w_p ℓ_p = sequence_logps with w_{p(t)}
        w = torch.rand(1, P, generator=g)
        torch.testing.assert_close(weighted_sums(ell.detach(), w),
                                   sequence_logps(logits, labels, tokens_from_parents(w, index)))


def test_parent_sums_by_hand_and_errors():
    values = torch.tensor([[1.0, 2.0, 4.0, float("nan"), 8.0], [16.0, 32.0, 64.0, 128.0, 256.0]],
                          requires_grad=True)
    index = torch.tensor([[-100, 0, 0, -1, 1], [2, 0, -1, 2, -1]])
    out = parent_sums(values, index, 3)
    torch.testing.assert_close(out.detach(), torch.tensor([[6.0, 8.0, 0.0], [32.0, 0.0, 144.0]]))
    out.backward(torch.tensor([[1.0, 10.0, 100.0], [1.0, 10.0, 100.0]]))
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 1, 1, 0, 10], [100.0, 1, 0, 100, 0]]))
    torch.testing.assert_close(parent_mask(index, 3), torch.tensor([[True, True, False], [True, False, True]]))
    torch.testing.assert_close(tokens_from_parents(torch.tensor([[0.5, 2.0, 3.0], [1.0, 2.0, 3.0]]), index),
                               torch.tensor([[0.0, 0.5, 0.5, 0.0, 2.0], [3.0, 1.0, 0.0, 3.0, 0.0]]))
    with pytest.raises(ValueError, match="num_parents"):
        parent_sums(values, index, 2)  # index 2 does not fit 2 parents
    with pytest.raises(ValueError, match="differ"):
        parent_sums(values, index[:, :4], 3)


# -------------------------------------------------------------------------------------------------- losses
H = [-30.0, -3.0, -0.2, 0.0, 0.7, 5.0, 60.0]


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def _policy_inputs(h_values):
    """(π_w leaf, π_l leaf, ref_w, ref_l) in float64 whose margin is exactly h."""
    g = torch.Generator().manual_seed(1)
    ref_w, ref_l = -10 * torch.rand(len(h_values), generator=g, dtype=F64), \
        -10 * torch.rand(len(h_values), generator=g, dtype=F64)
    pi_l = -10 * torch.rand(len(h_values), generator=g, dtype=F64)
    pi_w = torch.tensor(h_values, dtype=F64) + ref_w + pi_l - ref_l
    return leaf(pi_w), leaf(pi_l), ref_w, ref_l


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_and_cdpo_by_hand(beta, eps):
    pi_w, pi_l, ref_w, ref_l = _policy_inputs(H)
    h = dpo_margin(pi_w, pi_l, ref_w, ref_l)
    torch.testing.assert_close(h.detach(), torch.tensor(H, dtype=F64))
    loss = dpo_loss(h, beta, label_smoothing=eps)
    loss.sum().backward()
    for i, hv in enumerate(H):
        z = beta * hv
        value = -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
        dh = -(1 - eps) * beta * _sigmoid(-z) + eps * beta * _sigmoid(z)
        assert loss[i].item() == pytest.approx(value, rel=1e-12, abs=1e-12)
        assert pi_w.grad[i].item() == pytest.approx(dh, rel=1e-12, abs=1e-15)
        assert pi_l.grad[i].item() == pytest.approx(-dh, rel=1e-12, abs=1e-15)
    assert torch.isfinite(dpo_loss(torch.tensor([1e4, -1e4]), beta, eps)).all()


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_by_hand(beta):
    pi_w, pi_l, ref_w, ref_l = _policy_inputs(H)
    loss = ipo_loss(dpo_margin(pi_w, pi_l, ref_w, ref_l), beta)
    loss.sum().backward()
    for i, hv in enumerate(H):
        assert loss[i].item() == pytest.approx((hv - 1 / (2 * beta)) ** 2, rel=1e-12)
        assert pi_w.grad[i].item() == pytest.approx(2 * (hv - 1 / (2 * beta)), rel=1e-12)
        assert pi_l.grad[i].item() == pytest.approx(-2 * (hv - 1 / (2 * beta)), rel=1e-12)


def test_loss_argument_checks():
    with pytest.raises(ValueError):
        dpo_loss(torch.zeros(2), beta=0.0)
    with pytest.raises(ValueError):
        dpo_loss(torch.zeros(2), label_smoothing=1.5)
    with pytest.raises(ValueError):
        tisdpo_loss(*[torch.zeros(1, 2)] * 2, None, *[torch.zeros(1, 2)] * 2, None, kl_chosen=torch.zeros(1, 2))


def _token_pair(seed=2, B=3, T=5):
    g = torch.Generator().manual_seed(seed)
    pol_w, pol_l = -3 * torch.rand(B, T, generator=g, dtype=F64), -3 * torch.rand(B, T, generator=g, dtype=F64)
    ref_w, ref_l = -3 * torch.rand(B, T, generator=g, dtype=F64), -3 * torch.rand(B, T, generator=g, dtype=F64)
    mask_w, mask_l = torch.rand(B, T, generator=g) > 0.25, torch.rand(B, T, generator=g) > 0.25
    return leaf(pol_w), ref_w, mask_w, leaf(pol_l), ref_l, mask_l


def test_tisdpo_with_unit_weights_and_no_kl_equals_dpo():
    pol_w, ref_w, mask_w, pol_l, ref_l, mask_l = _token_pair()
    ones_w, ones_l = torch.ones_like(ref_w), torch.ones_like(ref_l)
    kl_w, kl_l = torch.rand_like(ref_w), torch.rand_like(ref_l)
    for kw in ({}, dict(kl_chosen=kl_w, kl_rejected=kl_l, alpha=0.0)):
        t = tisdpo_loss(pol_w, ref_w, ones_w, pol_l, ref_l, ones_l, mask_chosen=mask_w, mask_rejected=mask_l,
                        beta=0.1, **kw)
        (g_t,) = torch.autograd.grad(t.sum(), pol_w)
        seq = [(x * m).sum(-1) for x, m in ((pol_w, mask_w), (pol_l, mask_l), (ref_w, mask_w), (ref_l, mask_l))]
        d = dpo_loss(dpo_margin(*seq), beta=0.1)
        (g_d,) = torch.autograd.grad(d.sum(), pol_w)
        torch.testing.assert_close(t, d)
        torch.testing.assert_close(g_t, g_d)
    # weights None means all 1
    torch.testing.assert_close(
        tisdpo_margin(pol_w, ref_w, None, pol_l, ref_l, None, mask_w, mask_l),
        tisdpo_margin(pol_w, ref_w, ones_w, pol_l, ref_l, ones_l, mask_w, mask_l))


def test_tisdpo_with_weights_and_kl_by_hand():
    pol_w, ref_w, mask_w, pol_l, ref_l, mask_l = _token_pair(seed=3)
    g = torch.Generator().manual_seed(4)
    w_w, w_l = 2 * torch.rand(ref_w.shape, generator=g, dtype=F64), 2 * torch.rand(ref_l.shape, generator=g, dtype=F64)
    kl_w, kl_l = leaf(torch.rand(ref_w.shape, generator=g, dtype=F64)), leaf(torch.rand(ref_l.shape, generator=g,
                                                                                          dtype=F64))
    beta, alpha = 0.1, 0.5
    loss = tisdpo_loss(pol_w, ref_w, w_w, pol_l, ref_l, w_l, mask_chosen=mask_w, mask_rejected=mask_l,
                       kl_chosen=kl_w, kl_rejected=kl_l, beta=beta, alpha=alpha)
    loss.sum().backward()
    for b in range(ref_w.shape[0]):
        def wsum(x, w, m):
            return sum(w[b, t].item() * x[b, t].item() for t in range(x.shape[1]) if m[b, t])
        h = wsum(pol_w - ref_w, w_w, mask_w) - wsum(pol_l - ref_l, w_l, mask_l)
        z = h - alpha * (wsum(kl_w, w_w, mask_w) - wsum(kl_l, w_l, mask_l))
        assert loss[b].item() == pytest.approx(-_log_sigmoid(beta * z), rel=1e-12)
        dz = -beta * _sigmoid(-beta * z)
        for t in range(ref_w.shape[1]):
            m_w, m_l = float(mask_w[b, t]), float(mask_l[b, t])
            assert pol_w.grad[b, t].item() == pytest.approx(dz * w_w[b, t].item() * m_w, abs=1e-14)
            assert pol_l.grad[b, t].item() == pytest.approx(-dz * w_l[b, t].item() * m_l, abs=1e-14)
            assert kl_w.grad[b, t].item() == pytest.approx(-alpha * dz * w_w[b, t].item() * m_w, abs=1e-14)
            assert kl_l.grad[b, t].item() == pytest.approx(alpha * dz * w_l[b, t].item() * m_l, abs=1e-14)


def test_kd_tisdpo_by_hand_with_masks():
    s_w = leaf(torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, float("nan")]], dtype=F64))
    t_w = torch.tensor([[-1.5, -1.0, -0.25], [-2.0, -2.0, 0.0]], dtype=F64)
    w_w = torch.tensor([[1.0, 2.0, 0.5], [1.5, 1.0, 9.0]], dtype=F64)
    m_w = torch.tensor([[True, True, True], [True, True, False]])
    s_l = leaf(torch.tensor([[-2.0, -4.0, 0.0], [-1.0, 0.0, 0.0]], dtype=F64))
    t_l = torch.tensor([[-1.0, -1.0, 0.0], [-0.5, 0.0, 0.0]], dtype=F64)
    w_l = torch.tensor([[0.5, 1.0, 7.0], [2.0, 3.0, 3.0]], dtype=F64)
    m_l = torch.tensor([[True, True, False], [True, False, False]])
    M_w = [1.0 * 0.5 + 2.0 * -1.0 + 0.5 * -0.25, 1.5 * -1.0 + 1.0 * 1.0]
    M_l = [0.5 * -1.0 + 1.0 * -3.0, 2.0 * -0.5]
    torch.testing.assert_close(kd_tisdpo_margin(s_w.detach(), t_w, w_w, m_w), torch.tensor(M_w, dtype=F64))
    loss = kd_tisdpo_loss(s_w, t_w, w_w, s_l, t_l, w_l, beta=0.5, mask_chosen=m_w, mask_rejected=m_l)
    loss.sum().backward()
    for b in range(2):
        z = 0.5 * (M_w[b] - M_l[b])
        assert loss[b].item() == pytest.approx(-_log_sigmoid(z), rel=1e-12)
        dM = -0.5 * _sigmoid(-z)
        torch.testing.assert_close(s_w.grad[b], dM * w_w[b] * m_w[b])
        torch.testing.assert_close(s_l.grad[b], -dM * w_l[b] * m_l[b])


def _pair_batch(model, tok, prompts, responses):
    """Right-padded (input_ids, attention_mask, labels, index, P): prompt + response tokenised separately,
    labels already shifted; the parent index map of identical tokenizers, parents of each response."""
    rows, maps, n_parents = [], [], []
    for prompt, response in zip(prompts, responses):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        parents = response_parents(response, tok, tok)
        assert [pa.student for pa in parents] == [(i,) for i in range(len(r))]  # one parent per token
        full = p + r
        rows.append((full, [-100] * (len(p) - 1) + r))
        maps.append(parent_index_map(parents, len(full) - 1, "student", offset=len(p) - 1))
        n_parents.append(len(parents))
    T = max(len(f) for f, _ in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T - 1), -100)
    index = torch.full((len(rows), T - 1), -1)
    for i, ((full, lab), m) in enumerate(zip(rows, maps)):
        ids[i, :len(full)], att[i, :len(full)] = torch.tensor(full), 1
        labels[i, :len(lab)], index[i, :len(m)] = torch.tensor(lab), m
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    return logits, labels, index, max(n_parents)


def test_kd_tisdpo_identical_tokenizers_unit_weights_equals_dpo_with_teacher_reference():
    student = build_tiny("a", "gpt2", 32, num_layers=1, seed=2)
    teacher = build_tiny("a", "llama", 32, num_layers=1, seed=1)
    tok = student.tokenizer
    prompts = ["Add 2 and 3.\nAnswer: ", "Sort the words: pear apple fig\nAnswer: "]
    chosen = ["The sum is 5.", "apple fig pear"]
    rejected = ["It is 7, I think.", "pear fig"]
    beta = 0.5
    sides = {}
    for name, responses in (("w", chosen), ("l", rejected)):
        s_logits, labels, index, P = _pair_batch(student.model, tok, prompts, responses)
        t_logits, _, _, _ = _pair_batch(teacher.model, tok, prompts, responses)
        sides[name] = (leaf(s_logits), t_logits, labels, index, P)

    # PrefKD path: student token log-probs (differentiable) -> parent sums; teacher parent sums
    ell = {}
    for name, (x, t_logits, labels, index, P) in sides.items():
        s_par = parent_sums(token_logps(x, labels, chunk_size=3), index, P)
        with torch.no_grad():
            t_par = parent_sums(token_logps(t_logits, labels), index, P)
        ell[name] = (s_par, t_par, parent_mask(index, P))
    kd = kd_tisdpo_loss(ell["w"][0], ell["w"][1], None, ell["l"][0], ell["l"][1], None, beta=beta,
                        mask_chosen=ell["w"][2], mask_rejected=ell["l"][2])
    kd_grads = torch.autograd.grad(kd.sum(), [sides["w"][0], sides["l"][0]])

    # DPO with the teacher as the reference, from plain autograd log-probs
    xs = {name: leaf(sides[name][0]) for name in sides}
    seq = {name: plain_token_logps(xs[name], sides[name][2]).sum(-1) for name in sides}
    ref = {name: plain_token_logps(sides[name][1], sides[name][2]).sum(-1) for name in sides}
    dpo = dpo_loss(dpo_margin(seq["w"], seq["l"], ref["w"], ref["l"]), beta)
    dpo_grads = torch.autograd.grad(dpo.sum(), [xs["w"], xs["l"]])

    torch.testing.assert_close(kd, dpo)
    for a, b in zip(kd_grads, dpo_grads):
        torch.testing.assert_close(a, b)
    assert kd_grads[0].abs().sum() > 0


def test_preference_metrics_are_sums_by_hand():
    pw, pl = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -1.0, -3.0])
    rw, rl = torch.tensor([-1.5, -1.0, -2.0]), torch.tensor([-1.0, -1.0, -2.0])
    m = preference_metrics(pw.requires_grad_(), pl, rw, rl, beta=0.1)
    r_w, r_l = [0.05, -0.1, -0.1], [-0.1, 0.0, -0.1]
    expected = {"rewards/chosen": sum(r_w), "rewards/rejected": sum(r_l), "rewards/accuracies": 1.0,
                "rewards/margins": sum(a - b for a, b in zip(r_w, r_l)), "logps/chosen": -6.0, "logps/rejected": -6.0}
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k].dim() == 0 and not m[k].requires_grad
        assert m[k].item() == pytest.approx(v, abs=1e-6), k


# -------------------------------------------------------------------------------------------------- weights
def test_parent_weights_by_hand():
    lp_pos = torch.tensor([0.0, 1.0, -2.0, 3.0, 0.3], dtype=F64)
    lp_neg = torch.tensor([0.2, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    clamped = [-0.2, 1.0, -0.5, 1.5, 0.3]  # d = ℓ⁺ − ℓ⁻ clamped to [−0.5, 1.5]
    torch.testing.assert_close(parent_weights(lp_pos, lp_neg, chosen=True),
                               torch.tensor([math.exp(c) for c in clamped], dtype=F64))
    torch.testing.assert_close(parent_weights(lp_pos, lp_neg, chosen=False),
                               torch.tensor([math.exp(-c) for c in clamped], dtype=F64))
    torch.testing.assert_close(parent_weights(lp_pos, lp_neg, chosen=False, k=2.0, lower=-1.0, upper=0.5),
                               torch.tensor([2 * math.exp(-c) for c in [-0.2, 0.5, -1.0, 0.5, 0.3]], dtype=F64))
    with pytest.raises(ValueError):
        parent_weights(lp_pos, lp_neg, True, lower=1.0, upper=0.0)


def T_(*values):
    return torch.tensor(values, dtype=F64)


def test_transform_origin_and_threshold():
    w = T_(-1.0, 0.5, 3.0)
    out = transform_weights(w, "origin")
    torch.testing.assert_close(out, w)
    out[0] = 7.0
    assert w[0] == -1.0  # a copy
    torch.testing.assert_close(transform_weights(w, "threshold", lo=0.0, hi=2.0), T_(0.0, 0.5, 2.0))


@pytest.mark.parametrize("w, q, expected", [
    ([0.1, 0.9, 0.5, 0.7, 0.3], 40, [0, 1, 0, 1, 0]),   # k = 2
    ([0.1, 0.9, 0.5, 0.7, 0.3], 20, [0, 1, 0, 0, 0]),   # k = 1 exactly (no float round-down)
    ([0.1, 0.9, 0.5, 0.7, 0.3], 10, [0, 0, 0, 0, 0]),   # 0.5 element: rounded down to none
    ([0.1, 0.9, 0.5, 0.7, 0.3], 0, [0, 0, 0, 0, 0]),
    ([0.1, 0.9, 0.5, 0.7, 0.3], 100, [1, 1, 1, 1, 1]),
    ([1.0, 2.0, 2.0, 0.0], 25, [0, 1, 1, 0]),            # k = 1, but the tie at the cut is kept whole
    ([1.0, 2.0, 2.0, 0.0], 75, [1, 1, 1, 0]),
    ([3.0, 3.0, 3.0], 34, [1, 1, 1]),                    # k = 1, all tied
    ([5.0], 100, [1]),
    ([5.0], 50, [0]),
])
def test_transform_binary(w, q, expected):
    torch.testing.assert_close(transform_weights(T_(*w), "binary", q=q), T_(*expected))


def test_transform_threshold_and_scale():
    out = transform_weights(T_(-1.0, 0.5, 3.0, 1.0), "threshold_and_scale", lo=0.0, hi=2.0, s_min=0.5, s_max=1.5)
    torch.testing.assert_close(out, T_(0.5, 0.75, 1.5, 1.0))
    torch.testing.assert_close(transform_weights(T_(0.7), "threshold_and_scale", lo=0.0, hi=1.0, s_min=2.0,
                                                 s_max=0.0), T_(0.6))  # a decreasing map is allowed
    with pytest.raises(ValueError):
        transform_weights(T_(1.0), "threshold_and_scale", lo=1.0, hi=1.0, s_min=0.0, s_max=1.0)


def test_transform_random():
    w = T_(5.0, -1.0, 2.0, 0.0)
    out = transform_weights(w, "random", a=0.2, b=0.8, generator=torch.Generator().manual_seed(3))
    expected = 0.2 + 0.6 * torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(out, expected)
    assert ((out >= 0.2) & (out <= 0.8)).all()
    again = transform_weights(w, "random", a=0.2, b=0.8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, again)
    torch.testing.assert_close(transform_weights(T_(1.0), "random", a=1.5, b=1.5), T_(1.5))


@pytest.mark.parametrize("w, expected", [
    ([3.0, 1.0, 2.0], [1.5, 0.5, 1.0]),                     # ranks 2, 0, 1
    ([1.0, 3.0, 3.0, 2.0], [0.5, 0.5 + 2.5 / 3, 0.5 + 2.5 / 3, 0.5 + 1 / 3]),   # ties share rank 2.5
    ([2.0, 2.0], [1.0, 1.0]),                               # all tied: the midpoint
    ([4.0], [1.0]),                                         # a single element -> 1
])
def test_transform_rank_based(w, expected):
    torch.testing.assert_close(transform_weights(T_(*w), "rank_based", s_min=0.5, s_max=1.5), T_(*expected))


def test_transform_errors_and_empty():
    with pytest.raises(ValueError, match="unknown weight transform"):
        transform_weights(T_(1.0), "softmax")
    with pytest.raises(ValueError, match="1-D"):
        transform_weights(torch.ones(2, 2), "origin")
    with pytest.raises(TypeError):
        transform_weights(T_(1.0), "binary")  # q missing
    with pytest.raises(ValueError):
        transform_weights(T_(1.0), "binary", q=150)
    with pytest.raises(ValueError):
        transform_weights(T_(1.0), "threshold", lo=2.0, hi=1.0)
    for kind, params in [("origin", {}), ("binary", dict(q=50)), ("rank_based", dict(s_min=0, s_max=1))]:
        assert transform_weights(torch.zeros(0), kind, **params).shape == (0,)
