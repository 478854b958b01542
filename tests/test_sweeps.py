"""The sweep plugins of config/hydra/ (the `sweep` extra): the SLURM launcher config resolves, and an Optuna study
over MCW-KD's weights runs for real on the tiny pair, each trial returning its objective."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

TINY = ["model=tiny", "logger=none", "trainer.device=cpu", "dataset=embedded", "dataset.source.n_train=16",
        "dataset.source.n_dev=4", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_at_start=false",
        "trainer.num_threads=1"]


def train(*args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_PARTITION": "gpu-test"}
    return subprocess.run([sys.executable, "-m", "prefkd.train", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def test_the_slurm_launcher_config_resolves(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    res = train("hydra/launcher=slurm", "experiment=gpt2_multicost", "--cfg", "all", "--resolve", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    launcher = yaml.safe_load(res.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu-test" and launcher["gpus_per_node"] == 1
    assert launcher["signal_delay_s"] > 0 and launcher["max_num_timeout"] > 0  # requeue after a saved checkpoint


def test_an_optuna_study_over_mcw_kd_weights(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    res = train("--multirun", "hydra/sweeper=mcw_kd_optuna", "hydra.sweeper.n_trials=2",
                "hydra.sweeper.direction=minimize", "loss=mcw_kd", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"loss.lambda_logits", "loss.lambda_hidden", "loss.kd_rate"}
    jobs = sorted(p for p in (sweep / "tiny-mcw_kd").iterdir() if p.is_dir())
    assert len(jobs) == 2 and all(p.name.startswith("loss.kd_rate=") for p in jobs)
    values = []
    for job in jobs:  # each trial's value is its best dev loss (trainer.select_metric)
        summary = yaml.safe_load((job / "train_summary.json").read_text())
        assert summary["finished"] and summary["best"]["metric"] == "dev/loss"
        values.append(summary["best"]["value"])
    assert best["best_value"] == pytest.approx(min(values))


def test_an_optuna_direction_against_the_metric_stops_before_training(tmp_path):
    """The example maximises (dev ROUGE-L); with trainer.eval.rouge=false each trial would return its dev loss, and
    maximising that searches for the worst settings: an error naming the fix, and no trial trains."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    res = train("--multirun", "hydra/sweeper=mcw_kd_optuna", "hydra.sweeper.n_trials=2", "loss=mcw_kd", *TINY,
                f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert res.returncode != 0
    assert "hydra.sweeper.direction=maximize but each trial returns its best dev/loss" in res.stderr + res.stdout
    assert "set hydra.sweeper.direction=minimize" in res.stderr + res.stdout
    assert not list(sweep.rglob("train_summary.json"))
