"""Fused output heads for the preference losses (issue 17): chunked_row_terms on hidden rows against a naive
computation; dpo, cdpo, ipo, tisdpo and kd_tisdpo fused against unfused (values, metrics and gradients to 1e-5) at
the hidden states and the head, through real models with every kind of head, and across tokenizers; the reference in
the plan and its one log line; the weight and reference-log-prob tools; whole runs."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from prefkd.data.preference_dataset import PreferenceDataset, collate_pairs
from prefkd.losses.base import LossInputs, ModelOutputs, Needs
from prefkd.losses.chunked import HiddenRows, chunked_row_terms
from prefkd.losses.divergences import reverse_kl
from prefkd.losses.dpo import DPOLoss, KDTISDPOLoss, TISDPOKDAlignLoss, TISDPOLoss
from prefkd.models.heads import OutputHead
from prefkd.models.tiny import build_tiny
from prefkd.training.fused_head import FusedHeads, plan_fused_heads
from tests.helpers.pairs import leaf, tiny_pair
from tests.helpers.runs import assert_same_weights, compose_cfg, quick_run, weights
from tests.losses.test_dpo import PAIRS
from tests.losses.test_fused_head import (
    TOL,
    VARIANTS,
    ScaledHead,
    _sharpen,
    assert_fused_equals_unfused,
    leaf_inputs,
    make_batch,
    messages,
    variant,
    vocab_of,
)
from tests.test_preference_training import HH, LORA, LR


# ---------------------------------------------------------------------------------------------- batches and losses
def with_parents(batch: dict, seed: int = 0) -> dict:
    """A batch of 2B rows (:func:`make_batch`'s) as preference pairs: chosen rows first, then rejected; one parent
    per two response tokens, the same on the teacher side (it shares the rows); parent weights in [0.5, 1.5)."""
    labels = batch["labels"]
    mask = labels.ne(-100)
    index = torch.where(mask, (mask.long().cumsum(1) - 1) // 2, -1)
    weight = torch.rand(labels.shape[0], int(index.max()) + 1, generator=torch.Generator().manual_seed(seed)) + 0.5
    return {**batch, "parent_index": index, "teacher_parent_index": index, "parent_weight": weight,
            "num_sequences": labels.shape[0] // 2}


def preference_losses() -> dict:
    return {
        "dpo": lambda: DPOLoss(beta=0.5, chunk_size=7),
        "cdpo": lambda: DPOLoss(beta=0.5, label_smoothing=0.2, chunk_size=7),
        "ipo": lambda: DPOLoss(beta=0.3, loss_type="ipo", chunk_size=7),
        "tisdpo": lambda: TISDPOLoss(beta=0.5, kl_alpha=0.7, chunk_size=7),
        "tisdpo without kl": lambda: TISDPOLoss(beta=0.5, token_kl=False, chunk_size=7),
        "kd_tisdpo": lambda: KDTISDPOLoss(beta=0.5, chunk_size=7),
        "tisdpo_kdalign": lambda: TISDPOKDAlignLoss(beta=0.5, alpha=0.5, chunk_size=7),  # + DSKD-CMA's projectors
    }


class AsReference(nn.Module):
    """A reference loss under the teacher's name, for test_fused_head's helpers (which run a teacher): the
    teacher's outputs reach the loss as its reference."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.inner, self.needs = loss, Needs(teacher=True)

    def forward(self, inputs: LossInputs):
        return self.inner(replace(inputs, reference=inputs.teacher, teacher=None))

    def trainable_modules(self) -> list[nn.Module]:
        return self.inner.trainable_modules()


def with_other(loss: nn.Module) -> nn.Module:
    """The loss reading the other model as test_fused_head's helpers hand it (as the teacher)."""
    return loss if loss.needs.teacher else AsReference(loss)


# ---------------------------------------------------------------------------------------------- the chunked engine
HEADS = {  # name -> OutputHead settings of the policy's head (bias: a V-vector)
    "plain": {},
    "bias": dict(bias=True),
    "logit_scale": dict(logit_scale=0.5),
    "softcap": dict(softcap=1.5),
    "bias, logit_scale and softcap": dict(bias=True, logit_scale=2.0, softcap=2.5),
}


def two_terms(rows: torch.Tensor, other: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """n×2: the label's log-prob and KL(rows ‖ other)."""
    logp = torch.log_softmax(rows, -1)
    return torch.stack([logp.gather(1, y[:, None]).squeeze(1), reverse_kl(rows, other).to(rows.dtype)], -1)


def row_terms_inputs(kind: str, seed=0, B=3, T=6, H=5, V=11):
    """(policy HiddenRows with leaf tensors, the other side's HiddenRows, labels, mask, an incoming gradient)."""
    g = torch.Generator().manual_seed(seed)
    settings = dict(HEADS[kind])
    bias = leaf(torch.randn(V, generator=g) * 3) if settings.pop("bias", False) else None
    head = OutputHead(leaf(torch.randn(V, H, generator=g) * 2), bias, **settings)
    policy = HiddenRows(leaf(torch.randn(B, T, H, generator=g)), head)
    other = HiddenRows(torch.randn(B, T, H, generator=g), OutputHead(torch.randn(V, H, generator=g) * 2,
                                                                        logit_scale=0.7, softcap=3.0))
    y = torch.randint(V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return policy, other, y, mask, torch.randn(B, T, 2, generator=g)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("kind", list(HEADS))
def test_row_terms_of_hidden_rows_equal_the_naive_computation(kind, chunk_size):
    """The B×T×2 terms (0 off the mask) and, for a random incoming gradient, the gradients w.r.t. the hidden states,
    the head's weight and its bias that plain autograd over the full logits gives; the other side as HiddenRows."""
    policy, other, y, mask, g = row_terms_inputs(kind, seed=chunk_size)
    terms = chunked_row_terms(two_terms, 2, policy, mask, other, y, chunk_size=chunk_size)
    got = torch.autograd.grad((terms * g).sum(), policy.tensors())
    want_terms = torch.zeros(*mask.shape, 2)
    logits, other_logits = policy.head.project(policy.hidden), other.head.project(other.hidden)
    want_terms[mask] = two_terms(logits[mask], other_logits[mask], y[mask])
    want = torch.autograd.grad((want_terms * g).sum(), policy.tensors())
    torch.testing.assert_close(terms, want_terms.detach(), **TOL)
    assert len(got) == (3 if "bias" in HEADS[kind] else 2)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL, msg=name)


def test_row_terms_of_hidden_rows_with_a_frozen_head_and_without_gradient():
    """A LoRA student's head is frozen: only the hidden states get a gradient. Under no_grad: the same terms, no
    graph. A second backward is refused."""
    policy, other, y, mask, g = row_terms_inputs("bias", seed=3)
    frozen = HiddenRows(policy.hidden, policy.head.detach())
    terms = chunked_row_terms(two_terms, 2, frozen, mask, other, y, chunk_size=4)
    (got,) = torch.autograd.grad((terms * g).sum(), [frozen.hidden])
    want_terms = torch.zeros(*mask.shape, 2)
    want_terms[mask] = two_terms(frozen.head.project(frozen.hidden)[mask], other[mask.nonzero(as_tuple=True)],
                                 y[mask])
    (want,) = torch.autograd.grad((want_terms * g).sum(), [frozen.hidden])
    torch.testing.assert_close(got, want, **TOL)
    with torch.no_grad():
        quiet = chunked_row_terms(two_terms, 2, policy, mask, other, y, chunk_size=4)
    assert quiet.grad_fn is None
    torch.testing.assert_close(quiet, terms.detach(), rtol=0, atol=0)
    again = chunked_row_terms(two_terms, 2, policy, mask, other, y, chunk_size=4).sum()
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        again.backward()


# ---------------------------------------------------------------------------------------------- the losses
def leaf_grads(loss, batch, h, head, o_hidden, o_head, *, fused: bool, other_fused: bool):
    """(loss, metrics, [d/dh, d/dW, d/db]) with the policy as logits built from (h, head) or as HiddenRows, the
    reference (or teacher) as logits or as HiddenRows."""
    s = ModelOutputs(None, h, head=head) if fused else ModelOutputs(head.project(h))
    o = ModelOutputs(None, o_hidden, head=o_head) if other_fused else ModelOutputs(o_head.project(o_hidden))
    out = with_other(loss)(LossInputs(batch=batch, teacher=o, student=s))
    return out.loss.detach(), out.metrics, torch.autograd.grad(out.loss, HiddenRows(h, head).tensors())


@pytest.mark.parametrize("other_fused", [True, False])
@pytest.mark.parametrize("name", [n for n in preference_losses() if n != "tisdpo_kdalign"])  # that one needs models
def test_fused_equals_unfused_at_the_hidden_states_and_the_head(name, other_fused):
    """The same loss, metrics and gradients w.r.t. the policy's hidden states, head weight and bias; the reference
    (the teacher for kd_tisdpo; a head with logit_scale and softcap) as hidden states + head, or as logits."""
    batch, h, head, o_hidden, o_head = leaf_inputs(seed=6, B=4, T=10)
    batch, loss = with_parents(batch), preference_losses()[name]()
    assert loss.fused_head
    want_loss, want_metrics, want = leaf_grads(loss, batch, h, head, o_hidden, o_head, fused=False, other_fused=False)
    got_loss, got_metrics, got = leaf_grads(loss, batch, h, head, o_hidden, o_head, fused=True,
                                            other_fused=other_fused)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    assert got_metrics.keys() == want_metrics.keys()
    for k in want_metrics:
        torch.testing.assert_close(got_metrics[k], want_metrics[k], **TOL, msg=k)
    assert want[0].abs().max() > 1e-3  # a gradient worth comparing
    for label, g, w in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, **TOL, msg=label)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("loss_name", ["dpo", "ipo", "tisdpo", "kd_tisdpo"])
def test_fused_equals_unfused_for_every_kind_of_head(loss_name, name):
    """Through the real models: the student's parameter gradients (its head weight and bias included), the reference
    (or teacher) another model with the same kind of head, fused too."""
    student, other = variant(name, 1), variant(name, 2).requires_grad_(False)
    batch = with_parents(make_batch(vocab_of(student), B=4, seed=1))
    assert_fused_equals_unfused(with_other(preference_losses()[loss_name]()), student, other, batch)


@pytest.mark.parametrize("other_fused", [True, False])
@pytest.mark.parametrize("loss_name", ["tisdpo", "kd_tisdpo", "tisdpo_kdalign"])
def test_fused_equals_unfused_on_collated_pairs(loss_name, other_fused):
    """Real pairs through the embedded tiny pair: kd_tisdpo's parents across the two tokenizers, the teacher fused
    or as logits; tisdpo on the student's tokenizer alone, the reference (a second student) fused or as logits."""
    teacher, student, _ = tiny_pair()
    loss = preference_losses()[loss_name]()
    t_tok = teacher.tokenizer if loss.needs.teacher else None
    ds = PreferenceDataset(PAIRS, student.tokenizer, t_tok, max_length=64, max_prompt_length=32)
    batch = collate_pairs(list(ds), student.tokenizer.pad_token_id, t_tok and t_tok.pad_token_id)
    if t_tok is None:  # the reference runs on the student's rows (as the teacher of the helpers)
        batch.update(teacher_input_ids=batch["input_ids"], teacher_attention_mask=batch["attention_mask"])
    g = torch.Generator().manual_seed(4)
    batch["parent_weight"] = batch["parent_weight"] * (torch.rand(batch["parent_weight"].shape, generator=g) + 0.5)
    other = teacher.model if loss.needs.teacher else build_tiny("b", "gpt2", 32, 1, 2, seed=5, freeze=True).model
    loss.build(student.model, other)  # tisdpo_kdalign's projectors (the others build nothing)
    assert batch["labels"].ne(-100).sum() > 7 * 2  # several chunks
    assert_fused_equals_unfused(with_other(loss), student.model, other, batch, teacher_fused=other_fused)


def test_bf16_hidden_states_train():
    batch, h, head, o_hidden, o_head = leaf_inputs(seed=7, B=4)
    h16, head16 = leaf(h.bfloat16()), OutputHead(leaf(head.weight.bfloat16()), leaf(head.bias.bfloat16()))
    out = TISDPOLoss(chunk_size=4)(LossInputs(batch=with_parents(batch), student=ModelOutputs(None, h16, head=head16),
                                              reference=ModelOutputs(None, o_hidden, head=o_head)))
    grads = torch.autograd.grad(out.loss, [h16, head16.weight, head16.bias])
    assert out.loss.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all() and g.abs().max() > 0 for g in grads)


