"""Every process starts from the same parameters (prefkd.training.replicas): FSDP2 and DeepSpeed shard what each
process built, so a loss module initialised differently on one process would train from a mixture, silently. The
trainer compares the processes' parameters before it wraps the module and names the first that differs."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from prefkd.losses.dskd import DSKDLoss
from prefkd.training.replicas import check_replicas_agree, fingerprints
from tests.helpers.shared import free_port
from tests.test_cli import TORCHRUN, train

REPO = Path(__file__).resolve().parents[1]


class SkewedDSKD(DSKDLoss):
    """DSKD whose projector is nudged on rank 1 after it is built (a process that drew different random numbers)."""

    def build(self, student_model, teacher_model) -> None:
        super().build(student_model, teacher_model)
        if os.environ.get("RANK") == "1":
            with torch.no_grad():
                next(iter(self.projectors.parameters())).add_(1e-3)


def test_fingerprints_tell_different_parameters_apart_and_skip_frozen_ones():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(fingerprints(a, "cpu")[1], fingerprints(b, "cpu")[1])
    with torch.no_grad():
        b.weight[0, 0] += 1e-3
    names, values = fingerprints(b, "cpu")
    assert names == ["weight", "bias"] and not torch.equal(values, fingerprints(a, "cpu")[1])
    b.bias.requires_grad_(False)
    assert fingerprints(b, "cpu")[0] == ["weight"]
    check_replicas_agree(a, "cpu")  # one process, no process group: nothing to compare


def test_processes_that_built_different_loss_modules_stop_before_training(tmp_path):
    run = train("model=tiny_same", "loss=dskd", "loss._target_=tests.test_replicas.SkewedDSKD", "trainer.max_steps=2",
                "logger=none", "trainer.device=cpu", "trainer.eval_at_start=false", "trainer.batch_size=4",
                f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                launcher=[str(TORCHRUN), "--nproc_per_node", "2", "--master_port", free_port()],
                env={"PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"})  # this checkout's prefkd, and the test's loss
    assert run.returncode != 0
    assert "the processes start from different parameters: loss.projectors." in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").is_file() or "train/loss" not in (
        tmp_path / "run" / "metrics.jsonl").read_text()
