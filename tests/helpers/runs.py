"""Training-run helpers: the train config on the tiny pair, quick runs, and the saved student weights."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from prefkd.utils.config import config_dir

TINY = ("model=tiny_same", "logger=none", "run_name=test", "trainer.device=cpu", "trainer.eval_at_start=false")


def compose_cfg(*overrides: str):
    """The train config on the tiny same-tokenizer pair; loss=kd unless the overrides pick a loss (the demo's
    default, mcw_kd, is tested in tests/losses/test_mcw_kd.py)."""
    loss = [] if any(o.startswith("loss=") for o in overrides) else ["loss=kd"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, *loss, *overrides])


def weights(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=k)


# 8 steps of 4 examples; dev loss (4 examples) before and after (a smaller training set would evaluate every epoch).
QUICK_RUN = ("dataset.source.n_train=64", "dataset.source.n_dev=8", "trainer.batch_size=4", "trainer.max_steps=8",
             "trainer.lr=1e-2", "trainer.scheduler=constant", "trainer.eval_every=1000", "trainer.log_every=4",
             "trainer.dev_limit=4", "trainer.eval_at_start=true", "trainer.num_threads=1")


def quick_run(cfg, run_dir):
    """prefkd.train.run, restoring torch's thread count (trainer.num_threads sets it process-wide). One thread:
    tiny models on a busy 2-core machine run many times faster than with two."""
    from prefkd.training.pipeline import run

    threads = torch.get_num_threads()
    try:
        return run(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)




def assert_two_processes_equal_one(tmp_path: Path, one: str = "one", two: str = "two") -> tuple[dict, dict]:
    """The runs in ``tmp_path/one`` (one process, the global batch) and ``tmp_path/two`` (two processes, half each):
    the same first and last training loss (to 1e-6) and the same last weights, the loss's projectors included.
    Returns both summaries."""
    import json

    import pytest

    s1, s2 = (json.loads((tmp_path / d / "train_summary.json").read_text()) for d in (one, two))
    assert s1["first_train_loss"] == pytest.approx(s2["first_train_loss"], rel=1e-6)
    assert s1["last_train_loss"] == pytest.approx(s2["last_train_loss"], rel=1e-6)
    for name in ("model.safetensors", "projectors.safetensors"):
        a = load_file(str(tmp_path / one / "checkpoints" / "last" / name))
        b = load_file(str(tmp_path / two / "checkpoints" / "last" / name))
        assert a.keys() == b.keys() and a, name
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
    return s1, s2
