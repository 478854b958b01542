"""ULDLoss (docs/methods.md §5) against a naive float64 reference written from the SPEC: synthetic logits, the embedded
tiny pair, the real tokenizer pairs (tiny shrunk models with the real vocabularies), both mixes, top-k = V."""

from __future__ import annotations

import pytest
import torch

from prefkd.losses.base import LossInputs, ModelOutputs, Needs
from prefkd.losses.uld import ULDLoss, response_alignment, sorted_probs, uld_distance
from tests.helpers.pairs import inputs_of, pair_batch, real_pair, synthetic, tiny_pair
from tests.helpers.references import RowLeaves
from tests.helpers.shared import REAL_PAIRS


def reference(batch, s_logits, t_logits, mix="dskd", kd_rate=0.5, lam=1.5, tau=1.0, top_k=None):
    """docs/methods.md §5 written out per example, float64. Returns (total, ce, uld, aligned, grad w.r.t. student
    logits).

    Response positions of each side in order; pair k with k for k < min(lengths); p = softmax(z/τ) sorted
    descending, the shorter vocabulary zero-padded; ULD_k = Σ_r |p_S^(r) − p_T^(r)| (top_k: the first K ranks plus
    |remaining mass difference|). dskd: (1−r)ΣCE + rΣULD; paper: ΣCE + λ Σ_b n_b·mean_b(ULD).
    """
    x = RowLeaves(s_logits)
    t = t_logits.detach().double()
    labels, t_labels = batch["labels"], batch["teacher_labels"]
    width = max(x.shape[-1], t.shape[-1])
    ce = uld = scaled = torch.zeros((), dtype=torch.float64)
    aligned = 0
    for b in range(x.shape[0]):
        sp = [j for j in range(labels.shape[1]) if labels[b, j] != -100]
        tp = [i for i in range(t_labels.shape[1]) if t_labels[b, i] != -100]
        for j in sp:
            ce = ce - torch.log_softmax(x[b, j], -1)[labels[b, j]]
        per_seq = []
        for k in range(min(len(sp), len(tp))):
            ps = torch.sort(torch.softmax(x[b, sp[k]] / tau, -1), descending=True).values
            pt = torch.sort(torch.softmax(t[b, tp[k]] / tau, -1), descending=True).values
            ps = torch.cat([ps, torch.zeros(width - ps.numel(), dtype=torch.float64)])
            pt = torch.cat([pt, torch.zeros(width - pt.numel(), dtype=torch.float64)])
            if top_k is None:
                per_seq.append((ps - pt).abs().sum())
            else:
                head = (ps[:top_k] - pt[:top_k]).abs().sum()
                per_seq.append(head + ((1 - ps[:top_k].sum()) - (1 - pt[:top_k].sum())).abs())
        aligned += len(per_seq)
        if per_seq:
            uld = uld + sum(per_seq)
            scaled = scaled + len(sp) * sum(per_seq) / len(per_seq)
    total = (1 - kd_rate) * ce + kd_rate * uld if mix == "dskd" else ce + lam * scaled
    return total.detach(), ce.detach(), uld.detach(), aligned, x.grad(total)


def check(out, inputs, ref, rtol=1e-5):
    total, ce, uld, aligned, grad = ref
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), total, rtol=rtol, atol=1e-4)
    torch.testing.assert_close(out.metrics["ce"].double(), ce, rtol=rtol, atol=1e-4)
    torch.testing.assert_close(out.metrics["uld"].double(), uld, rtol=rtol, atol=1e-4)
    assert int(out.metrics["aligned"]) == aligned
    torch.testing.assert_close(inputs.student.logits.grad.double(), grad, rtol=1e-4, atol=1e-6)


def test_response_alignment_pairs_the_kth_response_positions():
    batch, _, _ = synthetic()
    flat = response_alignment(batch["labels"], batch["teacher_labels"])
    m = batch["teacher_labels"].shape[1]
    for b in range(4):
        sp = [j for j in range(9) if batch["labels"][b, j] != -100]
        tp = [i for i in range(m) if batch["teacher_labels"][b, i] != -100]
        want = [-1] * 9
        for k in range(min(len(sp), len(tp))):
            want[sp[k]] = b * m + tp[k]
        assert flat[b].tolist() == want


@pytest.mark.parametrize("kw", [{}, {"mix": "paper"}, {"mix": "paper", "uld_weight": 0.7, "temperature": 2.0},
                                {"kd_rate": 0.8, "temperature": 0.5}, {"top_k": 4}, {"top_k": 1, "mix": "paper"}])
def test_synthetic_equals_reference(kw):
    batch, s, t = synthetic(seed=1)
    inputs = inputs_of(batch, s, t)
    out = ULDLoss(chunk_size=5, **kw)(inputs)
    ref = reference(batch, s, t, kw.get("mix", "dskd"), kw.get("kd_rate", 0.5), kw.get("uld_weight", 1.5),
                    kw.get("temperature", 1.0), kw.get("top_k"))
    check(out, inputs, ref)


