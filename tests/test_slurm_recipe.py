"""The multi-node SLURM recipe (run_train/slurm_multinode.sbatch, issue 18) run here with stand-ins for SLURM's
commands: ``srun`` runs its command once as machine 0, ``scontrol`` names this machine and records a requeue. The
launcher is the real ``accelerate launch`` (one CPU process) and the trainer the real ``prefkd.train``.

SIGUSR1 to the batch script (what ``#SBATCH --signal=B:USR1@600`` sends before the time limit) reaches the trainer,
which saves ``checkpoints/step-N`` and stops; the script then requeues the job. Another run's trainer on the same
machine (a stand-in process named like one) is left alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers.shared import free_port

REPO = Path(__file__).resolve().parents[1]
SRUN = """#!/usr/bin/env bash
while [ $# -gt 0 ]; do case "$1" in --*) shift;; *) break;; esac; done  # srun's options: one task, machine 0
SLURM_NODEID=0 exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
case "$1" in show) echo 127.0.0.1;; requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG";; esac
"""
ONE_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
num_machines: 1
num_processes: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
"""


def test_the_time_limit_notice_saves_a_checkpoint_and_requeues_the_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "one_cpu.yaml").write_text(ONE_CPU)
    run_dir, log = tmp_path / "run", tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log),
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "GPUS_PER_NODE": "1",
           "MAIN_PORT": free_port(), "ACCELERATE_CONFIG": str(tmp_path / "one_cpu.yaml"), "PREFKD_ROOT": str(REPO),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    other_run = subprocess.Popen(["bash", "-c", f'exec -a "python -m prefkd.train hydra.run.dir={tmp_path}/other" '
                                  f'sleep 300'])  # another run's trainer, as pkill -f sees it
    job = subprocess.Popen(["bash", str(REPO / "run_train/slurm_multinode.sbatch"), str(run_dir), "model=tiny_same",
                            "loss=kd", "logger=none", "trainer.device=cpu", "trainer.max_steps=1000000",
                            "trainer.eval_every=1000000", "trainer.eval_at_start=false"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while "trainer.fused_head" not in _read(run_dir / "train.log"):  # the trainer is in its loop
            assert job.poll() is None and time.monotonic() < deadline, _read(run_dir / "train.log")[-2000:]
            time.sleep(0.5)
        time.sleep(1)
        job.send_signal(signal.SIGUSR1)
        out, _ = job.communicate(timeout=120)
        assert other_run.poll() is None, "the notice reached another run's trainer"
    finally:
        job.kill()
        other_run.kill()
    assert job.returncode == 0, out[-3000:]
    assert "asking every trainer to save and stop" in out and log.read_text() == "requeue 7\n"
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["finished"] is False and summary["steps"] > 0
    assert (run_dir / "checkpoints" / f"step-{summary['steps']}" / "trainer_state" / "state.json").is_file()


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""
