"""prefkd.ot.costs against naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from prefkd.ot import (
    context_cosine_cost,
    context_euclidean_cost,
    context_vectors,
    euclidean_cost,
    kl_cost,
    normalized_edit_distance_matrix,
    pair_mask,
    salience_cost,
    scale_cost,
    strip_markers,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def loop_cost(x, y, fn):
    """C[b, j, i] = fn(x[b, j], y[b, i]) by explicit loops."""
    bsz, m, n = x.shape[0], x.shape[1], y.shape[1]
    out = torch.empty(bsz, m, n, dtype=torch.float64)
    for b in range(bsz):
        for j in range(m):
            for i in range(n):
                out[b, j, i] = fn(x[b, j], y[b, i])
    return out


def test_euclidean_matches_loop_and_is_safe_at_zero_distance():
    x = torch.randn(2, 5, 3, generator=gen(), dtype=torch.float64) * 10 + 100
    y = torch.randn(2, 4, 3, generator=gen(1), dtype=torch.float64) * 10 + 100
    y[0, 1] = x[0, 2]  # coincident points
    ref = loop_cost(x, y, lambda p, q: math.sqrt(sum((float(p[k]) - float(q[k])) ** 2 for k in range(3))))
    got = euclidean_cost(x, y)
    assert got.shape == (2, 5, 4)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-9)  # √(rounding) near 0: mm formula
    xf, yf = x.float().requires_grad_(True), y.float().requires_grad_(True)
    out = euclidean_cost(xf, yf)
    assert out[0, 2, 1] < 1e-2 and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-4)
    out.sum().backward()
    assert torch.isfinite(xf.grad).all() and torch.isfinite(yf.grad).all()


def test_euclidean_gradient_is_the_unit_vector():
    x = torch.tensor([[[0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)
    euclidean_cost(x, y).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[[-0.6, -0.8]]], dtype=torch.float64))


def test_kl_matches_loop_probs_and_log_probs():
    zq = torch.randn(2, 4, 6, generator=gen(2), dtype=torch.float64)
    zp = torch.randn(2, 3, 6, generator=gen(3), dtype=torch.float64)
    q, p = zq.softmax(-1), zp.softmax(-1)
    ref = loop_cost(q, p, lambda a, b: float((a * (a / b).log()).sum()))
    torch.testing.assert_close(kl_cost(q, p), ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(kl_cost(zq.log_softmax(-1), zp.log_softmax(-1), log_input=True), ref, atol=1e-12,
                               rtol=1e-10)
    assert (kl_cost(q, q).diagonal(dim1=1, dim2=2)[:, :3].abs() < 1e-12).all()


def test_kl_with_zero_probabilities_is_finite():
    q = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]], requires_grad=True)
    c = kl_cost(q, p)
    assert torch.isfinite(c).all()
    assert c[0, 0, 0].item() == pytest.approx(0.0, abs=1e-6)  # 0·log 0 = 0
    assert c[0, 1, 1].item() > 1e4  # q puts mass where p has none: large, finite
    c.sum().backward()
    assert torch.isfinite(p.grad).all()
    log_c = kl_cost(torch.log(q), torch.log(p.detach()), log_input=True)
    assert torch.isfinite(log_c).all()
    torch.testing.assert_close(log_c, c.detach())


def test_salience_matches_loop():
    s_t, s_s = torch.rand(3, 5, generator=gen(4)), torch.rand(3, 7, generator=gen(5))
    ref = loop_cost(s_t[..., None], s_s[..., None], lambda a, b: abs(float(a) - float(b)))
    torch.testing.assert_close(salience_cost(s_t, s_s).double(), ref, atol=1e-7, rtol=0)


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_strip_markers():
    assert strip_markers("Ġhello") == "hello"
    assert strip_markers("▁world") == "world"
    assert strip_markers("ĠĠ") == "" and strip_markers("▁") == ""
    assert strip_markers("a▁b") == "ab" and strip_markers("plain") == "plain"  # every occurrence
    assert strip_markers(" word", (" ",)) == "word" and strip_markers("Ġx", ("▁",)) == "Ġx"


def test_normalized_edit_distance_matrix_matches_loop():
    pytest.importorskip("rapidfuzz")
    teacher = ["Ġkitten", "▁sitting", "Ġ", "the", "▁The", "ing"]
    student = ["sitting", "Ġthe", "▁", "", "kit", "ten"]
    got = normalized_edit_distance_matrix(teacher, student)
    assert got.shape == (6, 6) and got.dtype == torch.float32
    for j, t in enumerate(teacher):
        for i, s in enumerate(student):
            a, b = strip_markers(t), strip_markers(s)
            ref = 0.0 if not a and not b else levenshtein(a, b) / max(len(a), len(b))
            assert got[j, i].item() == pytest.approx(ref, abs=1e-6), (t, s)
    assert got[3, 1] == 0 and got[2, 2] == 0 and got[2, 3] == 0 and got[0, 4] == pytest.approx(0.5)
    assert normalized_edit_distance_matrix([], ["a"]).shape == (0, 1)
    spaced = normalized_edit_distance_matrix([" the"], ["Ġthe", " the"], teacher_markers=(" ",))
    assert spaced.tolist() == [[0.0, 0.25]]  # the student side strips Ġ/▁ only


def test_context_vectors_match_loop():
    h = torch.randn(2, 9, 3, generator=gen(6))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 7:] = False  # right padding
    mask[1, :2] = False  # left padding
    mask[1, 5] = False  # a hole
    for window in (0, 1, 4, 20):
        got = context_vectors(h, mask, window)
        assert got.shape == h.shape and got.dtype == h.dtype
        for b in range(2):
            for i in range(9):
                if not mask[b, i]:
                    assert (got[b, i] == 0).all()
                    continue
                ks = [k for k in range(max(0, i - window), min(9, i + window + 1)) if mask[b, k]]
                torch.testing.assert_close(got[b, i], h[b, ks].mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(context_vectors(h, None, 0), h)


def test_context_vectors_gradient_flows():
    h = torch.randn(1, 6, 2, generator=gen(7), requires_grad=True)
    context_vectors(h, window=1).sum().backward()
    # position 0 is in the windows of 0 and 1: 1/2 + 1/3; an inner position in three windows of 3
    torch.testing.assert_close(h.grad[0, 0], torch.full((2,), 1 / 2 + 1 / 3))
    torch.testing.assert_close(h.grad[0, 2], torch.full((2,), 1.0))


def test_context_euclidean_cost_is_scaled_by_valid_max():
    c_t = torch.randn(2, 4, 3, generator=gen(8), dtype=torch.float64)
    c_s = torch.randn(2, 5, 3, generator=gen(9), dtype=torch.float64)
    mask_t = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mask_s = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    c_t[0, 3] = 1e3  # a padded point far away must not set the scale
    got = context_euclidean_cost(c_t, c_s, mask_t, mask_s)
    raw = loop_cost(c_t, c_s, lambda p, q: float((p - q).norm()))
    for b in range(2):
        valid = mask_t[b][:, None] & mask_s[b][None, :]
        torch.testing.assert_close(got[b], raw[b] / raw[b][valid].max())
        assert got[b][valid].max().item() == pytest.approx(1.0)


def test_context_cosine_cost_matches_loop():
    c_t = torch.randn(2, 4, 3, generator=gen(10), dtype=torch.float64)
    c_s = torch.randn(2, 5, 3, generator=gen(11), dtype=torch.float64)
    c_s[1, 0] = 0.0
    ref = loop_cost(c_t, c_s, lambda p, q: 1 - float(torch.nn.functional.cosine_similarity(p, q, dim=0, eps=1e-12)))
    got = context_cosine_cost(c_t, c_s)
    torch.testing.assert_close(got, ref)
    assert (got[1, :, 0] == 1).all()


def test_scale_cost():
    cost = torch.rand(2, 3, 4, generator=gen(12), dtype=torch.float64) + 0.5
    mask = pair_mask(torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
                     torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool))
    assert mask.shape == (2, 3, 4) and mask[0, 2].sum() == 0 and mask[1, :, 1:].sum() == 0
    cost[~mask] = 1e6
    for mode, stat in (("mean", torch.mean), ("max", torch.amax)):
        got = scale_cost(cost, mask, mode)
        for b in range(2):
            torch.testing.assert_close(got[b], cost[b] / stat(cost[b][mask[b]]))
    whole = scale_cost(cost, mask, "mean", per_example=False)
    torch.testing.assert_close(whole, cost / cost[mask].mean())
    assert scale_cost(cost, mask, None) is cost
    # the scale is detached: d(C / s)/dC = 1/s
    c = cost.clone().requires_grad_(True)
    scale_cost(c, mask, "mean").sum().backward()
    torch.testing.assert_close(c.grad[0], torch.full((3, 4), 1 / cost[0][mask[0]].mean().item(), dtype=torch.float64))
    # no valid entry / all zero: unchanged, no NaN
    zero = torch.zeros(1, 2, 2)
    assert (scale_cost(zero, None, "max") == 0).all()
    assert torch.isfinite(scale_cost(torch.ones(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), "mean")).all()
    with pytest.raises(ValueError):
        scale_cost(cost, mask, "median")