@pytest.mark.parametrize("k", [17, 40])
def test_top_k_at_the_vocabulary_size_equals_the_full_sort(k):
    batch, s, t = synthetic(seed=2)
    full_in, top_in = inputs_of(batch, s, t), inputs_of(batch, s, t)
    full, top = ULDLoss(chunk_size=4)(full_in), ULDLoss(chunk_size=4, top_k=k)(top_in)
    torch.testing.assert_close(top.loss, full.loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(top.metrics["uld"], full.metrics["uld"], rtol=1e-6, atol=1e-5)
    full.loss.backward()
    top.loss.backward()
    torch.testing.assert_close(top_in.student.logits.grad, full_in.student.logits.grad, rtol=1e-5, atol=1e-6)


def test_top_k_is_a_lower_bound_of_the_full_sort():
    s, t = torch.randn(6, 13, dtype=torch.float64), torch.randn(6, 17, dtype=torch.float64)
    full = uld_distance(s, t)
    for k in (1, 3, 8, 13, 16):
        assert (uld_distance(s, t, top_k=k) <= full + 1e-12).all()
    torch.testing.assert_close(uld_distance(s, t, top_k=17), full)


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sorted_probs_sort_the_softmax(top_k, temperature):
    """exp(sort(z/τ) − logsumexp(z/τ)) is softmax(z/τ) sorted (its top-k): the same values, with gradient and without
    (the teacher's path: 4 rows per sort call, 7 rows here), and the same gradient as sorting the probabilities."""
    z = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(z / temperature, -1)
    want = p.sort(-1, descending=True).values if top_k is None else p.topk(top_k, -1).values
    got = sorted_probs(z, temperature, top_k)
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(sorted_probs(z, temperature, top_k), want.detach())
    w = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * w).sum(), z)[0], torch.autograd.grad((want * w).sum(), z)[0])


def test_identical_distributions_up_to_a_permutation_have_zero_uld():
    s = torch.randn(3, 10, dtype=torch.float64)
    t = torch.cat([s[:, torch.randperm(10)], torch.full((3, 5), -torch.inf, dtype=torch.float64)], -1)
    torch.testing.assert_close(uld_distance(s, t), torch.zeros(3, dtype=torch.float64))


def test_bf16_and_teacher_without_gradient():
    batch, s, t = synthetic(seed=3)
    inputs = LossInputs(batch=batch, student=ModelOutputs(logits=s.bfloat16().requires_grad_(True)),
                        teacher=ModelOutputs(logits=t.bfloat16().requires_grad_(True)))
    out = ULDLoss(top_k=5)(inputs)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(inputs.student.logits.grad.float()).all()
    assert inputs.teacher.logits.grad is None


def test_options_and_needs():
    assert ULDLoss.needs == Needs(teacher=True)
    with pytest.raises(ValueError, match="dskd, paper"):
        ULDLoss(mix="mean")
    with pytest.raises(ValueError, match="top_k"):
        ULDLoss(top_k=0)
    batch, s, t = synthetic()
    with pytest.raises(ValueError, match="teacher"):
        ULDLoss()(LossInputs(batch=batch, student=ModelOutputs(logits=s)))


@pytest.mark.parametrize("mix", ["dskd", "paper"])
def test_embedded_tiny_pair_equals_reference(mix):
    batch, s, t = pair_batch(tiny_pair())
    inputs = inputs_of(batch, s, t)
    check(ULDLoss(mix=mix, chunk_size=16)(inputs), inputs, reference(batch, s, t, mix))


@pytest.mark.parametrize("pair", REAL_PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_real_pairs_equal_reference(pair):
    """Value in fp32; value and gradient in fp64: with 50k-150k probabilities per row, fp32 rounding creates ties
    that the sort may order differently from fp64, which moves a few gradient entries to another rank's sign."""
    batch, s, t = pair_batch(real_pair(pair), max_length=40)  # ≤ 16 response tokens each: the sorts are slow
    ref = reference(batch, s, t, "paper")
    out = ULDLoss(mix="paper", chunk_size=32)(inputs_of(batch, s, t))
    torch.testing.assert_close(out.loss.double(), ref[0], rtol=1e-5, atol=1e-4)
    inputs = inputs_of(batch, s.double(), t.double())
    check(ULDLoss(mix="paper", chunk_size=32)(inputs), inputs, ref)
    assert int(out.metrics["aligned"]) > 0


def test_training_lowers_the_loss(tmp_path):
    from prefkd.training.pipeline import run
    from tests.helpers.runs import compose_cfg

    summary = run(compose_cfg("model=tiny", "loss=uld", "trainer.max_steps=20",
                              "trainer.eval_every=1000", "trainer.eval_at_start=true"), tmp_path / "run")
    assert summary["steps"] == 20
    assert summary["dev_loss_final"] < summary["dev_loss_start"], summary
    assert summary["last_train_loss"] < summary["first_train_loss"], summary
