"""MinEDLoss (docs/methods.md §6) against a naive float64 reference written from the SPEC, on synthetic logits, the
embedded tiny pair and the real tokenizer pairs (Qwen1.5 → GPT-2, Mistral → TinyLLaMA) with tiny shrunk models.

The real pairs use the published vocabulary maps of ``shared/data/vocab_alignment`` (complete maps, loaded in
well under a second, with many teacher ids sharing a student id), through ``MinEDLoss(vocab_map=FILE)``.
The pairs and their batches (``real_pair``, ``pair_batch``) come from tests/helpers/pairs.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from prefkd.align.vocab_map import invert_map
from prefkd.losses.base import LossInputs, ModelOutputs, Needs
from prefkd.losses.mined import MinEDLoss
from tests.helpers.pairs import inputs_of, pair_batch, real_pair, tiny_pair
from tests.helpers.references import RowLeaves
from tests.helpers.shared import REAL_PAIRS, shared_dir

PUBLISHED = {("qwen1.5", "gpt2"): "qwen_to_gpt2", ("mistral", "tinyllama"): "mistral_to_tinyllama"}
FIELD = "mined_teacher_index"


# ---------------------------------------------------------------------------------------------- reference
def reference(batch, s_logits, t_logits, t2s: dict, kd_rate=0.5, tau=2.0, top_k=None, merge="lowest"):
    """docs/methods.md §6 written out: per example and response position, in float64. Returns (total, ce, kd, aligned,
    grad).

    Invert t2s keeping the lowest teacher id per student id; an aligned position's target is the teacher's logits
    at its index, gathered at the mapped teacher ids and scattered into the student vocabulary (−inf elsewhere);
    an unaligned position's target is one-hot on the gold token; KD = Σ forward KL at temperature τ.
    """
    x = RowLeaves(s_logits)
    t = t_logits.detach().double()
    (B, n, V_s), V_t = x.shape, t.shape[-1]
    s2t = {}
    for tid in sorted(t2s):
        s2t.setdefault(t2s[tid], tid)
    pairs = [(u, v) for u, v in s2t.items() if u < V_s and v < V_t]
    keys, vals = torch.tensor([u for u, _ in pairs]), torch.tensor([v for _, v in pairs])
    ce = kd = torch.zeros((), dtype=torch.float64)
    aligned = 0
    for b in range(B):
        for j in range(n):
            y = int(batch["labels"][b, j])
            if y == -100:
                continue
            ce = ce - torch.log_softmax(x[b, j], -1)[y]
            target = None
            i = int(batch[FIELD][b, j])
            if i >= 0:
                z = t[b, i].clone()
                if top_k is not None:
                    keep = torch.argsort(z, descending=True)[:top_k]
                    z = torch.full_like(z, -math.inf).index_put((keep,), z[keep])
                target = torch.full((V_s,), -math.inf, dtype=torch.float64)
                if merge == "lowest":
                    target[keys] = z[vals]
                else:  # the largest logit of every teacher id mapped to the student id
                    for v in range(V_t):
                        u = t2s.get(v, V_s)
                        if u < V_s and z[v] > target[u]:
                            target[u] = z[v]
                if not torch.isfinite(target).any():
                    target = None
            if target is None:
                target = torch.full((V_s,), -math.inf, dtype=torch.float64)
                target[y] = 0.0
            else:
                aligned += 1
            p_t = torch.softmax(target / tau, -1)
            log_s = torch.log_softmax(x[b, j] / tau, -1)
            sup = p_t > 0
            kd = kd + (p_t[sup] * (torch.log(p_t[sup]) - log_s[sup])).sum()
    total = (1 - kd_rate) * ce + kd_rate * kd
    return total.detach(), ce.detach(), kd.detach(), aligned, x.grad(total)


def check(out, inputs, ref, rtol=1e-5):
    total, ce, kd, aligned, grad = ref
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), total, rtol=rtol, atol=1e-4)
    torch.testing.assert_close(out.metrics["ce"].double(), ce, rtol=rtol, atol=1e-4)
    torch.testing.assert_close(out.metrics["kd"].double(), kd, rtol=rtol, atol=1e-4)
    assert int(out.metrics["aligned"]) == aligned
    torch.testing.assert_close(inputs.student.logits.grad.double(), grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- synthetic
# Teacher tokenizer ids 0..14 (the model has 13 rows: ids 13, 14 are beyond it), student ids 0..12 (the model has
# 12 rows: id 12 is beyond it). Several teacher ids share student ids 1 and 3 (the lowest is not the largest logit
# in general); student ids 5 and 11 have no teacher id.
T2S = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 1, 6: 6, 7: 7, 8: 8, 9: 9, 10: 10, 11: 3, 12: 12, 13: 3, 14: 6}


def synthetic(seed=0, B=3, n=8, m=10, V_s=12, V_t=13):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V_s, (B, n), generator=g)
    labels[:, :2] = -100
    labels[2, 6:] = -100
    index = torch.randint(0, m, (B, n), generator=g)
    index[torch.rand(B, n, generator=g) < 0.3] = -100
    index[labels == -100] = -100
    batch = {"labels": labels, FIELD: index}
    return batch, torch.randn(B, n, V_s, generator=g) * 3, torch.randn(B, m, V_t, generator=g) * 3


def fake_aligner(t2s):
    return SimpleNamespace(t2s=dict(t2s), s2t=invert_map(t2s), version="synthetic")


def make_loss(t2s=T2S, **kw) -> MinEDLoss:
    loss = MinEDLoss(chunk_size=5, **kw)
    loss.use_aligner(fake_aligner(t2s))
    return loss


@pytest.mark.parametrize("kw", [{}, {"kd_rate": 0.2, "temperature": 1.0}, {"merge": "max"}, {"top_k": 3},
                                {"top_k": 2, "merge": "max", "temperature": 0.5}])
def test_synthetic_equals_reference(kw):
    batch, s, t = synthetic(seed=1)
    inputs = inputs_of(batch, s, t)
    out = make_loss(**kw)(inputs)
    ref = reference(batch, s, t, T2S, kw.get("kd_rate", 0.5), kw.get("temperature", 2.0), kw.get("top_k"),
                    kw.get("merge", "lowest"))
    check(out, inputs, ref)


def test_gather_equals_scatter_amax_for_an_injective_map_and_differs_with_collisions():
    batch, s, t = synthetic(seed=2)
    injective = {k: v for k, v in T2S.items() if k not in (5, 11, 13, 14)}
    low, high = (make_loss(injective, merge=m)(inputs_of(batch, s, t)).loss for m in ("lowest", "max"))
    torch.testing.assert_close(low, high)
    low, high = (make_loss(T2S, merge=m)(inputs_of(batch, s, t)).loss for m in ("lowest", "max"))
    assert not torch.allclose(low, high)


def test_unaligned_positions_get_a_one_hot_target():
    """No aligned position: KD = Σ forward KL(one-hot ‖ p_S) = Σ −log softmax(z^s/τ)[y]."""
    batch, s, t = synthetic(seed=3)
    batch[FIELD] = torch.full_like(batch[FIELD], -100)
    out = make_loss(kd_rate=1.0, temperature=2.0)(inputs_of(batch, s, t))
    mask = batch["labels"] != -100
    want = -torch.log_softmax(s.double()[mask] / 2.0, -1).gather(-1, batch["labels"][mask][:, None]).sum()
    torch.testing.assert_close(out.loss.double(), want)
    torch.testing.assert_close(out.metrics["kd"].double(), want)
    assert int(out.metrics["aligned"]) == 0


def test_top_k_with_no_mapped_teacher_logit_falls_back_to_one_hot():
    batch, s, t = synthetic(seed=4)
    t[..., 5] = 50.0  # teacher id 5 (→ student 1, but not the lowest teacher id of student 1) tops every row
    inputs = inputs_of(batch, s, t)
    out = make_loss(top_k=1)(inputs)
    assert int(out.metrics["aligned"]) == 0
    check(out, inputs, reference(batch, s, t, T2S, top_k=1))
    assert int(make_loss(top_k=1, merge="max")(inputs_of(batch, s, t)).metrics["aligned"]) == int(
        (batch[FIELD] >= 0).sum())


def test_bf16_and_teacher_without_gradient():
    batch, s, t = synthetic(seed=5)
    inputs = LossInputs(batch=batch, student=ModelOutputs(logits=s.bfloat16().requires_grad_(True)),
                        teacher=ModelOutputs(logits=t.bfloat16().requires_grad_(True)))
    out = make_loss(divergence="js")(inputs)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(inputs.student.logits.grad.float()).all()
    assert inputs.teacher.logits.grad is None


@pytest.mark.parametrize("divergence", ["reverse_kl", "tvd"])
def test_other_divergences_are_finite(divergence):
    batch, s, t = synthetic(seed=6)
    inputs = inputs_of(batch, s, t)
    out = make_loss(divergence=divergence)(inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(inputs.student.logits.grad).all()


def test_needs_setup_and_errors():
    assert MinEDLoss.needs == Needs(teacher=True)
    batch, s, t = synthetic()
    with pytest.raises(ValueError, match="setup"):
        MinEDLoss()(inputs_of(batch, s, t))
    with pytest.raises(ValueError, match="merge"):
        MinEDLoss(merge="min")
    with pytest.raises(ValueError, match="forward_kl"):
        MinEDLoss(divergence="kl")
    with pytest.raises(ValueError, match="teacher tokenizer"):
        MinEDLoss().setup(object(), None)
    del batch[FIELD]
    with pytest.raises(ValueError, match="precompute"):
        make_loss()(inputs_of(batch, s, t))


# ---------------------------------------------------------------------------------------------- real data
def test_embedded_tiny_pair_equals_reference():
    bundles = tiny_pair()
    loss = MinEDLoss(chunk_size=16)
    loss.setup(bundles[1].tokenizer, bundles[0].tokenizer)  # builds (and caches) the tiny pair's map
    assert loss.precompute is loss.aligner and loss.precompute_version == loss.aligner.version
    batch, s, t = pair_batch(bundles, loss.precompute, loss.precompute_version)
    inputs = inputs_of(batch, s, t)
    out = loss(inputs)
    ref = reference(batch, s, t, loss.aligner.t2s)
    assert ref[3] > 0
    check(out, inputs, ref)


@pytest.mark.parametrize("pair", REAL_PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_real_pairs_equal_reference(pair):
    bundles = real_pair(pair)
    t_bundle, s_bundle, _ = bundles
    path = shared_dir() / "data/vocab_alignment" / PUBLISHED[pair] / "tea2stu_id_mapping.json"
    loss = MinEDLoss(vocab_map=str(path), chunk_size=32)
    loss.setup(s_bundle.tokenizer, t_bundle.tokenizer)
    batch, s, t = pair_batch(bundles, loss.precompute, loss.precompute_version)
    assert t.shape[-1] == t_bundle.model.config.vocab_size and s.shape[-1] == s_bundle.model.config.vocab_size
    inputs = inputs_of(batch, s, t)
    out = loss(inputs)
    ref = reference(batch, s, t, loss.aligner.t2s)
    mask = batch["labels"] != -100
    assert ref[3] > 0.5 * int(mask.sum())  # most response positions are aligned on real text
    check(out, inputs, ref)


def test_training_lowers_the_loss(tmp_path):
    from prefkd.training.pipeline import run
    from tests.helpers.runs import compose_cfg

    summary = run(compose_cfg("model=tiny", "loss=minedit", "trainer.max_steps=20", "trainer.eval_every=1000",
                              "trainer.eval_at_start=true", "trainer.log_every=1"), tmp_path / "run")
    assert summary["steps"] == 20
    assert summary["dev_loss_final"] < summary["dev_loss_start"], summary
    assert summary["last_train_loss"] < summary["first_train_loss"], summary
