"""The preference loss modules (docs/methods.md §10) on collated pairs: DPOLoss/IPO/cDPO against the formula on plain
autograd, TIS-DPO with weights 1 and no KL equals DPO, KD_tisdpo with one tokenizer and weights 1 equals DPO with
the teacher as reference, KD_tisdpo across the real Qwen1.5 → GPT-2 pair against a per-parent reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prefkd.data.preference import PreferencePair
from prefkd.data.preference_dataset import PreferenceDataset, collate_pairs
from prefkd.losses.base import LossInputs, ModelOutputs, Needs
from prefkd.losses.dpo import DPOLoss, KDTISDPOLoss, TISDPOKDAlignLoss, TISDPOLoss
from prefkd.models.tiny import build_tiny

PAIRS = [PreferencePair("Q: add 2 and 3.\nA:", " 5, because two plus three is five.", " 6"),
         PreferencePair("Q: reverse abc.\nA:", " cba", " abc backwards is bca, I think")]


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def batch_and_logits(s_tok, t_tok=None, seed=0):
    ds = PreferenceDataset(PAIRS, s_tok, t_tok, max_length=64, max_prompt_length=32)
    batch = collate_pairs(list(ds), s_tok.pad_token_id, None if t_tok is None else t_tok.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*batch["input_ids"].shape, len(s_tok), generator=g) * 3
    r = torch.randn(*batch["input_ids"].shape, len(s_tok), generator=g) * 3
    t = None if t_tok is None else torch.randn(*batch["teacher_input_ids"].shape, len(t_tok), generator=g) * 3
    return batch, s, r, t


def seq_logps(logits, labels):
    """Plain autograd Σ_t log softmax(z_t)[y_t] over labelled positions, per row (float64)."""
    lp = torch.log_softmax(logits.double(), -1)
    mask = labels.ne(-100)
    return (lp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * mask).sum(-1)


@pytest.mark.parametrize("kw", [dict(), dict(beta=0.5, label_smoothing=0.2), dict(loss_type="ipo", beta=0.3)])
def test_dpo_module_equals_the_formula(kw):
    from prefkd.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer("a")
    batch, s, r, _ = batch_and_logits(tok)
    loss = DPOLoss(**kw)
    assert loss.needs == Needs(reference="initial", normalize_by="sequences", pairs=True)
    x = leaf(s)
    out = loss(LossInputs(batch=batch, student=ModelOutputs(x), reference=ModelOutputs(r)))
    out.loss.backward()
    y = leaf(s)
    pi, ref = seq_logps(y, batch["labels"]), seq_logps(r, batch["labels"])
    h = (pi[:2] - ref[:2]) - (pi[2:] - ref[2:])
    beta, eps = kw.get("beta", 0.1), kw.get("label_smoothing", 0.0)
    if kw.get("loss_type") == "ipo":
        want = ((h - 1 / (2 * beta)) ** 2).sum()
    else:
        want = (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).sum()
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)
    r_w, r_l = beta * (pi[:2] - ref[:2]), beta * (pi[2:] - ref[2:])
    torch.testing.assert_close(out.metrics["rewards/margins"].double(), (r_w - r_l).sum().detach().double(), rtol=1e-5,
                               atol=1e-6)
    assert out.metrics["rewards/accuracies"] == (r_w > r_l).sum()


def test_tisdpo_with_unit_weights_and_no_kl_equals_dpo():
    from prefkd.models.tiny import tiny_tokenizer

    batch, s, r, _ = batch_and_logits(tiny_tokenizer("b"), seed=1)
    a = DPOLoss(beta=0.2)(LossInputs(batch=batch, student=ModelOutputs(s), reference=ModelOutputs(r))).loss
    b = TISDPOLoss(beta=0.2, token_kl=False)(LossInputs(batch=batch, student=ModelOutputs(s),
                                                        reference=ModelOutputs(r))).loss
    torch.testing.assert_close(a, b)
    batch["parent_weight"] = batch["parent_weight"] * 2.0  # weights double every log-ratio: h doubles
    c = TISDPOLoss(beta=0.1, token_kl=False)(LossInputs(batch=batch, student=ModelOutputs(s),
                                                        reference=ModelOutputs(r))).loss
    torch.testing.assert_close(a, c)
    with_kl = TISDPOLoss(beta=0.2)(LossInputs(batch=batch, student=ModelOutputs(s), reference=ModelOutputs(r))).loss
    assert not torch.isclose(with_kl, a)


def test_kd_tisdpo_with_one_tokenizer_and_unit_weights_equals_dpo_with_the_teacher_as_reference():
    from prefkd.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer("b")
    batch, s, _, _ = batch_and_logits(tok, tok, seed=2)
    t = torch.randn(*batch["teacher_input_ids"].shape, len(tok), generator=torch.Generator().manual_seed(5)) * 3
    assert torch.equal(batch["parent_index"].ge(0), batch["labels"].ne(-100))  # one parent per response token
    x, y = leaf(s), leaf(s)
    kd = KDTISDPOLoss(beta=0.5)(LossInputs(batch=batch, student=ModelOutputs(x), teacher=ModelOutputs(t)))
    dpo = DPOLoss(beta=0.5, reference="teacher")(LossInputs(batch=batch, student=ModelOutputs(y),
                                                            reference=ModelOutputs(t)))
    kd.loss.backward()
    dpo.loss.backward()
    torch.testing.assert_close(kd.loss, dpo.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)
    for k in dpo.metrics:
        torch.testing.assert_close(kd.metrics[k], dpo.metrics[k], rtol=1e-5, atol=1e-5)


def test_kd_tisdpo_on_the_real_pair_equals_a_per_parent_reference(real_tokenizer):
    s_tok, t_tok = real_tokenizer("gpt2"), real_tokenizer("qwen1.5")
    batch, s, _, t = batch_and_logits(s_tok, t_tok, seed=3)
    g = torch.Generator().manual_seed(9)
    batch["parent_weight"] = torch.where(batch["parent_weight"] > 0, torch.rand(batch["parent_weight"].shape,
                                                                                 generator=g) + 0.5, 0.0)
    x = leaf(s)
    out = KDTISDPOLoss(beta=0.5)(LossInputs(batch=batch, student=ModelOutputs(x), teacher=ModelOutputs(t)))
    out.loss.backward()
    y = leaf(s)
    s_lp = torch.log_softmax(y.double(), -1).gather(-1, batch["labels"].clamp_min(0)[..., None]).squeeze(-1)
    t_lp = torch.log_softmax(t.double(), -1).gather(-1, batch["teacher_labels"].clamp_min(0)[..., None]).squeeze(-1)
    margins = []
    for row in range(4):
        m = 0.0
        for p in range(int(batch["parent_index"][row].max()) + 1):  # M = Σ_p w_p (ℓ^S_p − ℓ^T_p), written out
            ls = s_lp[row][batch["parent_index"][row] == p].sum()
            lt = t_lp[row][batch["teacher_parent_index"][row] == p].sum()
            m = m + batch["parent_weight"][row, p].double() * (ls - lt)
        margins.append(m)
    want = -F.logsigmoid(0.5 * (torch.stack(margins[:2]) - torch.stack(margins[2:]))).sum()
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)


def test_tisdpo_kdalign_adds_alpha_times_per_token_dskd_cma_on_the_chosen_rows():
    from prefkd.losses.dskd import DSKDCMALoss

    teacher, student = build_tiny("a", "llama", 32, num_layers=1, seed=1), build_tiny("b", "gpt2", 32, num_layers=1,
                                                                                     seed=2)
    ds = PreferenceDataset(PAIRS, student.tokenizer, teacher.tokenizer, max_length=64, max_prompt_length=32)
    batch = collate_pairs(list(ds), student.tokenizer.pad_token_id, teacher.tokenizer.pad_token_id)
    with torch.no_grad():
        so = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True)
        to = teacher.model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                           output_hidden_states=True)
    inputs = LossInputs(batch=batch, student=ModelOutputs(so.logits, so.hidden_states[-1], student.model),
                        teacher=ModelOutputs(to.logits, to.hidden_states[-1], teacher.model))
    torch.manual_seed(0)
    loss = TISDPOKDAlignLoss(alpha=0.7)
    loss.build(student.model, teacher.model)
    total = loss(inputs).loss
    kd = KDTISDPOLoss()(inputs).loss
    cma = DSKDCMALoss()
    cma.build(student.model, teacher.model)
    cma.load_state_dict(loss.cma.state_dict())
    keys = ("input_ids", "attention_mask", "labels", "teacher_input_ids", "teacher_attention_mask", "teacher_labels")
    chosen = LossInputs(batch={k: batch[k][:2] for k in keys},
                        student=ModelOutputs(so.logits[:2], so.hidden_states[-1][:2], student.model),
                        teacher=ModelOutputs(to.logits[:2], to.hidden_states[-1][:2], teacher.model))
    per_token = cma(chosen).loss / batch["labels"][:2].ne(-100).sum()
    torch.testing.assert_close(total, kd + 0.7 * 2 * per_token, rtol=1e-5, atol=1e-6)
    assert {id(p) for p in loss.cma.parameters()} <= {id(p) for m in loss.trainable_modules() for p in m.parameters()}


def test_errors():
    with pytest.raises(ValueError, match="reference"):
        DPOLoss(reference="frozen")
    with pytest.raises(ValueError, match="loss_type"):
        DPOLoss(loss_type="kto")
    with pytest.raises(ValueError, match="2B rows"):
        DPOLoss()(LossInputs(batch={"labels": torch.zeros(3, 4, dtype=torch.long)},
                             student=ModelOutputs(torch.zeros(3, 4, 5)), reference=ModelOutputs(torch.zeros(3, 4, 5))))
