"""run_train/<pair>/<method>.sh and config/experiment/*.yaml (issue 7): every script resolves its configuration
through run_train/launch.sh (`--cfg job`), every experiment starts a one-step run with the tiny pair in place of its
models, and the published numbers are where the experiments say."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from hydra import compose, initialize_config_dir

from prefkd.train import config_dir
from tests.losses.test_dskd import quick_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "run_train").glob("*/*.sh"))
EXPERIMENTS = sorted(p.stem for p in (ROOT / "config/experiment").glob("*.yaml"))
TINY = ("logger=none", "run_name=test", "trainer.device=cpu", "dataset=embedded", "dataset.source.n_train=16", "dataset.source.n_dev=4", "trainer.max_steps=1",
        "trainer.batch_size=4", "trainer.gradient_accumulation_steps=1", "trainer.eval.rouge=false",
        "trainer.num_threads=1", "trainer.eval_at_start=false")


def test_every_pair_has_every_method():
    names = {f"{p.parent.name}/{p.stem}" for p in SCRIPTS}
    for pair in ("gpt2", "gpt2_gpt2", "tinyllama", "gptxl"):
        for method in ("multicost", "multilevel_ot", "dskd_cma", "minedit", "uld", "sft", "teacher_sft"):
            assert f"{pair}/{method}" in names
            assert f"{pair}_{method}" in EXPERIMENTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_script_resolves_its_configuration(script, tmp_path):
    env = {**os.environ, "TEACHER_PATH": "/models/teacher", "STUDENT_PATH": "/models/student"}
    res = subprocess.run(["bash", str(script), "--cfg", "job"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = yaml.safe_load(res.stdout)
    pair, method = script.parent.name, script.stem
    assert cfg["run_name"] == f"{pair}-{method}"
    if method == "teacher_sft":  # the teacher is the model trained: TEACHER_PATH becomes student.path
        assert cfg["student"]["path"] == "/models/teacher" and not cfg["teacher"]
    else:
        assert cfg["student"]["path"] == "/models/student"
    if method not in ("sft", "teacher_sft"):
        assert cfg["teacher"]["path"] == "/models/teacher"
    loss = {"multicost": "MCWKDLoss", "multilevel_ot": "MultiLevelOTLoss", "dskd_cma": "DSKDCMALoss",
            "minedit": "MinEDLoss", "uld": "ULDLoss", "sft": "SFTLoss", "teacher_sft": "SFTLoss"}[method]
    assert cfg["loss"]["_target_"].endswith(loss)
    lora = pair in ("tinyllama", "gptxl")
    assert cfg["trainer"]["max_epochs"] == (15 if lora else 20)  # SPEC §8
    assert cfg["trainer"]["batch_size"] * cfg["trainer"]["gradient_accumulation_steps"] == (16 if lora else 8)
    if method == "multicost":
        assert cfg["loss"]["kd_rate"] == (0.5 if lora else 5.0) and cfg["loss"]["top_k"] == 400


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_a_step_on_the_tiny_pair(experiment, tmp_path):
    model = "tiny_same" if experiment.startswith("gpt2_gpt2") else "tiny"
    tiny_student = []
    if experiment.endswith("teacher_sft"):  # a saved tiny model in place of the teacher's base
        from prefkd.models.tiny import build_tiny

        bundle = build_tiny("a", "llama", 32, num_layers=1, seed=1)
        bundle.model.save_pretrained(tmp_path / "base")
        bundle.tokenizer.save_pretrained(tmp_path / "base")
        tiny_student = [f"student.path={tmp_path / 'base'}", "student.lora=null", "student.dtype=float32",
                        "student.gradient_checkpointing=false"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train",
                      overrides=[f"experiment={experiment}", f"model={model}", *tiny_student, *TINY])
    summary = quick_run(cfg, tmp_path / "run")
    assert summary["steps"] == 1 and summary["nonfinite_steps"] == 0