def test_model_outputs_rows():
    """TISDPOKDAlignLoss's chosen half: the rows of the logits, or of the hidden states with the head as it is."""
    logits, hidden = torch.randn(4, 3, 7), torch.randn(4, 3, 5)
    head = OutputHead(torch.randn(7, 5))
    full = ModelOutputs(logits, hidden, model=nn.Identity()).rows(slice(None, 2))
    assert torch.equal(full.logits, logits[:2]) and torch.equal(full.hidden, hidden[:2]) and full.head is None
    fused = ModelOutputs(None, hidden, head=head).rows(slice(None, 2))
    assert fused.logits is None and torch.equal(fused.hidden, hidden[:2]) and fused.head is head
    torch.testing.assert_close(fused.logit_source[torch.tensor([1]), torch.tensor([2])], head.project(hidden[1:2, 2]))


# ---------------------------------------------------------------------------------------------- the plan
class FullLogits(DPOLoss):
    """A preference loss that has not declared a fused head (reads ``ModelOutputs.logits``)."""

    fused_head = False


def test_the_plan_names_the_reference_in_its_one_log_line(caplog):
    """The reference is probed with the student's verdict (the initial policy: a copy of it, or its base with the
    adapter disabled) or as a model of its own (the teacher); a reference whose head is not recognised builds its
    logits and says so; a loss without a fused head plans nothing."""
    student, teacher = variant("gpt2 tied", 1), variant("llama untied", 2)
    odd = variant("llama untied", 3)
    odd.lm_head = ScaledHead(16, odd.lm_head.out_features, bias=False)
    with caplog.at_level(logging.INFO, logger="prefkd.training.fused_head"):
        assert plan_fused_heads(True, DPOLoss(), student, reference=student) == FusedHeads(True, False, True)
        assert plan_fused_heads(True, TISDPOLoss(reference="teacher"), student, reference=teacher) == FusedHeads(
            True, False, True)
        assert plan_fused_heads(True, KDTISDPOLoss(), student, teacher) == FusedHeads(True, True, False)
        assert plan_fused_heads(True, DPOLoss(reference="teacher"), student, reference=odd) == FusedHeads(True)
        assert plan_fused_heads(True, DPOLoss(), student, reference=student, sharded=True) == FusedHeads()
        assert plan_fused_heads(True, TISDPOKDAlignLoss(), student, teacher) == FusedHeads(True, True, False)
        assert plan_fused_heads(True, FullLogits(), student, reference=student) == FusedHeads()
    said = [r.getMessage() for r in messages(caplog)]
    assert len(said) == 7
    assert said[0] == ("trainer.fused_head: student: projected per chunk inside the loss; reference: projected per "
                       "chunk inside the loss")
    assert "teacher: projected per chunk" in said[2] and "reference" not in said[2]
    assert "reference: logits built" in said[3] and "ScaledHead" in said[3]
    assert said[4].count("sharded") == 2
    assert "FullLogits reads full logits" in said[6]


