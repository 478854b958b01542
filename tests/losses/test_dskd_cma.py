"""DSKDCMALoss (SPEC §4, cross-model attention) against a naive float64 reference written from the SPEC: on
synthetic tensors, on the real tokenizer pairs (Qwen1.5 → GPT-2, Mistral → TinyLLaMA) with tiny shrunk models
and real Dolly records, and on the embedded tiny pair; masks, pre-training mode, projectors' life cycle, and
tiny training runs (with an exact resume)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from prefkd.losses.base import LossInputs, ModelOutputs, Needs
from prefkd.losses.dskd import DSKDCMALoss
from tests.conftest import REAL_PAIRS
from tests.losses.test_dskd import (QUICK_RUN, FakeLM, assert_grads_close, ce_rows, f64_params, leaf,
                                    module_grads, quick_run, ref_divergence)


# ---------------------------------------------------------------------------------------------- reference
def reference_cma(inputs: LossInputs, loss: DSKDCMALoss, divergence: str, tau: float, tau_t: float,
                  kd_rate: float, pretrain: bool = False, warm: bool = False, teacher_space: bool = True):
    """SPEC §4 DSKD-CMA, one sequence at a time on its unpadded length, float64, with the masked entries of A
    dropped (not filled). std = torch's whole-tensor std of the sequence's tensor. Returns (values, grads).
    ``warm``: the projector warm-up's loss, (1 − kd_rate)·CE + kd_rate·(L_ce^{t→s} + L_kd^{tea}) with h^s detached
    in L_kd^{tea} (the student learns from CE alone). ``teacher_space=False``: KD without L_kd^{tea}."""
    b, s, t = inputs.batch, inputs.student, inputs.teacher
    P = f64_params(loss)
    zs_all, hs_all = leaf(s.logits.double()), leaf(s.hidden.double())
    E_s, E_t = s.model.get_input_embeddings().weight.double(), t.model.get_input_embeddings().weight.double()
    W_s, W_t = s.model.get_output_embeddings().weight.double(), t.model.get_output_embeddings().weight.double()
    d_t = t.hidden.shape[-1]
    names = ("ce", "ce_t2s", "kd_stu", "kd_tea", "t2s_acc")
    terms = dict.fromkeys(names, 0.0)
    for i in range(b["labels"].shape[0]):
        n, m = int(b["attention_mask"][i].sum()), int(b["teacher_attention_mask"][i].sum())
        y_s, y_t = b["labels"][i, :n], b["teacher_labels"][i, :m]
        ms, mt = y_s != -100, y_t != -100
        x, y = torch.where(ms, b["input_ids"][i, :n], 0), torch.where(ms, y_s, 0)
        xt, yt = torch.where(mt, b["teacher_input_ids"][i, :m], 0), torch.where(mt, y_t, 0)
        Q = torch.cat([E_s[x], E_s[y]], -1) @ P["query.weight"].T + P["query.bias"]
        K = torch.cat([E_t[xt], E_t[yt]], -1)
        K = K / K.std()
        h_t = t.hidden[i, :m].double()
        V_t = (h_t / h_t.std() + E_t[yt] / E_t[yt].std()) @ P["t2s.weight"].T + P["t2s.bias"]
        V_s = (hs_all[i, :n].detach() if warm else hs_all[i, :n]) @ P["s2t.weight"].T + P["s2t.bias"]
        A = (Q @ K.T / math.sqrt(2 * d_t))[ms][:, mt]  # only the valid block
        z_t2s = (torch.softmax(A, -1) @ V_t[mt]) @ W_s.T
        target = y[ms]
        acc = (z_t2s.argmax(-1) == target).double()
        zs = zs_all[i, :n][ms]
        terms["ce"] = terms["ce"] + ce_rows(zs, target).sum()
        terms["ce_t2s"] = terms["ce_t2s"] + ce_rows(z_t2s, target).sum()
        terms["t2s_acc"] = terms["t2s_acc"] + acc.sum()
        terms["kd_stu"] = terms["kd_stu"] + (acc * ref_divergence(divergence, zs, z_t2s.detach(), tau, tau_t)).sum()
        z_s2t = (torch.softmax(A.T, -1) @ V_s[ms]) @ W_t.T
        z_t = t.logits[i, :m][mt].double()
        terms["kd_tea"] = terms["kd_tea"] + ref_divergence("forward_kl", z_s2t, z_t, tau).sum()
    if not teacher_space:
        terms["kd_tea"] = torch.zeros(())
    kd = terms["ce_t2s"] + terms["kd_stu"] + terms["kd_tea"]
    total = terms["ce_t2s"] if pretrain else (1 - kd_rate) * terms["ce"] + kd_rate * kd
    if warm:
        total = (1 - kd_rate) * terms["ce"] + kd_rate * (terms["ce_t2s"] + terms["kd_tea"])
    wrt = {"student_logits": zs_all, "student_hidden": hs_all, **P}
    grads = dict(zip(wrt, torch.autograd.grad(total, list(wrt.values()), allow_unused=True)))
    values = {k: torch.as_tensor(v).detach() for k, v in terms.items()} | {"kd": kd.detach(), "loss": total.detach()}
    return values, grads


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
def cross_inputs(B=3, n=9, m=12, V_s=5, V_t=9, d_s=6, d_t=8, seed=0):
    """Random leaves for two tokenizations of B sequences: different lengths, prompts and padding per side."""
    g = torch.Generator().manual_seed(seed)

    def side(T, V, prompts, lengths):
        ids, labels = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
        attention = torch.ones(B, T, dtype=torch.long)
        for i, (p, L) in enumerate(zip(prompts, lengths)):
            labels[i, :p], labels[i, L:], ids[i, L:], attention[i, L:] = -100, -100, V - 1, 0
        return ids, labels, attention

    ids, labels, att = side(n, V_s, [2, 3, 1], [n, n - 3, n - 1])
    t_ids, t_labels, t_att = side(m, V_t, [4, 2, 3], [m - 2, m, m - 4])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": att, "teacher_input_ids": t_ids,
             "teacher_labels": t_labels, "teacher_attention_mask": t_att}
    student, teacher = FakeLM(V_s, d_s, seed + 1), FakeLM(V_t, d_t, seed + 2)
    s = ModelOutputs(leaf(torch.randn(B, n, V_s, generator=g) * 2), leaf(torch.randn(B, n, d_s, generator=g)), student)
    t = ModelOutputs(torch.randn(B, m, V_t, generator=g) * 2, torch.randn(B, m, d_t, generator=g) * 3, teacher)
    return LossInputs(batch=batch, student=s, teacher=t)


def built(inputs, **kw) -> DSKDCMALoss:
    loss = DSKDCMALoss(**kw)
    loss.build(inputs.student.model, inputs.teacher.model)
    return loss


def model_inputs(student, teacher, records, max_prompt_length=24, max_length=48, precompute=None,
                 precompute_version="1") -> LossInputs:
    """Both models' real forward passes on a collated batch (built with a loss's ``precompute`` hook, if given);
    the student's logits and hidden states become fresh leaves."""
    from prefkd.data.dataset import DistillDataset, collate

    ds = DistillDataset(records, student.tokenizer, teacher.tokenizer, max_prompt_length=max_prompt_length,
                        max_length=max_length, precompute=precompute, precompute_version=precompute_version,
                        use_cache=False)
    batch = collate([ds[i] for i in range(len(ds))], student.tokenizer.pad_token_id, teacher.tokenizer.pad_token_id)
    with torch.no_grad():
        so = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True)
        to = teacher.model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                           output_hidden_states=True)
    return LossInputs(batch=batch, student=ModelOutputs(leaf(so.logits), leaf(so.hidden_states[-1]), student.model),
                      teacher=ModelOutputs(to.logits, to.hidden_states[-1], teacher.model))


def dolly_records(shared, k=3) -> list[dict]:
    import json

    lines = (shared / "data/instruct/dolly_dev.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:k]]


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
    # SPEC §2: the batch's sum = the sum over each sequence alone (unpadded), gradients too
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
    from tests.test_trainer import assert_same_weights, compose_cfg, weights

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
