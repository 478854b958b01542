"""Every cross-tokenizer loss trains end to end on the papers' real tokenizer pairs (tiny random models with
the real vocabularies from ../shared/tokenizers), through the same `run` as the command line, on the dataset's
responses and on the student's own samples (on-policy)."""

from __future__ import annotations

import pytest

from prefkd.training.pipeline import run
from tests.helpers.runs import compose_cfg
from tests.helpers.shared import shared_dir

QWEN_GPT2_MAP = "data/vocab_alignment/qwen_to_gpt2/tea2stu_id_mapping.json"
CASES = [
    ("tiny_qwen_gpt2", "dskd_cma", ()),
    ("tiny_qwen_gpt2", "uld", ("loss.top_k=2000",)),
    ("tiny_qwen_gpt2", "minedit", ("loss.vocab_map={shared}/" + QWEN_GPT2_MAP,)),  # the published map: no 1-min build
    ("tiny_qwen_gpt2", "multilevel_ot", ("loss.chunk_size=256",)),
    ("tiny_mistral_tinyllama", "dskd_cma", ()),
    ("tiny_mistral_tinyllama", "multilevel_ot", ()),
    ("tiny_mistral_tinyllama", "uld", ()),
    ("tiny_mistral_tinyllama", "minedit", ()),
    ("tiny_mistral_tinyllama", "kd", ()),  # different tokenizers: kd goes through MinED's alignment
    ("tiny_qwen_gpt2", "minedit", ("loss.vocab_map={shared}/" + QWEN_GPT2_MAP, "loss.divergence=gjsd",
                                   "loss.beta=0.1")),  # GKD's divergence (kd across tokenizers is this MinED)
    ("tiny_qwen_gpt2", "mcw_kd", ()),
    ("tiny_qwen_gpt2", "mcw_kd_dual", ()),
    ("tiny_mistral_tinyllama", "mcw_kd", ()),
    ("tiny_mistral_tinyllama", "mcw_kd_dual", ()),
]
# on-policy (prefkd.training.on_policy) with λ = 0.5: with trainer.seed 42, steps 0 and 2 train on the student's
# samples and step 1 on the dataset, so every case runs both paths
ON_POLICY = ("trainer.on_policy.fraction=0.5", "trainer.on_policy.max_new_tokens=12")


IDS = [f"{p}-{name}" + ("-gjsd" if "loss.divergence=gjsd" in extra else "") for p, name, extra in CASES]


@pytest.mark.parametrize("preset,loss,extra", CASES, ids=IDS)
def test_loss_trains_on_a_real_pair(preset, loss, extra, tmp_path, shared):  # the real tokenizers
    extra = tuple(e.format(shared=shared_dir()) for e in extra)
    cfg = compose_cfg(f"model={preset}", f"loss={loss}", "trainer.max_steps=3", "trainer.num_threads=1",
                      "dataset.source.n_train=24", *ON_POLICY, *extra)
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] == 3
    assert summary["on_policy"]["sampled_steps"] == 2 and summary["on_policy"]["dataset_steps"] == 1
    assert summary["first_train_loss"] == summary["first_train_loss"]  # finite, not NaN
    assert summary["dev_loss_final"] is not None and summary["nonfinite_steps"] == 0
    assert summary["fused_head"] == {"student": True, "teacher": True, "reference": False}  # no logits built
