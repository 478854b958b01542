"""DSKDCMALoss (docs/methods.md §4, cross-model attention) against a naive float64 reference written from the SPEC: on
synthetic tensors, on the real tokenizer pairs (Qwen1.5 → GPT-2, Mistral → TinyLLaMA) with tiny shrunk models
and real Dolly records, and on the embedded tiny pair; masks, pre-training mode, projectors' life cycle, and
tiny training runs (with an exact resume)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prefkd.losses.base import LossInputs, ModelOutputs, Needs
from prefkd.losses.dskd import DSKDCMALoss
from tests.helpers.pairs import cross_inputs, dolly_records, leaf, model_inputs
from tests.helpers.references import assert_grads_close, module_grads, reference_cma
from tests.helpers.runs import QUICK_RUN, quick_run
from tests.helpers.shared import REAL_PAIRS


# ---------------------------------------------------------------------------------------------- reference
def check_against_reference(inputs, loss, divergence="forward_kl", tau=1.0, tau_t=1.0, kd_rate=0.5):
    want, want_grads = reference_cma(inputs, loss, divergence, tau, tau_t, kd_rate)
    out = loss(inputs)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), want["loss"], rtol=1e-5, atol=1e-4)
    for k in ("ce", "ce_t2s", "kd_stu", "kd_tea", "kd", "t2s_acc"):
        torch.testing.assert_close(out.metrics[k].double(), want[k].double(), rtol=1e-5, atol=1e-4, msg=k)
    assert_grads_close(module_grads(inputs, loss), want_grads)
    return out


# ---------------------------------------------------------------------------------------------- inputs
def built(inputs, **kw) -> DSKDCMALoss:
    loss = DSKDCMALoss(**kw)
    loss.build(inputs.student.model, inputs.teacher.model)
    return loss


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("divergence,tau,tau_t,kd_rate,chunk", [("forward_kl", 1.0, 1.0, 0.5, 1024),
                                                                ("reverse_kl", 2.0, 1.5, 0.3, 4),
                                                                ("tvd", 0.8, 2.0, 0.9, 1)])
def test_matches_the_spec_reference(divergence, tau, tau_t, kd_rate, chunk):
    inputs = cross_inputs(seed=1)
    loss = built(inputs, divergence=divergence, temperature=tau, teacher_temperature=tau_t, kd_rate=kd_rate,
                 chunk_size=chunk)
    out = check_against_reference(inputs, loss, divergence, tau, tau_t, kd_rate)
    n_tokens = int(inputs.batch["labels"].ne(-100).sum())
    assert 0 < out.metrics["t2s_acc"] < n_tokens  # both branches of the accuracy mask are exercised
    assert inputs.teacher.logits.grad is None and inputs.teacher.hidden.grad is None


@pytest.mark.parametrize("teacher_name,student_name", REAL_PAIRS)
def test_real_tokenizer_pairs_match_the_reference(teacher_name, student_name, shared):
    from prefkd.models.tiny import build_shrunk

    size = dict(hidden_size=32, num_layers=1, num_heads=2)
    teacher = build_shrunk(shared / "tokenizers" / teacher_name, hidden_size=48, num_layers=1, num_heads=2, seed=1)
    student = build_shrunk(shared / "tokenizers" / student_name, **size, seed=2)
    inputs = model_inputs(student, teacher, dolly_records(shared))
    assert min(inputs.student.logits.shape[-1], inputs.teacher.logits.shape[-1]) >= 32000  # real vocabularies
    loss = built(inputs, temperature=2.0, teacher_temperature=1.5, chunk_size=16)
    assert tuple(loss.projectors["query"].weight.shape) == (96, 64)
    check_against_reference(inputs, loss, tau=2.0, tau_t=1.5)


def test_embedded_tiny_pair_matches_the_reference():
    from prefkd.data.embedded import generate_records
    from prefkd.models.tiny import build_tiny

    teacher, student = build_tiny("a", "llama", 64, seed=1), build_tiny("b", "gpt2", 32, seed=2)
    inputs = model_inputs(student, teacher, generate_records(4, seed=3), 64, 128)
    assert not torch.equal(inputs.batch["input_ids"][:, :5], inputs.batch["teacher_input_ids"][:, :5])
    check_against_reference(inputs, built(inputs, divergence="js", chunk_size=8), "js")


def test_padding_never_leaks_and_sequences_are_independent():
    inputs = cross_inputs(seed=2)
    loss = built(inputs, kd_rate=0.7)
    whole = loss(inputs)
    whole.loss.backward()
    grads = {k: p.grad.clone() for k, p in loss.projectors.named_parameters()}
    # padded positions of either side: any hidden states / logits give the same loss
    for side, key in ((inputs.student, "attention_mask"), (inputs.teacher, "teacher_attention_mask")):
        pad = inputs.batch[key] == 0
        side.hidden.data[pad] = torch.randn(int(pad.sum()), side.hidden.shape[-1]) * 100
        side.logits.data[pad] = torch.randn(int(pad.sum()), side.logits.shape[-1]) * 100
    torch.testing.assert_close(loss(inputs).loss, whole.loss, rtol=0, atol=0)
    # docs/methods.md §2: the batch's sum = the sum over each sequence alone (unpadded), gradients too
    loss.zero_grad()
    total = 0.0
    for i in range(3):
        n, m = int(inputs.batch["attention_mask"][i].sum()), int(inputs.batch["teacher_attention_mask"][i].sum())
        one = {k: v[i:i + 1, :m if k.startswith("teacher") else n] for k, v in inputs.batch.items()}
        s, t = inputs.student, inputs.teacher
        single = LossInputs(one, ModelOutputs(s.logits[i:i + 1, :n], s.hidden[i:i + 1, :n], s.model),
                            ModelOutputs(t.logits[i:i + 1, :m], t.hidden[i:i + 1, :m], t.model))
        out = loss(single)
        out.loss.backward()
        total = total + out.loss.detach()
    torch.testing.assert_close(total, whole.loss.detach(), rtol=1e-5, atol=1e-5)
    for k, p in loss.projectors.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_pretrain_mode_gives_only_projector_gradients():
    from prefkd.data.embedded import generate_records
    from prefkd.models.tiny import build_tiny

    teacher, student = build_tiny("a", "llama", 64, seed=1), build_tiny("b", "gpt2", 32, seed=2)
    inputs = model_inputs(student, teacher, generate_records(3, seed=4), 64, 128)
    with torch.enable_grad():  # the student's real forward, with its graph
        so = student.model(input_ids=inputs.batch["input_ids"], attention_mask=inputs.batch["attention_mask"],
                           output_hidden_states=True)
    inputs.student = ModelOutputs(so.logits, so.hidden_states[-1], student.model)
    loss = built(inputs, pretrain_projectors=True)
    out = loss(inputs)
    out.loss.backward()
    torch.testing.assert_close(out.loss, out.metrics["ce_t2s"])
    assert all(p.grad is None for p in student.model.parameters())
    assert loss.projectors["s2t"].weight.grad is None
    for name in ("t2s", "query"):
        assert loss.projectors[name].weight.grad.abs().sum() > 0, name
    # the value agrees with the reference's L_ce^{t→s} (and so do the projectors' gradients)
    inputs.student = ModelOutputs(leaf(so.logits), leaf(so.hidden_states[-1]), student.model)
    loss.zero_grad()
    want, want_grads = reference_cma(inputs, loss, "forward_kl", 1.0, 1.0, 0.5, pretrain=True)
    out = loss(inputs)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), want["loss"], rtol=1e-5, atol=1e-4)
    for name in ("t2s.weight", "query.weight", "t2s.bias"):
        torch.testing.assert_close(dict(loss.projectors.named_parameters())[name].grad.double(), want_grads[name],
                                   rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("step,training,warm", [(0, True, True), (2, True, True), (3, True, False), (0, False, False)])
def test_projector_warmup_trains_the_projectors_while_the_student_learns_from_ce(step, training, warm):
    """While training within projector_warmup_steps the student's gradient is (1 − kd_rate)·∇CE alone and the
    projectors learn L_ce^{t→s} + L_kd^{tea}; after it, and in eval mode (dev losses), the full loss."""
    inputs = cross_inputs(seed=5)
    inputs.step = step
    loss = built(inputs, projector_warmup_steps=3).train(training)
    want, want_grads = reference_cma(inputs, loss, "forward_kl", 1.0, 1.0, 0.5, warm=warm)
    out = loss(inputs)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), want["loss"], rtol=1e-5, atol=1e-4)
    got = module_grads(inputs, loss)
    if warm:
        assert got.pop("student_hidden") is None and want_grads.pop("student_hidden") is None
    assert_grads_close(got, want_grads)


def test_without_the_teacher_space_term_kd_is_ce_t2s_plus_kd_stu():
    """teacher_space=False (the DSKD authors' only_stu_kd): no L_kd^{tea}, so s2t gets no gradient."""
    inputs = cross_inputs(seed=6)
    loss = built(inputs, teacher_space=False)
    with torch.no_grad():  # a t2s projector that reads the label off E^t(y_t): acc > 0, so L_kd^{stu} counts
        loss.projectors["t2s"].weight.mul_(5.0)
    want, want_grads = reference_cma(inputs, loss, "forward_kl", 1.0, 1.0, 0.5, teacher_space=False)
    out = loss(inputs)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), want["loss"], rtol=1e-5, atol=1e-4)
    assert float(out.metrics["kd_tea"]) == 0.0
    got = module_grads(inputs, loss)
    assert float(want["t2s_acc"]) > 0  # L_kd^{stu} is in the loss
    for name in ("s2t.weight", "s2t.bias", "student_hidden"):  # h^s only fed s2t
        assert got.pop(name) is None and want_grads.pop(name) is None
    assert_grads_close(got, want_grads)


