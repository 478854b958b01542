"""Memory bound of every loss (issue 4): beyond the logits, a loss's forward + backward keeps at most ONE tensor of
the size of the B×T×V logits alive at any time (the gradient it hands back), plus chunk-sized work.

:class:`LargeTensorTracker` is a TorchDispatchMode that sees every tensor an aten op allocates (views and in-place
results excluded), keeps the ones of at least ``min_numel`` elements in a weak set, and records how many were alive at
once. With ``chunk_size`` rows per chunk far below B·T, chunk work stays under the threshold; a loss that materialised
a full B×T×V softmax, a second gradient buffer or an autograd graph over the logits would exceed the bound.
"""

from __future__ import annotations

import pytest
import torch

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


def test_the_tracker_sees_an_unchunked_loss():
    s = leaf(torch.randn(4, 32, 50))
    with LargeTensorTracker(s.numel() // 4) as tracker:
        loss = -torch.log_softmax(s.float(), -1)[..., 0].sum()
        torch.autograd.grad(loss, s)
    assert tracker.peak >= 2
