"""MultiLevelOTLoss (docs/methods.md §7) against a naive per-example float64 reference written from the SPEC (L_SD
solved with POT's ``sinkhorn_log``, converged tightly; its gradient is the envelope one: the reference plan held fixed),
on synthetic logits, the embedded tiny pair and a real tokenizer pair (Qwen1.5 → GPT-2, tiny shrunk models)."""

from __future__ import annotations

import pytest
import torch

import ot
from prefkd.losses.base import LossInputs, ModelOutputs, Needs
from prefkd.losses.multilevel_ot import MultiLevelOTLoss
from tests.helpers.pairs import inputs_of, pair_batch, real_pair, synthetic, tiny_pair
from tests.helpers.references import RowLeaves

TIGHT = {"tol": 1e-10, "max_iter": 5000}  # the loss's Sinkhorn converged as tightly as the reference's


def reference(batch, s_logits, t_logits, lam=1.5, sl_w=0.1, sd_w=0.1, top_k=50, tau=1.0, sd_tau=2.0, eps=0.1):
    """docs/methods.md §7 per example, float64. Returns (total, ce, had, sl, sd, aligned, grad w.r.t. the student
    logits).

    Response positions of each side in order, k-th paired with k-th; z = logits / std(logits); p = softmax(z/τ)
    sorted descending, first top_k kept, the shorter zero-padded. Per example b with n_b student response tokens:
    n_b·mean HAD, n_b·mean SL, n_b·SD_b (SD_b = ⟨P, C⟩ with P from POT, held fixed for the gradient).
    """
    x = RowLeaves(s_logits)
    t = t_logits.detach().double()
    labels, t_labels = batch["labels"], batch["teacher_labels"]
    width = max(min(top_k, x.shape[-1]), min(top_k, t.shape[-1]))
    ce = had = sl = sd = torch.zeros((), dtype=torch.float64)
    aligned = 0

    def top(row):
        p = torch.softmax(row / row.std() / tau, -1)
        p = torch.sort(p, descending=True).values[:top_k]
        return torch.cat([p, torch.zeros(width - p.numel(), dtype=torch.float64)])

    for b in range(x.shape[0]):
        sp = [j for j in range(labels.shape[1]) if labels[b, j] != -100]
        tp = [i for i in range(t_labels.shape[1]) if t_labels[b, i] != -100]
        for j in sp:
            ce = ce - torch.log_softmax(x[b, j].double(), -1)[labels[b, j]]
        a = min(len(sp), len(tp))
        aligned += a
        if a == 0:
            continue
        ps = [top(x[b, sp[k]].double()) for k in range(a)]
        pt = [top(t[b, tp[k]]) for k in range(a)]
        had_b = sum((ps[k] - pt[k]).abs().sum() for k in range(a)) / a
        sl_b = sum(-(torch.softmax(pt[k], -1) * torch.log_softmax(ps[k], -1)).sum() for k in range(a)) / a
        xs = [torch.softmax(v / sd_tau, -1) for v in ps]
        xt = [torch.softmax(v / sd_tau, -1) for v in pt]
        cost = torch.stack([torch.stack([(xs[i] - xt[j]).abs().sum() for j in range(a)]) for i in range(a)])
        marg = torch.full((a,), 1.0 / a, dtype=torch.float64)
        plan = torch.as_tensor(ot.sinkhorn(marg.numpy(), marg.numpy(), cost.detach().numpy(), eps,
                                           method="sinkhorn_log", numItermax=100000, stopThr=1e-13))
        n_b = len(sp)
        had, sl, sd = had + n_b * had_b, sl + n_b * sl_b, sd + n_b * (plan * cost).sum()
    total = ce + lam * (had + sl_w * sl + sd_w * sd)
    return [v.detach() for v in (total, ce, had, sl, sd)] + [aligned, x.grad(total)]