def test_needs_build_and_state_dict_round_trip():
    inputs = cross_inputs(seed=3)
    assert DSKDCMALoss.needs == Needs(teacher=True, hidden_states=True)
    with pytest.raises(RuntimeError, match="build"):
        DSKDCMALoss()(inputs)
    a = built(inputs)
    assert {k: tuple(m.weight.shape) for k, m in a.projectors.items()} == {"t2s": (6, 8), "s2t": (8, 6),
                                                                            "query": (16, 12)}
    torch.manual_seed(321)
    b = built(inputs)
    assert not torch.equal(a.projectors["query"].weight, b.projectors["query"].weight)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    torch.testing.assert_close(a(inputs).loss, b(inputs).loss, rtol=0, atol=0)


def test_tiny_cross_tokenizer_training_lowers_the_loss_and_resumes_projectors(tmp_path):
    """8 straight steps lower the loss; 4 steps, stop, resume, 4 more give the same projectors (and weights)."""
    from tests.helpers.runs import assert_same_weights, compose_cfg, weights

    common = ("model=tiny", "loss=dskd_cma", *QUICK_RUN, "trainer.eval_every=4")
    summary = quick_run(compose_cfg(*common), tmp_path / "straight")
    assert summary["steps"] == 8 and summary["nonfinite_steps"] == 0
    assert summary["dev_loss_final"] < 0.9 * summary["dev_loss_start"], summary
    assert not quick_run(compose_cfg(*common, "trainer.stop_at_step=4"), tmp_path / "resumed")["finished"]
    resumed = quick_run(compose_cfg(*common), tmp_path / "resumed")
    assert resumed["steps"] == 8 and resumed["last_train_loss"] == pytest.approx(summary["last_train_loss"], rel=1e-5)
    a, b = (load_file(str(tmp_path / d / "checkpoints/last/projectors.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == {f"projectors.{p}.{w}" for p in ("t2s", "s2t", "query") for w in ("weight", "bias")}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"), atol=1e-6)


def test_bf16_models_and_activations():
    inputs = cross_inputs(seed=1)
    loss = built(inputs)
    want = loss(inputs).loss.detach()
    s, t = inputs.student, inputs.teacher
    s.model.to(torch.bfloat16), t.model.to(torch.bfloat16)
    inputs.student = ModelOutputs(leaf(s.logits.bfloat16()), leaf(s.hidden.bfloat16()), s.model)
    inputs.teacher = ModelOutputs(t.logits.bfloat16(), t.hidden.bfloat16(), t.model)
    out = loss(inputs)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-2, atol=0)
    for g in (inputs.student.logits.grad, inputs.student.hidden.grad):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in loss.parameters())
