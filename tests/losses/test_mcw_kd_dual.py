"""MCWKDDualLoss (docs/methods.md §8, semi-dual variant): the potentials are maximised by their own inner steps only,
never by the trainer's optimizer; the OT term is the semi-dual objective at the fitted potential; checkpoints keep the
potentials (weights and inner Adam state) and β."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.memory import prepared
from tests.helpers.runs import QUICK_RUN, quick_run


def dual(**kw):
    """The loss on the tiny cross-tokenizer pair; its projectors and potentials start from seed 0 whatever ran
    before in this process (loss.build draws from the global RNG)."""
    from prefkd.losses.mcw_kd import MCWKDDualLoss

    torch.manual_seed(0)
    return prepared(MCWKDDualLoss(top_k=32, chunk_size=16, **kw), same_tokenizer=False, n_records=4)


def test_potentials_are_not_trained_by_the_outer_optimizer():
    loss, inputs = dual()
    assert set(loss.transport.potentials) == {"logits", "hidden"}
    trainable = {id(p) for m in loss.trainable_modules() for p in m.parameters()}
    assert not trainable & {id(p) for p in loss.transport.potentials.parameters()}
    assert {id(loss.ot_logits.weights.beta), id(loss.ot_projectors["hidden"].weight)} <= trainable
    out = loss(inputs)
    out.loss.backward()
    assert inputs.student.logits.grad.abs().sum() > 0 and inputs.student.hidden.grad.abs().sum() > 0
    assert loss.ot_hidden.weights.beta.grad is not None
    assert all(p.grad is None for p in loss.transport.potentials.parameters())


def test_training_forward_fits_the_potential_and_eval_does_not():
    loss, inputs = dual(inner_steps=3)
    before = {k: v.clone() for k, v in loss.transport.potentials.state_dict().items()}
    loss.eval()
    with torch.no_grad():
        a = loss(inputs).metrics["ot_hidden"]
    assert all(torch.equal(before[k], v) for k, v in loss.transport.potentials.state_dict().items())
    loss.train()
    loss(inputs)
    after = loss.transport.potentials.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in after.items() if k.endswith("weight"))
    loss.eval()
    with torch.no_grad():
        b = loss(inputs).metrics["ot_hidden"]
    assert b > a  # ascent on the semi-dual objective raises the OT estimate on the same batch


def test_ot_term_is_the_semidual_objective_at_the_current_potential():
    from prefkd.ot import pair_mask, scale_cost, semidual_objective

    loss, inputs = dual(lambda_logits=0.0, lambda_hidden=1.0)
    loss.eval()
    captured = {}
    original = loss.hidden_costs

    def spy(batch, t_pts, s_pts, x_t, x_s):  # the raw hidden-branch costs and clouds the loss transports
        points, costs = original(batch, t_pts, s_pts, x_t, x_s)
        captured.update(points=points, costs=costs, valid_t=t_pts.valid, valid_s=s_pts.valid)
        return points, costs

    loss.hidden_costs = spy
    with torch.no_grad():
        out = loss(inputs)
    pot = loss.transport.potentials["hidden"]
    pairs = pair_mask(captured["valid_t"], captured["valid_s"])
    scaled = [scale_cost(c, pairs, "mean") for c in captured["costs"]]
    phi = pot.potential(torch.where(captured["valid_t"][..., None], captured["points"], 0.0))
    value = semidual_objective(phi, scaled, loss.ot_hidden.weights(), loss.transport.eps, captured["valid_t"],
                               captured["valid_s"])
    n_b = inputs.batch["labels"].ne(-100).sum(1).float()
    torch.testing.assert_close(out.metrics["ot_hidden"], (n_b * value).sum(), rtol=1e-5, atol=1e-5)


def test_adaptive_weights_are_refused():
    from prefkd.losses.mcw_kd import MCWKDDualLoss

    with pytest.raises(ValueError, match="adaptive"):
        MCWKDDualLoss(alpha_mode="adaptive")


def test_resume_keeps_potentials_and_beta(tmp_path):
    from tests.helpers.runs import compose_cfg

    common = ("model=tiny", "loss=mcw_kd_dual", "loss.top_k=32", *QUICK_RUN, "trainer.eval_every=4")
    straight = quick_run(compose_cfg(*common), tmp_path / "straight")
    assert straight["steps"] == 8 and straight["nonfinite_steps"] == 0
    assert not quick_run(compose_cfg(*common, "trainer.stop_at_step=4"), tmp_path / "resumed")["finished"]
    resumed = quick_run(compose_cfg(*common), tmp_path / "resumed")
    assert resumed["last_train_loss"] == pytest.approx(straight["last_train_loss"], rel=1e-5)
    a, b = (load_file(str(tmp_path / d / "checkpoints/last/projectors.safetensors")) for d in ("straight", "resumed"))
    assert {"ot_logits.weights.beta", "transport.potentials.hidden._extra_state"} <= a.keys()
    assert any(k.startswith("transport.potentials.logits.potential.") for k in a)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_state_dict_of_the_old_layout_loads():
    """Checkpoints written before MCW-KD was composed of terms name DSKD-CMA's projectors ``projectors.*``, the cost
    weights ``cost_weights.<branch>.*`` and the potentials ``potentials.*``: they load into today's layout unchanged."""
    loss, inputs = dual()
    loss(inputs)  # one inner fit: the potentials' Adam state is not empty
    renames = {"dual_space.projectors.": "projectors.", "ot_logits.weights.": "cost_weights.logits.",
               "ot_hidden.weights.": "cost_weights.hidden.", "transport.potentials.": "potentials."}
    new = loss.state_dict()
    old = {}
    for key, value in new.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        old[renames[prefix] + key[len(prefix):] if prefix else key] = value
    assert old.keys() != new.keys() and any(k.startswith("cost_weights.logits.") for k in old)
    fresh, _ = dual()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # every weight differs before the load
    fresh.load_state_dict(old)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, new[key], rtol=0, atol=0, msg=key)
