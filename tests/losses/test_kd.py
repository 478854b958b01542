"""KDLoss: (1 − kd_rate)·CE + kd_rate·KD on the student's response tokens, same tokenizer only."""

from __future__ import annotations

import pytest
import torch

from prefkd.losses.base import LossInputs, ModelOutputs, Needs
from prefkd.losses.kd import KDLoss


def make_inputs(B=2, T=6, V=11, Vt=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, -1] = -100  # padding
    s = (torch.randn(B, T, V, generator=g) * 2).to(dtype).requires_grad_(True)
    t = torch.randn(B, T, Vt or V, generator=g) * 2
    batch = {
        "input_ids": ids,
        "labels": labels,
        "teacher_input_ids": ids.clone(),
        "teacher_labels": labels.clone(),
    }
    return LossInputs(batch=batch, student=ModelOutputs(logits=s), teacher=ModelOutputs(logits=t))


def independent(inputs, divergence, tau=1.0, beta=0.1):
    """(CE sum, KD sum, d(CE)/ds, d(KD)/ds), float64, computed without prefkd: masked rows, closed forms."""
    labels = inputs.batch["labels"]
    mask = labels != -100
    s = inputs.student.logits.detach().double().requires_grad_(True)
    v = min(s.shape[-1], inputs.teacher.logits.shape[-1])
    rows_s, rows_t = s[mask], inputs.teacher.logits.double()[mask]
    ce = torch.nn.functional.cross_entropy(rows_s, labels[mask], reduction="sum")
    ls = torch.log_softmax(rows_s[:, :v] / tau, -1)
    lt = torch.log_softmax(rows_t[:, :v] / tau, -1)
    if divergence == "forward_kl":
        kd = (lt.exp() * (lt - ls)).sum()
    elif divergence == "reverse_kl":
        kd = (ls.exp() * (ls - lt)).sum()
    elif divergence == "tvd":
        kd = 0.5 * (lt.exp() - ls.exp()).abs().sum()
    elif divergence == "gjsd":  # GKD: β·KL(p_T‖m) + (1−β)·KL(p_S‖m), m = β p_T + (1−β) p_S
        lm = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
        kd = beta * (lt.exp() * (lt - lm)).sum() + (1 - beta) * (ls.exp() * (ls - lm)).sum()
    else:
        raise KeyError(divergence)
    (g_ce,) = torch.autograd.grad(ce, s, retain_graph=True)
    (g_kd,) = torch.autograd.grad(kd, s)
    return ce.detach(), kd.detach(), g_ce, g_kd