def check(out, inputs, ref, rtol=1e-5, atol=1e-5, grad_atol=1e-6):
    total, ce, had, sl, sd, aligned, grad = ref
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), total, rtol=rtol, atol=atol)
    for name, want in (("ce", ce), ("had", had), ("sl", sl), ("sd", sd)):
        torch.testing.assert_close(out.metrics[name].double(), want, rtol=rtol, atol=atol, msg=name)
    assert int(out.metrics["aligned"]) == aligned
    torch.testing.assert_close(inputs.student.logits.grad.double(), grad, rtol=1e-4, atol=grad_atol)


KWS = [{}, {"top_k": 5}, {"top_k": 3, "temperature": 2.0, "lambda_": 0.7, "sl_weight": 0.5, "sd_weight": 1.0},
       {"top_k": 15, "sd_temperature": 1.0, "eps": 0.3}]


def ref_kw(kw):
    return {"lam": kw.get("lambda_", 1.5), "sl_w": kw.get("sl_weight", 0.1), "sd_w": kw.get("sd_weight", 0.1),
            "top_k": kw.get("top_k", 50), "tau": kw.get("temperature", 1.0), "sd_tau": kw.get("sd_temperature", 2.0),
            "eps": kw.get("eps", 0.1)}


@pytest.mark.parametrize("kw", KWS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_synthetic_equals_reference(kw, dtype):
    """V_s = 13, V_t = 17 < 50: the default top_k keeps everything and zero-pads the student to 17."""
    batch, s, t = synthetic(seed=1)
    inputs = inputs_of(batch, s.to(dtype), t.to(dtype))
    out = MultiLevelOTLoss(chunk_size=5, **TIGHT, **kw)(inputs)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4, "grad_atol": 1e-5}
    check(out, inputs, reference(batch, s.to(dtype), t.to(dtype), **ref_kw(kw)), **tol)


def test_default_tolerance_is_close_to_the_converged_value():
    batch, s, t = synthetic(seed=4)
    out = MultiLevelOTLoss()(inputs_of(batch, s, t))
    ref = reference(batch, s, t)
    torch.testing.assert_close(out.loss.double(), ref[0], rtol=1e-4, atol=1e-4)


def test_examples_are_independent_and_padding_never_enters_the_transport():
    """The batched loss equals the sum of each example's loss computed alone (trimmed to its own length), and
    garbage in padded or unaligned positions of either side changes nothing but the student's CE positions."""
    batch, s, t = synthetic(seed=5, B=4)
    s, t = s.double(), t.double()
    full = MultiLevelOTLoss(chunk_size=3, **TIGHT)(inputs_of(batch, s, t))
    parts = {k: 0.0 for k in ("had", "sl", "sd", "ce")}
    for b in range(4):
        nb, mb = int(batch["labels"][b].ne(-100).nonzero().max()) + 1, 12
        one = {"labels": batch["labels"][b : b + 1, :nb], "teacher_labels": batch["teacher_labels"][b : b + 1, :mb]}
        out = MultiLevelOTLoss(**TIGHT)(inputs_of(one, s[b : b + 1, :nb], t[b : b + 1, :mb]))
        for k in parts:
            parts[k] = parts[k] + out.metrics[k]
    for k in parts:
        torch.testing.assert_close(full.metrics[k], parts[k], rtol=1e-9, atol=1e-9, msg=k)

    s2, t2 = s.clone(), t.clone()
    s2[batch["labels"].eq(-100)] = 1e4 * torch.randn_like(s2[batch["labels"].eq(-100)])
    t2[batch["teacher_labels"].eq(-100)] = float("nan")
    out = MultiLevelOTLoss(chunk_size=3, **TIGHT)(inputs_of(batch, s2, t2))
    for _k in ("loss",):
        torch.testing.assert_close(out.loss, full.loss, rtol=1e-9, atol=1e-9)
    for k in ("had", "sl", "sd", "ce"):
        torch.testing.assert_close(out.metrics[k], full.metrics[k], rtol=1e-9, atol=1e-9, msg=k)


