"""Memory bound of every loss (issue 4): beyond the logits, a loss's forward + backward keeps at most ONE tensor of
the size of the B×T×V logits alive at any time (the gradient it hands back), plus chunk-sized work.

:class:`LargeTensorTracker` is a TorchDispatchMode that sees every tensor an aten op allocates (views and in-place
results excluded), keeps the ones of at least ``min_numel`` elements in a weak set, and records how many were alive at
once. With ``chunk_size`` rows per chunk far below B·T, chunk work stays under the threshold; a loss that materialised
a full B×T×V softmax, a second gradient buffer or an autograd graph over the logits would exceed the bound.

Fused output heads (issue 17): from the hidden states to the gradients, with the logits now counted, a loss that
projects per chunk keeps at most 0.5 B·T·V fp32 of large tensors alive (the head weight's V×H gradient excluded).
"""

from __future__ import annotations

import pytest
import torch

from prefkd.losses.base import LossInputs
from prefkd.models.heads import output_head
from prefkd.training.fused_head import outputs_from_hidden
from tests.helpers.memory import LargeTensorTracker, prepared
from tests.helpers.pairs import leaf


def losses():
    from prefkd.losses.dskd import DSKDCMALoss, DSKDLoss
    from prefkd.losses.kd import KDLoss
    from prefkd.losses.mcw_kd import MCWKDDualLoss, MCWKDLoss
    from prefkd.losses.mined import MinEDLoss
    from prefkd.losses.multilevel_ot import MultiLevelOTLoss
    from prefkd.losses.sft import SFTLoss
    from prefkd.losses.uld import ULDLoss

    return {  # name: (constructor, same tokenizer)
        "sft": (lambda: SFTLoss(chunk_size=4), False),
        "kd same vocab": (lambda: KDLoss(divergence="js", chunk_size=4), True),
        "kd cross (MinED)": (lambda: KDLoss(chunk_size=4), False),
        "uld full": (lambda: ULDLoss(chunk_size=4), False),
        "uld top_k": (lambda: ULDLoss(chunk_size=4, top_k=16), False),
        "minedit": (lambda: MinEDLoss(chunk_size=4), False),
        "dskd": (lambda: DSKDLoss(chunk_size=4), True),
        "dskd_cma": (lambda: DSKDCMALoss(chunk_size=4), False),
        "multilevel_ot": (lambda: MultiLevelOTLoss(chunk_size=4), False),
        "mcw_kd": (lambda: MCWKDLoss(chunk_size=4, top_k=50, alpha_mode="learned"), False),
        "mcw_kd_dual": (lambda: MCWKDDualLoss(chunk_size=4, top_k=50), False),
    }


@pytest.mark.parametrize("name", list(losses()))
def test_at_most_one_logits_sized_tensor_alive(name):
    make, same = losses()[name]
    loss, inputs = prepared(make(), same)
    s_logits, t_logits = inputs.student.logits, inputs.teacher.logits
    B, T, V = s_logits.shape
    assert B * T >= 32 * 4  # chunks of 4 rows are far below the threshold
    threshold = min(s_logits.numel(), t_logits.numel()) // 4
    wrt = [s_logits, inputs.student.hidden] + [p for m in loss.trainable_modules() for p in m.parameters()]
    with LargeTensorTracker(threshold) as tracker:
        out = loss(inputs)
        grads = torch.autograd.grad(out.loss, wrt, allow_unused=True)
    assert grads[0] is not None and torch.isfinite(grads[0]).all()
    assert tracker.peak <= 1, (f"{name}: {tracker.peak} logits-sized tensors alive at once; "
                               f"allocated {tracker.allocated}")


FUSED = ["sft", "kd same vocab", "kd cross (MinED)", "minedit", "uld full", "uld top_k", "dskd", "dskd_cma",
         "multilevel_ot", "mcw_kd", "mcw_kd_dual"]
# Cross-model attention (DSKD-CMA, and MCW-KD on top of it) keeps about 20 tensors of B×T×d or B×n×m of its own, none
# V wide: at the tiny pair's proportions (H/V = 1/24, m/V = 0.11) they alone are ~1 B·T·V, in real models (GPT-2:
# H/V = 0.015, T/V = 0.01) a fraction of that. These losses are measured with vocabularies 8× the tokenizers' (padding
# rows, as Qwen's head has), and their fused peak must not grow with V.
HEAD_ROWS = {"dskd_cma": 8, "mcw_kd": 8, "mcw_kd_dual": 8}
CHUNK = 4  # rows per chunk of every loss of :func:`losses`