# ---------------------------------------------------------------------------------------------- the tools
def test_the_weight_and_reference_tools_give_the_same_log_probs_fused(tmp_path):
    """prefkd.weights (parent log-probs of π⁺ and π⁻) and prefkd.reference_logps (sequence log-probs): the model's
    head projecting per chunk gives the records the full logits give."""
    from prefkd.data.preference import PreferencePair
    from prefkd.reference_logps import compute_reference_logps
    from prefkd.weights.calculator import compute_weights

    pos, neg = (build_tiny("a", "llama", 16, 1, 2, seed=s) for s in (1, 2))
    for bundle in (pos, neg):
        _sharpen(bundle.model)
    pairs = [PreferencePair(p.prompt, p.chosen, p.rejected) for p in PAIRS]
    for fused in (True, False):
        compute_weights(pairs, pos, neg, pos.tokenizer, tmp_path / f"w{fused}.jsonl", per_token=True,
                        fused_head=fused, progress=False)
        compute_reference_logps(pairs, pos, tmp_path / f"r{fused}.jsonl", fused_head=fused, progress=False)
    for name in ("w", "r"):
        a, b = ([json.loads(line) for line in (tmp_path / f"{name}{f}.jsonl").read_text().splitlines()]
                for f in (True, False))
        assert len(a) == len(b) == len(pairs)
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for key in x:
                if key.endswith(("weight", "logps")):
                    torch.testing.assert_close(torch.tensor(x[key]), torch.tensor(y[key]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- whole runs
RUNS = {  # id -> overrides on model=tiny (two tokenizers): the reference a copy, the teacher, the LoRA base
    "dpo, a copy as reference": ("loss=dpo", "teacher=none", LR),
    "kd_tisdpo, the teacher": ("loss=kd_tisdpo", LR),
    "tisdpo, LoRA adapter disabled": ("loss=tisdpo", "teacher=none", *LORA),
}


def saved_weights(run_dir) -> dict[str, torch.Tensor]:
    """The last checkpoint's weights: the student's, or its LoRA adapter's."""
    last = run_dir / "checkpoints" / "last"
    lora = last / "adapter_model.safetensors"
    return load_file(str(lora)) if lora.exists() else weights(run_dir)


@pytest.mark.parametrize("run", list(RUNS))
def test_a_fused_preference_run_ends_on_the_unfused_weights(tmp_path, caplog, run, shared):  # HH pairs
    """6 steps of 4 pairs on model=tiny with trainer.fused_head=true, then false: the same losses and weights (to
    1e-4, see test_fused_head's runs: GPT-2's attention key bias), and the plan's one log line names the reference
    (the teacher for kd_tisdpo)."""
    common = ("model=tiny", *HH, *RUNS[run], "loss.chunk_size=16")
    with caplog.at_level(logging.INFO, logger="prefkd.training.fused_head"):
        fused = quick_run(compose_cfg(*common, "trainer.fused_head=true"), tmp_path / "fused")
    (record,) = messages(caplog)
    other = "teacher" if "kd_tisdpo" in run else "reference"
    assert record.getMessage() == (f"trainer.fused_head: student: projected per chunk inside the loss; {other}: "
                                   f"projected per chunk inside the loss")
    unfused = quick_run(compose_cfg(*common, "trainer.fused_head=false"), tmp_path / "unfused")
    assert fused["steps"] == unfused["steps"] == 6
    assert fused["last_train_loss"] == pytest.approx(unfused["last_train_loss"], rel=1e-5)
    assert fused["dev_loss_final"] == pytest.approx(unfused["dev_loss_final"], rel=1e-5)
    assert_same_weights(saved_weights(tmp_path / "fused"), saved_weights(tmp_path / "unfused"), atol=1e-4)
