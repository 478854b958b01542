"""prefkd.term_gradients: the per-term gradient directions docs/results.md reports, on the tiny two-tokenizer pair."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from prefkd.term_gradients import term_gradients
from prefkd.utils.config import config_dir

TINY = ["model=tiny", "dataset=embedded", "dataset.source.n_train=8", "dataset.source.n_dev=6", "examples=4",
        "logger=none"]


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="term_gradients", overrides=[*TINY, *overrides])


def test_terms_split_the_dskd_cma_loss_and_differences_are_consistent():
    rows = term_gradients(compose_cfg())
    assert list(rows) == ["ce", "kd", "kd_stu", "kd_tea"]
    assert rows["ce"]["cos"] == pytest.approx(1.0, abs=1e-6)
    assert rows["ce"]["norm"] > 0 and rows["kd"]["norm"] > 0 and rows["kd_tea"]["norm"] > 0
    assert all(-1 - 1e-6 <= r["cos"] <= 1 + 1e-6 for r in rows.values())
    # kd = kd_stu + kd_tea: values add, and so do the gradients (law of cosines on the norms)
    assert rows["kd"]["value"] == pytest.approx(rows["kd_stu"]["value"] + rows["kd_tea"]["value"])
    assert rows["kd_tea"]["value"] > 0


def test_the_default_loss_is_the_weighted_sum_of_its_terms():
    """(1 − kd_rate)·∇CE + kd_rate·∇KD = ∇ of the loss at kd_rate (Adam sees exactly this sum)."""
    rows = term_gradients(compose_cfg("+terms.mix={kd_rate: 0.5}"))
    assert rows["mix"]["value"] == pytest.approx(0.5 * rows["ce"]["value"] + 0.5 * rows["kd"]["value"], rel=1e-5)


def test_an_empty_term_list_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="terms"):
        term_gradients(compose_cfg("~terms", "~differences"))


def test_dskd_cma_projectors_load_from_an_mcw_kd_checkpoint_and_back():
    """An MCW-KD checkpoint keeps DSKD-CMA's projectors under ``dual_space.``; the dskd_cma variants of a term-gradient
    comparison read them, and the other way round. A checkpoint with nothing of the loss's is refused."""
    from prefkd.losses.dskd import DSKDCMALoss
    from prefkd.losses.mcw_kd import MCWKDLoss
    from prefkd.term_gradients import shared_modules
    from tests.helpers.memory import prepared

    cma, _ = prepared(DSKDCMALoss(), same_tokenizer=False, n_records=2)
    mcw, _ = prepared(MCWKDLoss(top_k=8, hidden_costs=["euclidean"], hidden_alpha=None), same_tokenizer=False,
                      n_records=2)
    from_mcw = shared_modules(mcw.state_dict(), cma, "cma")
    assert from_mcw.keys() == cma.state_dict().keys()
    assert all(v is mcw.state_dict()[f"dual_space.{k}"] or v.equal(mcw.state_dict()[f"dual_space.{k}"])
               for k, v in from_mcw.items())
    from_cma = shared_modules(cma.state_dict(), mcw, "mcw")
    assert from_cma.keys() == {f"dual_space.{k}" for k in cma.state_dict()}
    with pytest.raises(ValueError, match="terms.cma"):
        shared_modules({"ot_projectors.hidden.weight": from_mcw["projectors.t2s.weight"]}, cma, "cma")
