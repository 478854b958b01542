"""The commands users type: `python -m prefkd.train ...` as subprocesses, from another working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers.runs import assert_two_processes_equal_one
from tests.helpers.shared import free_port

TORCHRUN = Path(sys.executable).with_name("torchrun")


def train(*args: str, cwd: Path, launcher: list[str] | None = None, timeout: int = 300,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "prefkd.train", *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_tiny_run_from_any_directory(tmp_path):
    res = train("model=tiny_same", "loss=kd", "trainer.max_steps=20", "logger=none",
                f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checkpoint:" in res.stdout and "dev loss:" in res.stdout
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 20 and summary["dev_loss_final"] < summary["dev_loss_start"]


def test_multirun_sweep_with_the_basic_launcher(tmp_path):
    """The README's sweep over a published recipe (issue 7), with the tiny pair in place of its models."""
    res = train("--multirun", "experiment=gpt2_multicost", "loss.lambda_logits=1,10", "model=tiny", "dataset=embedded",
                "dataset.source.n_train=16", "dataset.source.n_dev=4", "trainer.max_steps=1", "trainer.batch_size=4",
                "trainer.eval.rouge=false", "trainer.eval_at_start=false", "logger=none",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/*/train_summary.json"))
    # <run_name>/<swept values>: the experiment's run name, then only the swept key
    assert [p.relative_to(tmp_path / "sweep").as_posix() for p in jobs] == [
        "gpt2-multicost/loss.lambda_logits=1", "gpt2-multicost/loss.lambda_logits=10"]
    for job, value in zip(jobs, (1.0, 10.0)):
        info = json.loads((job / "run_info.json").read_text())
        assert info["experiment"] == "gpt2_multicost" and info["method"] == "multicost" and info["loss"] == "mcw_kd"
        assert info["swept"] == {"loss.lambda_logits": str(int(value))}
        assert json.loads((job / "train_summary.json").read_text())["steps"] == 1
        assert yaml.safe_load((job / "config.yaml").read_text())["loss"]["lambda_logits"] == value


def test_a_users_own_config_dir_adds_groups(tmp_path):
    own = tmp_path / "my_configs" / "loss"
    own.mkdir(parents=True)
    (own / "my_kd.yaml").write_text("_target_: prefkd.losses.kd.KDLoss\ndivergence: js\n")
    res = train("--config-dir", str(tmp_path / "my_configs"), "loss=my_kd", "model=tiny_same", "--cfg", "job",
                cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "divergence: js" in res.stdout and "KDLoss" in res.stdout


def test_missing_real_model_fails_clearly(tmp_path, shared):
    """The model path is the only bad input (the data are read first, and exist)."""
    data = ("dataset=jsonl", f"dataset.source.train={shared}/data/instruct/dolly_dev.jsonl")
    res = train("loss=sft", "model=tinyllama", *data, "logger=none", "student.path=/models/tinyllama",
                f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert res.returncode != 0
    assert "path='/models/tinyllama'" in res.stderr and "student.path=" in res.stderr


def test_kd_on_different_tokenizers_runs_with_mined(tmp_path):
    """`loss=kd` on the cross-tokenizer tiny pair now runs (MinED alignment, docs/methods.md §6),
    logs why, and reports the alignment rate."""
    res = train("model=tiny", "loss=kd", "trainer.max_steps=20", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    notice = ("teacher and student tokenizers differ: kd aligns them with MinED's DTW and vocabulary map "
              "(docs/methods.md §6)")
    assert (res.stdout + res.stderr).count(notice) == 1
    assert (tmp_path / "run" / "train.log").read_text().count(notice) == 1
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(0.0 < m.get("dev/aligned", 0.0) <= 1.0 for m in metrics)
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] == 20


def test_two_processes_equal_one_process(tmp_path):
    """docs/methods.md §2: two processes with batch 4 (gloo on CPU) = one process with batch 8: same loss, same
    weights, the loss's projectors included (they sit inside the module DDP wraps, with the student)."""
    common = ("model=tiny_same", "loss=dskd", "trainer.max_steps=3", "logger=none", "trainer.device=cpu",
              "trainer.eval_every=1000", "trainer.eval_at_start=false")
    two = train(*common, "trainer.batch_size=4", f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path,
                launcher=[str(TORCHRUN), "--nproc_per_node", "2", "--master_port", free_port()])
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(*common, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_two_processes_equal_one(tmp_path)


def test_on_policy_trains_in_two_processes(tmp_path):
    """On-policy steps under DDP: each process samples its own micro-batch with the unwrapped student (no collective
    inside generate), then the prepared module trains on the samples; the coin agrees across processes."""
    run = train("model=tiny", "loss=minedit", "trainer.max_steps=3", "logger=none", "trainer.device=cpu",
                "trainer.eval_every=1000", "trainer.eval_at_start=false", "trainer.batch_size=4",
                "trainer.on_policy.fraction=0.5", "trainer.on_policy.max_new_tokens=8",
                f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path,
                launcher=[str(TORCHRUN), "--nproc_per_node", "2", "--master_port", free_port()])
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["finished"] and summary["on_policy"]["sampled_steps"] == 2  # steps 0 and 2 (seed 42)
    assert summary["on_policy"]["generate_tok_s"] > 0 and summary["nonfinite_steps"] == 0


def test_sigterm_saves_a_checkpoint_and_exits_75(tmp_path):
    """Pre-emption: SIGTERM finishes the step, saves, exits 75; the same command then resumes to the end."""
    import signal
    import time

    args = [sys.executable, "-m", "prefkd.train", "model=tiny_same", "loss=sft", "trainer.max_steps=100000",
            "trainer.eval_every=100000", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def logged_train_steps() -> list[int]:  # the steps of the train/loss lines written so far
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return [r["step"] for r in map(json.loads, filter(None, lines[:-1])) if "train/loss" in r]

    deadline = time.time() + 120  # wait for a step count, not a time: the signal lands at step >= 10
    while time.time() < deadline and max(logged_train_steps(), default=0) < 10:
        time.sleep(0.2)
    assert max(logged_train_steps(), default=0) >= 10, "the run logged no train/loss at step >= 10 in 120 s"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert not summary["finished"] and summary["steps"] >= 10
    step_dir = tmp_path / "run" / "checkpoints" / f"step-{summary['steps']}"
    assert (step_dir / "trainer_state" / "state.json").exists()
    res = train(*args[3:-1], f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=" + str(summary["steps"] + 2),
                cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] == summary["steps"] + 2
