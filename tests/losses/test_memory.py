"""Memory bound of every loss (issue 4): beyond the logits, a loss's forward + backward keeps at most ONE tensor of
the size of the B×T×V logits alive at any time (the gradient it hands back), plus chunk-sized work.

:class:`LargeTensorTracker` is a TorchDispatchMode that sees every tensor an aten op allocates (views and in-place
results excluded), keeps the ones of at least ``min_numel`` elements in a weak set, and records how many were alive at
once. With ``chunk_size`` rows per chunk far below B·T, chunk work stays under the threshold; a loss that materialised
a full B×T×V softmax, a second gradient buffer or an autograd graph over the logits would exceed the bound.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from prefkd.data.embedded import generate_records
from prefkd.models.tiny import build_tiny
from tests.losses.test_dskd import leaf
from tests.losses.test_dskd_cma import model_inputs


class LargeTensorTracker(TorchDispatchMode):
    """Counts tensors of ≥ ``min_numel`` elements allocated by aten ops while active; ``peak`` = most alive at once."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.peak, self.allocated = min_numel, 0, []
        self.alive: weakref.WeakSet = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if any(r.alias_info is not None for r in schema.returns):  # views and in-place ops allocate nothing
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.min_numel:
                self.alive.add(t)
                self.allocated.append(f"{func}{tuple(t.shape)}")
                self.peak = max(self.peak, len(self.alive))
        return out


def prepared(loss, same_tokenizer: bool, n_records=8):
    """The loss set up and built on the embedded tiny pair (cross tokenizers "a" → "b", or "b" → "b"); LossInputs
    from real forward passes (student logits and hidden states as leaves). Returns (loss, inputs)."""
    teacher = build_tiny("b" if same_tokenizer else "a", "llama", 32, num_layers=1, seed=1)
    student = build_tiny("b", "gpt2", 32, num_layers=1, seed=2)
    loss.setup(student.tokenizer, teacher.tokenizer)
    loss.build(student.model, teacher.model)
    inputs = model_inputs(student, teacher, generate_records(n_records, seed=3), 64, 128, loss.precompute,
                          loss.precompute_version)
    return loss, inputs


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
    assert tracker.peak <= 1, f"{name}: {tracker.peak} logits-sized tensors alive at once; allocated {tracker.allocated}"


def test_the_tracker_sees_an_unchunked_loss():
    s = leaf(torch.randn(4, 32, 50))
    with LargeTensorTracker(s.numel() // 4) as tracker:
        loss = -torch.log_softmax(s.float(), -1)[..., 0].sum()
        torch.autograd.grad(loss, s)
    assert tracker.peak >= 2
