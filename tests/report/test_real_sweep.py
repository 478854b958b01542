"""Issue 7 end to end: a real Hydra sweep on the tiny pair (basic launcher, evaluation after training, wandb offline)
and `python -m prefkd.report` on what it wrote: stable job directories, run_info.json, the wandb Table, and a
report whose numbers are the runs' own results."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SWEEP = ["model=tiny", "loss=sft,kd", "trainer.lr=1e-3,3e-3", "trainer.device=cpu", "dataset=embedded",
         "dataset.source.n_train=16", "dataset.source.n_dev=4", "trainer.max_steps=2", "trainer.batch_size=4",
         "trainer.eval_at_start=false", "trainer.num_threads=1", "logger=wandb", "final_eval.enabled=true",
         "final_eval.datasets=[dolly,vicuna]", "final_eval.limit=2", "final_eval.seeds=[10,20]",
         "final_eval.max_new_tokens=8", "final_eval.batch_size=2"]
JOBS = {("sft", "0.001"), ("sft", "0.003"), ("kd", "0.001"), ("kd", "0.003")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from tests.helpers.shared import shared_dir

    shared_dir()  # final_eval reads the Dolly and Vicuna sets of shared/data: skipped without them
    root = tmp_path_factory.mktemp("sweep")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "prefkd.train", "--multirun", *SWEEP,
                          f"hydra.sweep.dir={root / 'multirun'}"], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "multirun"


def test_sweep_jobs_have_stable_readable_directories(sweep):
    jobs = {(p.parent.name, p.name) for p in sweep.glob("*/*") if p.is_dir()}
    assert jobs == {(f"tiny-{loss}", f"trainer.lr={lr}") for loss, lr in
                    {("sft", "0.001"), ("sft", "0.003"), ("kd", "0.001"), ("kd", "0.003")}}
    info = json.loads((sweep / "tiny-kd/trainer.lr=0.003/run_info.json").read_text())
    assert info["pair"] == "tiny" and info["loss"] == "kd" and info["method"] == "kd"
    assert info["swept"] == {"loss": "kd", "trainer.lr": "0.003"} and info["tokenizers"] == "different"
    assert info["multirun"] and Path(info["sweep_dir"]) == sweep.resolve()


def test_each_run_logged_its_evaluation_table_to_wandb_offline(sweep):
    run = sweep / "tiny-kd/trainer.lr=0.001"
    meta = json.loads((run / "wandb_run.json").read_text())
    assert meta["mode"] == "offline" and meta["group"] == "tiny-kd"
    assert meta["name"] == "tiny-kd[loss=kd,trainer.lr=0.001]-seed42"
    (table,) = run.glob("wandb/offline-run-*/files/media/table/eval/results_*.table.json")
    data = json.loads(table.read_text())
    results = json.loads((run / "eval/results.json").read_text())
    rows = {r[0]: r for r in data["data"]}
    assert data["columns"][:4] == ["set", "n", "rougeL_mean", "rougeL_std"]
    assert set(rows) == {"dolly", "vicuna", "average"}
    assert rows["dolly"][2] == pytest.approx(results["sets"]["dolly"]["rougeL_mean"])
    assert rows["average"][2] == pytest.approx(results["average"]["rougeL_mean"])


def test_report_of_the_sweep(sweep, tmp_path):
    out = tmp_path / "report"
    res = subprocess.run([sys.executable, "-m", "prefkd.report", str(sweep), "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (out / "report.md").read_text()
    assert "| dolly | vicuna | Avg. |" in md.replace("  ", " ") or "dolly | vicuna | Avg." in md
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["swept"]) for r in rows} == {(loss, f"trainer.lr={lr}") for loss, lr in JOBS}
    for row in rows:  # each cell is that run's own mean over its two evaluation seeds
        lr = row["swept"].split("=")[1]
        results = json.loads((sweep / f"tiny-{row['method']}/trainer.lr={lr}/eval/results.json").read_text())
        for name in ("dolly", "vicuna"):
            assert float(row[f"{name}_mean"]) == pytest.approx(results["sets"][name]["rougeL_mean"], abs=1e-4)
            assert float(row[f"{name}_std"]) == pytest.approx(results["sets"][name]["rougeL_std"], abs=1e-4)
        assert float(row["avg_mean"]) == pytest.approx(results["average"]["rougeL_mean"], abs=1e-4)
        cell = f"{results['sets']['dolly']['rougeL_mean']:.2f} ± {results['sets']['dolly']['rougeL_std']:.2f}"
        assert cell in md
    plots = {p.name for p in out.glob("*.png")}
    assert {"rougeL_by_set.png", "train_loss.png", "dev_metrics.png"} <= plots
    assert any(name.startswith("sweep_") and "trainer.lr" in name for name in plots), plots
    for name in plots:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
