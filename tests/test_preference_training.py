"""Preference training end to end (docs/methods.md §10): the reference is the INITIAL policy (a frozen copy for full
fine-tuning, the adapter disabled for LoRA), also after a resume; every preference loss trains on the tiny pairs;
clear errors for a preference loss on instruction data and a teacher reference with another tokenizer."""

from __future__ import annotations

import math

import pytest

from tests.helpers.runs import compose_cfg, quick_run

# 8 training pairs seen 3 times (an overfitting check), 4 dev pairs
HH = ("dataset=hh", "dataset.source.limit=12", "dataset.source.dev_size=4", "trainer.batch_size=4",
      "trainer.max_steps=6", "trainer.group_by_length=false", "trainer.lr=1e-3", "trainer.eval_every=1000",
      "trainer.log_every=2", "trainer.eval_at_start=true", "trainer.num_threads=1", "dataset.max_length=96",
      "dataset.max_prompt_length=48")
LR = "trainer.lr=1e-3"
LORA = ("student.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [c_attn]}", "trainer.lr=3e-2")


@pytest.fixture(autouse=True)
def hh_pairs(shared):
    """dataset=hh reads the HH pairs of shared/data (through ${data_file:}): every test here is skipped without them."""
    return shared / "data/preference/hh_harmless_test.jsonl"


@pytest.mark.parametrize("extra", [(LR,), LORA], ids=["full", "lora"])
def test_dpo_starts_at_log2_and_resumes_against_the_initial_reference(tmp_path, extra):
    common = ("model=tiny_same", "teacher=none", "loss=dpo", *HH, *extra)
    straight = quick_run(compose_cfg(*common), tmp_path / "straight")
    # policy = reference at step 0: every margin is 0, the loss is log 2 exactly
    assert straight["dev_loss_start"] == pytest.approx(math.log(2), abs=1e-6)
    assert straight["first_train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert straight["last_train_loss"] < 0.98 * math.log(2) and straight["nonfinite_steps"] == 0
    assert not quick_run(compose_cfg(*common, "trainer.stop_at_step=3"), tmp_path / "resumed")["finished"]
    resumed = quick_run(compose_cfg(*common), tmp_path / "resumed")
    # a reference copied from the resumed weights would give other losses after the resume
    assert resumed["last_train_loss"] == pytest.approx(straight["last_train_loss"], rel=1e-5)


@pytest.mark.parametrize("model,loss", [("tiny_same", "ipo"), ("tiny_same", "tisdpo"), ("tiny", "kd_tisdpo"),
                                        ("tiny", "tisdpo_kdalign"), ("tiny_same", "dpo")])
def test_every_preference_loss_trains(tmp_path, model, loss):
    teacher = ("teacher=none",) if loss in ("ipo", "tisdpo", "dpo") else ()
    summary = quick_run(compose_cfg(f"model={model}", f"loss={loss}", *teacher, *HH, LR), tmp_path / "run")
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 0
    assert summary["last_train_loss"] < summary["first_train_loss"]
    fused = summary["fused_head"]  # fused heads (issue 17): the policy, and the teacher or the reference it reads
    assert fused["student"] and fused["teacher"] != fused["reference"], fused


def test_kd_tisdpo_reads_a_weight_file(tmp_path, hh_pairs):
    import json

    from prefkd.data.preference import load_pairs
    from prefkd.data.preference_dataset import PreferenceDataset
    from prefkd.models.tiny import tiny_tokenizer

    pairs = load_pairs(hh_pairs, limit=40, skip_invalid=True)
    ds = PreferenceDataset(pairs, tiny_tokenizer("b"), tiny_tokenizer("a"), max_length=96, max_prompt_length=48)
    weights = tmp_path / "w.jsonl"
    with weights.open("w") as f:
        for p, ex in zip(pairs, ds):
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                "chosen_weight": [2.0] * len(ex["chosen_weight"]),
                                "rejected_weight": [0.5] * len(ex["rejected_weight"])}) + "\n")
    summary = quick_run(compose_cfg("model=tiny", "loss=kd_tisdpo", *HH, LR, f"dataset.source.train={weights}",
                                    "dataset.source.limit=null"), tmp_path / "run")
    assert summary["steps"] == 6
    short = tmp_path / "short.jsonl"
    rec = json.loads(weights.read_text().splitlines()[0])
    short.write_text(json.dumps({**rec, "chosen_weight": rec["chosen_weight"][:-1]}) + "\n" * 1)
    with pytest.raises(Exception, match="weights for .* parents"):
        quick_run(compose_cfg("model=tiny", "loss=kd_tisdpo", *HH, f"dataset.source.train={short}",
                              "dataset.source.limit=null", "dataset.source.dev_size=0", "trainer.batch_size=1"),
                  tmp_path / "bad")


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="pick a preference dataset"):
        quick_run(compose_cfg("model=tiny_same", "teacher=none", "loss=dpo", "trainer.max_steps=1"), tmp_path / "a")
    with pytest.raises(ValueError, match="reference=teacher needs the student's tokenizer"):
        quick_run(compose_cfg("model=tiny", "loss=dpo", "loss.reference=teacher", *HH), tmp_path / "b")


def test_precomputed_reference_logps_train_like_the_reference_model(tmp_path, hh_pairs):
    from hydra.utils import instantiate

    from prefkd.data.preference import load_pairs
    from prefkd.reference_logps import compute_reference_logps

    source = str(hh_pairs)
    live = compose_cfg("model=tiny_same", "teacher=none", "loss=dpo", *HH, LR, f"dataset.source.train={source}")
    initial = instantiate(live.student)  # the seeded tiny student: the policy every run starts from
    ref_file = compute_reference_logps(load_pairs(source, limit=12, skip_invalid=True), initial,
                                       tmp_path / "ref.jsonl", max_length=96, max_prompt_length=48, progress=False)
    a = quick_run(live, tmp_path / "live")
    b = quick_run(compose_cfg("model=tiny_same", "teacher=none", "loss=dpo", "loss.reference=precomputed", *HH, LR,
                              f"dataset.source.train={ref_file}", "dataset.source.limit=null"), tmp_path / "pre")
    assert b["first_train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert b["last_train_loss"] == pytest.approx(a["last_train_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="prefkd.reference_logps"):
        quick_run(compose_cfg("model=tiny_same", "teacher=none", "loss=dpo", "loss.reference=precomputed", *HH, LR),
                  tmp_path / "missing")
