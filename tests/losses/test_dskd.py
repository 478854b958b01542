"""DSKDLoss (docs/methods.md §4, same vocabulary) against a naive float64 reference written from the SPEC, plus the
projectors' life cycle (build, state_dict round trip) and a tiny training run."""

from __future__ import annotations

import pytest
import torch

from prefkd.losses.base import LossInputs, ModelOutputs, Needs
from prefkd.losses.chunked import chunked_rows_loss
from prefkd.losses.dskd import DSKDLoss
from tests.helpers.pairs import FakeLM, leaf
from tests.helpers.references import assert_grads_close, ce_rows, f64_params, module_grads, ref_divergence
from tests.helpers.runs import QUICK_RUN, quick_run


# ---------------------------------------------------------------------------------------------- fixtures
def same_vocab_inputs(B=3, T=8, V=13, d_s=5, d_t=7, seed=0):
    """Random logits / hidden states (leaves) for a same-tokenizer batch with prompt and padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    labels[:, :2] = -100  # prompt
    labels[1, -2:], attention[1, -2:] = -100, 0  # padding
    labels[2, -1], attention[2, -1] = -100, 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attention, "teacher_input_ids": ids.clone(),
             "teacher_labels": labels.clone(), "teacher_attention_mask": attention.clone()}
    student, teacher = FakeLM(V, d_s, seed + 1), FakeLM(V, d_t, seed + 2)
    s = ModelOutputs(leaf(torch.randn(B, T, V, generator=g) * 2), leaf(torch.randn(B, T, d_s, generator=g)), student)
    t = ModelOutputs(torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, d_t, generator=g), teacher)
    return LossInputs(batch=batch, student=s, teacher=t)


# ---------------------------------------------------------------------------------------------- reference
def reference_dskd(inputs: LossInputs, loss: DSKDLoss, divergence: str, tau: float, kd_rate: float):
    """docs/methods.md §4 DSKD, one sequence at a time, float64. Returns (terms dict, grads dict)."""
    b, s, t = inputs.batch, inputs.student, inputs.teacher
    P = f64_params(loss)
    zs_all, hs_all = leaf(s.logits.double()), leaf(s.hidden.double())
    W_s, W_t = s.model.head.weight.double(), t.model.head.weight.double()
    terms = dict.fromkeys(("ce", "ce_t2s", "kd_stu", "kd_tea"), 0.0)
    for i in range(b["labels"].shape[0]):
        ms, mt = b["labels"][i] != -100, b["teacher_labels"][i] != -100
        y = b["labels"][i][ms]
        z_t2s = (t.hidden[i][ms].double() @ P["t2s.weight"].T + P["t2s.bias"]) @ W_s.T
        terms["ce"] = terms["ce"] + ce_rows(zs_all[i][ms], y).sum()
        terms["ce_t2s"] = terms["ce_t2s"] + ce_rows(z_t2s, y).sum()
        terms["kd_stu"] = terms["kd_stu"] + ref_divergence(divergence, zs_all[i][ms], z_t2s.detach(), tau).sum()
        z_s2t = (hs_all[i][mt] @ P["s2t.weight"].T + P["s2t.bias"]) @ W_t.T
        terms["kd_tea"] = terms["kd_tea"] + ref_divergence("forward_kl", z_s2t, t.logits[i][mt].double(), tau).sum()
    kd = terms["ce_t2s"] + terms["kd_stu"] + terms["kd_tea"]
    total = (1 - kd_rate) * terms["ce"] + kd_rate * kd
    wrt = {"student_logits": zs_all, "student_hidden": hs_all, **P}
    grads = dict(zip(wrt, torch.autograd.grad(total, list(wrt.values()), allow_unused=True)))
    values = {k: v.detach() for k, v in terms.items()} | {"kd": kd.detach(), "loss": total.detach()}
    return values, grads


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("divergence,tau,kd_rate,chunk", [("forward_kl", 1.0, 0.5, 1024), ("reverse_kl", 2.0, 0.3, 3),
                                                          ("js", 0.7, 0.9, 5)])
def test_matches_the_spec_reference(divergence, tau, kd_rate, chunk):
    inputs = same_vocab_inputs(seed=1)
    loss = DSKDLoss(divergence=divergence, temperature=tau, kd_rate=kd_rate, chunk_size=chunk)
    loss.build(inputs.student.model, inputs.teacher.model)
    want, want_grads = reference_dskd(inputs, loss, divergence, tau, kd_rate)
    out = loss(inputs)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), want["loss"], rtol=1e-5, atol=1e-5)
    for k in ("ce", "ce_t2s", "kd_stu", "kd_tea", "kd"):
        torch.testing.assert_close(out.metrics[k].double(), want[k], rtol=1e-5, atol=1e-5, msg=k)
    assert_grads_close(module_grads(inputs, loss), want_grads)
    assert inputs.teacher.logits.grad is None and inputs.teacher.hidden.grad is None
    assert all(not v.requires_grad for v in out.metrics.values())


def test_needs_build_and_sizes():
    inputs = same_vocab_inputs()
    loss = DSKDLoss()
    assert loss.needs == Needs(teacher=True, hidden_states=True)
    with pytest.raises(RuntimeError, match="build"):
        loss(inputs)
    loss.build(inputs.student.model, inputs.teacher.model)
    shapes = {k: tuple(m.weight.shape) for k, m in loss.projectors.items()}
    assert shapes == {"t2s": (5, 7), "s2t": (7, 5)}  # Linear weights are out×in
    before = loss.projectors["t2s"].weight.clone()
    loss.build(inputs.student.model, inputs.teacher.model)  # idempotent: keeps the trained weights
    assert torch.equal(loss.projectors["t2s"].weight, before)
    with pytest.raises(ValueError, match="projectors were built"):
        loss.build(FakeLM(13, 4, 0), inputs.teacher.model)
    assert [m for m in loss.trainable_modules()] == [loss.projectors]


def test_different_tokenizers_are_refused():
    inputs = same_vocab_inputs()
    inputs.batch["teacher_input_ids"][0, 3] += 1
    loss = DSKDLoss()
    loss.build(inputs.student.model, inputs.teacher.model)
    with pytest.raises(ValueError, match="dskd_cma"):
        loss(inputs)


def test_padding_never_leaks():
    inputs = same_vocab_inputs(seed=2)
    loss = DSKDLoss(kd_rate=0.7)
    loss.build(inputs.student.model, inputs.teacher.model)
    a = loss(inputs).loss
    pad = inputs.batch["attention_mask"] == 0
    for side in (inputs.student, inputs.teacher):
        side.hidden.data[pad] = torch.randn(int(pad.sum()), side.hidden.shape[-1]) * 100
        side.logits.data[pad] = torch.randn(int(pad.sum()), side.logits.shape[-1]) * 100
    torch.testing.assert_close(loss(inputs).loss, a, rtol=0, atol=0)


def test_pretrain_mode_trains_only_t2s():
    inputs = same_vocab_inputs(seed=3)
    loss = DSKDLoss(pretrain_projectors=True)
    loss.build(inputs.student.model, inputs.teacher.model)
    out = loss(inputs)
    out.loss.backward()
    torch.testing.assert_close(out.loss, out.metrics["ce_t2s"])
    assert inputs.student.logits.grad is None and inputs.student.hidden.grad is None
    assert loss.projectors["s2t"].weight.grad is None
    assert loss.projectors["t2s"].weight.grad.abs().sum() > 0


def test_state_dict_round_trip():
    inputs = same_vocab_inputs(seed=4)
    a = DSKDLoss()
    a.build(inputs.student.model, inputs.teacher.model)
    torch.manual_seed(123)
    b = DSKDLoss()
    b.build(inputs.student.model, inputs.teacher.model)
    assert not torch.equal(a.projectors["t2s"].weight, b.projectors["t2s"].weight)
    b.load_state_dict(a.state_dict())
    assert a.state_dict().keys() == {f"projectors.{p}.{w}" for p in ("t2s", "s2t") for w in ("weight", "bias")}
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    torch.testing.assert_close(a(inputs).loss, b(inputs).loss, rtol=0, atol=0)


def test_chunked_rows_loss_gradients_match_autograd():
    g = torch.Generator().manual_seed(0)
    x, h, w = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 3, generator=g), torch.randn(7, 3, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    fn = lambda a, b: (torch.log_softmax(a, -1) * torch.softmax(b @ w.T, -1)).sum(-1)  # noqa: E731
    x1, h1, x2, h2 = leaf(x), leaf(h), leaf(x), leaf(h)
    chunked_rows_loss(fn, (x1, h1), mask, chunk_size=2).mul(3.0).backward()
    fn(x2[mask], h2[mask]).sum().mul(3.0).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(h1.grad, h2.grad)
    with torch.no_grad():
        torch.testing.assert_close(chunked_rows_loss(fn, (x1, h1), mask), fn(x[mask], h[mask]).sum())


def test_tiny_same_tokenizer_training_run_lowers_the_loss(tmp_path):
    from tests.helpers.runs import compose_cfg

    summary = quick_run(compose_cfg("loss=dskd", *QUICK_RUN), tmp_path / "run")
    assert summary["steps"] == 8 and summary["nonfinite_steps"] == 0
    assert summary["dev_loss_final"] < 0.9 * summary["dev_loss_start"], summary
