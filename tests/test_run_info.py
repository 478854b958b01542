"""run_info.json, sweep job directory names and wandb metadata (issue 7)."""

from __future__ import annotations

import json
import signal
import sys

import pytest
from omegaconf import OmegaConf

from prefkd.training.pipeline import objective, pass_signal_on
from prefkd.training.run_info import (
    describe_run,
    job_subdir,
    parse_overrides,
    safe_name,
    sweep_keys,
    swept_label,
    wandb_metadata,
)
from tests.helpers.runs import compose_cfg


def hydra_node(tmp_path, task, sweep_args=None, params=None):
    """The parts of Hydra's runtime config that run_info reads; ``sweep_args`` become the sweep's multirun.yaml."""
    if sweep_args is not None:
        OmegaConf.save({"hydra": {"overrides": {"task": sweep_args}}}, tmp_path / "multirun.yaml")
    return OmegaConf.create({"sweep": {"dir": str(tmp_path)}, "sweeper": {"params": params},
                             "overrides": {"task": task},
                             "job": {"num": 3, "config": {"override_dirname": {
                                 "exclude_keys": ["hydra.sweep.dir", "trainer.resume", "model", "loss", "experiment",
                                                  "logger"]}}}})


def test_overrides_and_safe_names():
    assert parse_overrides(["+a.b=1", "loss=kd", "~c", "~d=2", "++e=3", "x=y=z"]) == {
        "a.b": "1", "loss": "kd", "e": "3", "x": "y=z"}
    assert safe_name("student.path=/models/a b") == "student.path=_models_a_b"
    long = safe_name("k=" + "v" * 400)
    assert len(long) == 200 and long != safe_name("k=" + "v" * 399 + "w")  # a hash keeps cut names apart


def test_job_directories_are_named_by_the_swept_values_only(tmp_path):
    task = ["model=tiny", "loss=kd", "trainer.lr=0.001", "trainer.max_steps=2", "student.path=/m/s", "logger=none"]
    root = OmegaConf.create({"hydra": hydra_node(tmp_path, task, ["loss=sft,kd", "trainer.lr=1e-3,2e-3",
                                                                  "trainer.max_steps=2", "student.path=/m/s"])})
    assert sweep_keys(root.hydra) == {"loss", "trainer.lr"}
    assert job_subdir("tiny-kd", _root_=root) == "tiny-kd/trainer.lr=0.001"  # loss is in the run name already
    # Optuna: the search space is hydra.sweeper.params, there is no multirun.yaml
    other = tmp_path / "optuna"
    other.mkdir()
    root = OmegaConf.create({"hydra": hydra_node(other, task + ["loss.kd_rate=0.25"], params={"loss.kd_rate": "x"})})
    assert job_subdir("tiny-kd", _root_=root) == "tiny-kd/loss.kd_rate=0.25"
    # nothing tells which keys are swept: every override but the excluded ones names the job (never a clash)
    bare = tmp_path / "bare"
    bare.mkdir()
    root = OmegaConf.create({"hydra": hydra_node(bare, task)})
    assert job_subdir("tiny-kd", _root_=root) == "tiny-kd/student.path=_m_s,trainer.lr=0.001,trainer.max_steps=2"


def test_describe_run_and_wandb_metadata(tmp_path):
    cfg = compose_cfg("loss=sft", "method=my_sft", "logger=wandb", "logger.tags=[ablation]")
    info = describe_run(cfg, tokenizers="none")
    assert info["loss"] == "SFTLoss" and info["method"] == "my_sft" and info["swept"] == {}
    info.update(pair="tiny", loss="sft", experiment="gpt2_sft", multirun=True, swept={"trainer.lr": "0.001"})
    meta = wandb_metadata(info, dict(cfg.logger))
    assert meta["name"] == "test[trainer.lr=0.001]-seed42" and meta["group"] == "gpt2_sft"
    assert meta["tags"] == ["pair:tiny", "loss:sft", "method:my_sft", "tokenizers:none", "ablation"]
    assert swept_label({"swept": {"b": "2", "a": "1"}}) == "a=1,b=2"
    assert wandb_metadata({**info, "experiment": None}, {"group": "mine"})["group"] == "mine"


def test_a_run_writes_run_info(tmp_path):
    from prefkd.training.pipeline import run

    run(compose_cfg("loss=kd", "trainer.max_steps=1"), tmp_path / "run")
    info = json.loads((tmp_path / "run/run_info.json").read_text())
    assert info["tokenizers"] == "same" and info["loss"] == "KDLoss" and info["seed"] == 42
    assert not info["multirun"]


def test_the_sweep_objective():
    assert objective({"best": {"metric": "dev/rougeL", "value": 12.5}, "dev_loss_final": 3.0}) == 12.5
    assert objective({"best": None, "dev_loss_final": 3.0, "last_train_loss": 4.0}) == 3.0
    assert objective({"best": None, "dev_loss_final": None, "last_train_loss": 4.0}) == 4.0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_launcher_signal_handler_is_called_after_the_checkpoint():
    from prefkd.training.trainer import Preempted

    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        pass_signal_on(Preempted({"steps": 3}, int(signal.SIGUSR1)))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == [signal.SIGUSR1]
    pass_signal_on(Preempted({"steps": 3}, int(signal.SIGTERM)))  # default handler: nothing is called