def test_identical_sides_give_zero_kd_terms_but_sl():
    batch, s, _ = synthetic(seed=6, m=9, V_t=13)
    batch["teacher_labels"] = batch["labels"].clone()
    out = MultiLevelOTLoss(**TIGHT)(inputs_of(batch, s.double(), s.double()))
    assert float(out.metrics["had"]) == pytest.approx(0.0, abs=1e-12)
    # the entropic plan (ε = 0.1 ≫ these costs) is far from the identity: SD is positive, but smaller than
    # against another teacher
    other = MultiLevelOTLoss(**TIGHT)(inputs_of(batch, s.double(), s.double().flip(1)))
    assert 0 < float(out.metrics["sd"]) < float(other.metrics["sd"])
    assert float(out.metrics["sl"]) > 0  # a cross-entropy: the entropy of softmax(p), not zero


def test_no_grad_path_and_bf16_and_teacher_without_gradient():
    batch, s, t = synthetic(seed=3)
    with torch.no_grad():
        plain = MultiLevelOTLoss()(inputs_of(batch, s, t))
    graded = MultiLevelOTLoss()(inputs_of(batch, s, t))
    torch.testing.assert_close(plain.loss, graded.loss.detach())
    inputs = LossInputs(batch=batch, student=ModelOutputs(logits=s.bfloat16().requires_grad_(True)),
                        teacher=ModelOutputs(logits=t.bfloat16().requires_grad_(True)))
    out = MultiLevelOTLoss()(inputs)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(inputs.student.logits.grad.float()).all()
    assert inputs.teacher.logits.grad is None


def test_no_aligned_position_gives_ce_only():
    batch, s, t = synthetic(seed=2)
    batch["teacher_labels"] = torch.full_like(batch["teacher_labels"], -100)
    inputs = inputs_of(batch, s, t)
    out = MultiLevelOTLoss()(inputs)
    out.loss.backward()
    torch.testing.assert_close(out.loss, out.metrics["ce"])
    assert int(out.metrics["aligned"]) == 0 and float(out.metrics["sd"]) == 0.0


def test_options_and_needs():
    assert MultiLevelOTLoss.needs == Needs(teacher=True)
    for bad in ({"top_k": 0}, {"temperature": 0.0}, {"eps": 0.0}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            MultiLevelOTLoss(**bad)
    batch, s, t = synthetic()
    with pytest.raises(ValueError, match="teacher"):
        MultiLevelOTLoss()(LossInputs(batch=batch, student=ModelOutputs(logits=s)))


def test_embedded_tiny_pair_equals_reference():
    batch, s, t = pair_batch(tiny_pair())
    inputs = inputs_of(batch, s.double(), t.double())
    check(MultiLevelOTLoss(chunk_size=16, **TIGHT)(inputs), inputs, reference(batch, s, t))


def test_real_pair_equals_reference():
    """Qwen1.5 (151k vocabulary) → GPT-2 (50k): value in fp32 with the default options; value and gradient in fp64."""
    batch, s, t = pair_batch(real_pair(("qwen1.5", "gpt2")), max_length=40)
    ref = reference(batch, s, t)
    out = MultiLevelOTLoss(chunk_size=8)(inputs_of(batch, s, t))
    torch.testing.assert_close(out.loss.double(), ref[0], rtol=1e-4, atol=1e-4)
    inputs = inputs_of(batch, s.double(), t.double())
    check(MultiLevelOTLoss(chunk_size=8, **TIGHT)(inputs), inputs, ref)
    assert int(out.metrics["aligned"]) > 0


def test_training_lowers_the_loss(tmp_path):
    from prefkd.training.pipeline import run
    from tests.helpers.runs import compose_cfg

    summary = run(compose_cfg("model=tiny", "loss=multilevel_ot", "trainer.max_steps=20", "trainer.num_threads=1",
                              "trainer.eval_every=1000", "trainer.eval_at_start=true"), tmp_path / "run")
    assert summary["steps"] == 20
    assert summary["dev_loss_final"] < summary["dev_loss_start"], summary
    assert summary["last_train_loss"] < summary["first_train_loss"], summary