def fused_peak(name: str, head_rows: int, fused: bool, per_row: int = 64) -> tuple[int, int, int]:
    """(most bytes of large tensors alive at once from the hidden states to the gradients, the bytes of B×T×V fp32,
    V) for a loss of :func:`losses` on the tiny pair grown to ``head_rows`` × its vocabularies. Large: at least
    B·T·V₀ / ``per_row`` elements (V₀ the tokenizers' vocabulary, whatever ``head_rows``), which counts the B×T×H
    gradient (H = 32 = V₀ / 24) and, at V₀, not the chunk work. The head weight's V×H gradient is not counted."""
    make, same = losses()[name]
    loss, inputs = prepared(make(), same, head_rows=head_rows)
    student, teacher = inputs.student, inputs.teacher
    B, T, V = student.logits.shape
    weight = output_head(student.model).weight
    threshold = B * T * (V // head_rows) // per_row
    assert CHUNK * V // head_rows < threshold < B * T * student.hidden.shape[-1]
    with LargeTensorTracker(threshold, skip=(tuple(weight.shape),)) as tracker:
        s = outputs_from_hidden(student.model, student.hidden, fused=fused)
        with torch.no_grad():
            t = outputs_from_hidden(teacher.model, teacher.hidden, fused=fused) if loss.needs.teacher else None
        out = loss(LossInputs(batch=inputs.batch, student=s, teacher=t))
        grads = torch.autograd.grad(out.loss, [student.hidden, weight])
    assert all(torch.isfinite(g).all() for g in grads)
    return tracker.peak_bytes, B * T * V * 4, V


@pytest.mark.parametrize("name", FUSED)
def test_fused_losses_stay_under_half_a_logits_tensor_from_the_hidden_states(name):
    """The region starts at the hidden states: unfused, the logits head(h) (the teacher's too) are built in it and
    counted with their gradient; fused, only chunk work, the B×T×H gradient and the head weight's (not counted). The
    losses' own work beyond the head (DSKD's projected hidden states, the OT clouds and plans) is counted too. For the
    losses of HEAD_ROWS, growing V 8× adds to the fused peak at most chunk work (8 tensors of CHUNK rows × V, fp32)."""
    rows = HEAD_ROWS.get(name, 1)
    unfused, logits_bytes, _ = fused_peak(name, rows, fused=False)
    assert unfused >= 2 * logits_bytes  # the logits and their gradient: the tracker sees them
    peak, logits_bytes, vocab = fused_peak(name, rows, fused=True)
    assert peak <= 0.5 * logits_bytes
    if rows != 1:
        at_v0 = fused_peak(name, 1, fused=True)[0]
        assert peak - at_v0 <= 8 * CHUNK * vocab * 4, (peak, at_v0)


@pytest.mark.parametrize("name", ["dpo", "tisdpo", "kd_tisdpo"])
def test_fused_preference_losses_stay_under_half_a_logits_tensor_from_the_hidden_states(name):
    """The same region for the preference losses on 2B = 8 rows: from the policy's hidden states (a leaf) and the
    reference's (the teacher's for kd_tisdpo, no grad) to the gradients; unfused, both models' logits are built in
    it. Chunks of 7 rows stay below the threshold, the B×T×H gradient is counted."""
    from prefkd.models.heads import forward_hidden
    from prefkd.models.tiny import build_tiny
    from tests.losses.test_fused_head import make_batch
    from tests.losses.test_fused_head_preference import preference_losses, with_parents

    loss = preference_losses()[name]()
    student = build_tiny("b", "gpt2", 32, num_layers=1, seed=2).model
    other = build_tiny("b", "llama", 32, num_layers=1, seed=1, freeze=True).model
    weight = output_head(student).weight
    B, T, V = 8, 64, weight.shape[0]
    batch = with_parents(make_batch(V, B, T, seed=3))
    with torch.no_grad():
        h = leaf(forward_hidden(student, batch["input_ids"], batch["attention_mask"]))
        o = forward_hidden(other, batch["teacher_input_ids"], batch["teacher_attention_mask"])
    threshold = B * T * V // 64
    assert loss.chunk_size * V < threshold < h.numel()

    def peak(fused: bool) -> float:
        with LargeTensorTracker(threshold, skip=(tuple(weight.shape),)) as tracker:
            s = outputs_from_hidden(student, h, fused=fused)
            with torch.no_grad():
                r = outputs_from_hidden(other, o, fused=fused)
            out = loss(LossInputs(batch=batch, student=s, **{"teacher" if loss.needs.teacher else "reference": r}))
            grads = torch.autograd.grad(out.loss, [h, weight])
        assert all(torch.isfinite(g).all() for g in grads)
        return tracker.peak_bytes / (B * T * V * 4)

    assert peak(fused=False) >= 2
    assert peak(fused=True) <= 0.5


def test_the_tracker_sees_an_unchunked_loss():
    s = leaf(torch.randn(4, 32, 50))
    with LargeTensorTracker(s.numel() // 4) as tracker:
        loss = -torch.log_softmax(s.float(), -1)[..., 0].sum()
        torch.autograd.grad(loss, s)
    assert tracker.peak >= 2