@pytest.mark.parametrize(
    "divergence,kd_rate,tau",
    [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.3, 2.0), ("tvd", 0.9, 0.7), ("gjsd", 0.5, 1.5)],
)
def test_total_is_mix_of_ce_and_kd(divergence, kd_rate, tau):
    """`loss.divergence=gjsd loss.beta=0.1` is GKD's generalised JSD with β = 0.1."""
    inputs = make_inputs(seed=1)
    loss_fn = KDLoss(divergence=divergence, kd_rate=kd_rate, temperature=tau, chunk_size=3, beta=0.1)
    out = loss_fn(inputs)
    out.loss.backward()
    ce, kd, g_ce, g_kd = independent(inputs, divergence, tau)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.metrics["ce"].double(), ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["kd"].double(), kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), (1 - kd_rate) * ce + kd_rate * kd, rtol=1e-5, atol=1e-5)
    expected_grad = (1 - kd_rate) * g_ce + kd_rate * g_kd
    torch.testing.assert_close(inputs.student.logits.grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    assert not out.metrics["ce"].requires_grad and not out.metrics["kd"].requires_grad


def test_padded_teacher_vocabulary_uses_shared_prefix():
    inputs = make_inputs(V=11, Vt=16, seed=2)
    out = KDLoss(kd_rate=1.0)(inputs)
    _, kd, _, _ = independent(inputs, "forward_kl")
    torch.testing.assert_close(out.loss.double(), kd, rtol=1e-5, atol=1e-5)


def test_teacher_gets_no_gradient():
    inputs = make_inputs(seed=3)
    inputs.teacher.logits.requires_grad_(True)
    KDLoss()(inputs).loss.backward()
    assert inputs.teacher.logits.grad is None and inputs.student.logits.grad is not None


def test_bf16_student():
    inputs = make_inputs(seed=4, dtype=torch.bfloat16)
    out = KDLoss(divergence="js")(inputs)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and inputs.student.logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(inputs.student.logits.grad.float()).all()


@pytest.mark.parametrize("change", ["values", "shape"])
def test_different_tokenizers_are_refused(change):
    inputs = make_inputs(seed=5)
    if change == "values":
        inputs.batch["teacher_input_ids"][0, 3] += 1
    else:
        inputs.batch["teacher_input_ids"] = torch.zeros(2, 9, dtype=torch.long)
        inputs.teacher.logits = torch.randn(2, 9, 11)
    with pytest.raises(ValueError, match="same tokenizer") as err:
        KDLoss()(inputs)
    for name in ("uld", "minedit", "dskd_cma", "mcw_kd"):
        assert name in str(err.value)


def test_unknown_divergence_lists_valid_names():
    with pytest.raises(ValueError, match="forward_kl.*reverse_kl.*adaptive_kl"):
        KDLoss(divergence="kl")


def test_needs_and_missing_teacher():
    assert KDLoss.needs == Needs(teacher=True)
    inputs = make_inputs(seed=6)
    inputs.teacher = None
    with pytest.raises(ValueError, match="teacher"):
        KDLoss()(inputs)


# ---------------------------------------------------------------------------------------------- across tokenizers
def test_setup_with_one_vocabulary_changes_nothing(caplog):
    from prefkd.models.tiny import tiny_tokenizer

    loss = KDLoss()
    with caplog.at_level("INFO", logger="prefkd.losses.kd"):
        loss.setup(tiny_tokenizer("a"), tiny_tokenizer("a"))
        loss.setup(tiny_tokenizer("a"), None)
    assert loss.cross_tokenizer is None and loss.precompute is None and not caplog.records
    with pytest.raises(ValueError, match="same tokenizer"):  # the same-token checks stay
        inputs = make_inputs(seed=7)
        inputs.batch["teacher_input_ids"][0, 3] += 1
        loss(inputs)


def test_cross_tokenizer_error_refuses_different_tokenizers():
    """loss.cross_tokenizer=error: two vocabularies fail at setup naming the key; an unknown mode at construction."""
    from tests.helpers.pairs import tiny_pair

    t, s, _ = tiny_pair()
    with pytest.raises(ValueError, match="loss.cross_tokenizer=mined"):
        KDLoss(cross_tokenizer="error").setup(s.tokenizer, t.tokenizer)
    with pytest.raises(ValueError, match="valid values"):
        KDLoss(cross_tokenizer="dtw")


def test_different_tokenizers_use_mined_and_equal_loss_minedit(caplog):
    """loss=kd on the tiny cross-tokenizer pair = loss=minedit with the same divergence, τ and kd_rate: same
    precompute (hook and version), same loss, metrics and gradient on a batch. One info line says so."""
    from prefkd.losses.mined import MinEDLoss
    from tests.helpers.pairs import inputs_of, pair_batch, tiny_pair

    t, s, _ = tiny_pair()
    kd = KDLoss(divergence="js", temperature=1.5, kd_rate=0.3, chunk_size=7)
    with caplog.at_level("INFO", logger="prefkd.losses.kd"):
        kd.setup(s.tokenizer, t.tokenizer)
    lines = [r.getMessage() for r in caplog.records if r.name == "prefkd.losses.kd"]
    assert lines == ["teacher and student tokenizers differ: kd aligns them with MinED's DTW and vocabulary map "
                     "(docs/methods.md §6)"]
    mined = MinEDLoss(divergence="js", temperature=1.5, kd_rate=0.3, chunk_size=7)
    mined.setup(s.tokenizer, t.tokenizer)
    assert kd.precompute is not None and kd.precompute_version == mined.precompute_version
    assert kd.precompute.t2s == mined.precompute.t2s
    batch, s_logits, t_logits = pair_batch(tiny_pair(), kd.precompute, kd.precompute_version)
    a, b = inputs_of(batch, s_logits, t_logits), inputs_of(batch, s_logits, t_logits)
    out_kd, out_mined = kd(a), mined(b)
    assert set(out_kd.metrics) == {"ce", "kd", "aligned"} and int(out_kd.metrics["aligned"]) > 0
    torch.testing.assert_close(out_kd.loss, out_mined.loss)
    for name in out_mined.metrics:
        torch.testing.assert_close(out_kd.metrics[name], out_mined.metrics[name])
    out_kd.loss.backward()
    out_mined.loss.backward()
    torch.testing.assert_close(a.student.logits.grad, b.student.logits.grad)
    assert kd.trainable_modules() == []


def test_gjsd_and_beta_are_config_keys():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from prefkd.utils.config import config_dir

    for loss in ("kd", "minedit", "dskd", "dskd_cma", "mcw_kd", "mcw_kd_dual"):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[f"loss={loss}", "loss.divergence=gjsd", "loss.beta=0.1"])
        built = instantiate(cfg.loss)
        divergence = getattr(built, "dual_space", built)._divergence
        assert divergence.func.__name__ == "gjsd" and divergence.keywords["beta"] == 0.1, loss
