"""run_train/prefkd_pipeline.sh end to end on the tiny pair (docs/methods.md §10's recipe): every stage runs, each reads
the previous stage's checkpoint, summary.json holds the before/after preference accuracy, a rerun skips finished
stages."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_pipeline(out: Path, data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL": "tiny", "DATA": str(data), "N_TRAIN": "48", "N_TEST": "16", "DEV_SIZE": "8",
           "STEPS": "4", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(["bash", str(ROOT / "run_train/prefkd_pipeline.sh"), str(out), "logger=none",
                           "trainer.num_threads=1", "trainer.eval_every=1000"], env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_pipeline_runs_every_stage_on_the_previous_checkpoint(tmp_path, shared):
    out = tmp_path / "pipe"
    res = run_pipeline(out, shared / "data/preference/hh_harmless_test.jsonl")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_pairs"] == 16
    for key in ("preference_accuracy_before", "preference_accuracy_after", "implicit_reward_accuracy_after_vs_sft"):
        assert 0.0 <= summary[key] <= 1.0

    def config(stage):
        return yaml.safe_load((out / stage / "config.yaml").read_text())

    last = lambda stage: str(out / stage / "checkpoints" / "last")  # noqa: E731
    assert config("teacher_dpo")["student"]["path"] == last("teacher_sft")
    assert config("teacher_rdpo")["student"]["path"] == last("teacher_sft")
    assert config("teacher_rdpo")["dataset"]["source"]["reverse"] is True
    assert config("student_kd")["student"]["path"] == last("student_sft")
    assert config("student_kd")["teacher"]["path"] == last("teacher_dpo")
    assert config("student_kd")["dataset"]["source"]["train"] == str(out / "weights" / "weights.jsonl")
    assert config("student_kd")["loss"]["_target_"].endswith("KDTISDPOLoss")
    weights = [json.loads(line) for line in (out / "weights" / "weights.jsonl").read_text().splitlines()]
    assert len(weights) == 48 - 0 and all(r["chosen_weight"] and r["rejected_weight"] for r in weights)
    assert any(w != 1.0 for r in weights for w in r["chosen_weight"])
    held_out = (out / "data" / "test.jsonl").read_text().splitlines()
    train = (out / "data" / "train.jsonl").read_text().splitlines()
    assert len(held_out) == 16 and not set(held_out) & set(train)

    again = run_pipeline(out, shared / "data/preference/hh_harmless_test.jsonl")
    assert again.returncode == 0
    assert again.stdout.count("done, skipped") == 5
