"""Experiment tracking: metrics.jsonl always, wandb offline without a key, secrets never written."""

from __future__ import annotations

import json
import os

import pytest

from prefkd.tracking import Tracker, redact
from prefkd.train import load_env


def test_metrics_file_and_redaction(tmp_path):
    tracker = Tracker(tmp_path, {"backend": "none"}, {"a": 1}, name="t")
    tracker.log({"train/loss": 1.5}, step=3)
    tracker.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["train/loss"] == 1.5 and json.loads(line)["step"] == 3
    assert redact({"logger": {"api_key": "abc", "project": "p"}, "hf_token": "x", "tokens": None}) == {
        "logger": {"api_key": "***", "project": "p"}, "hf_token": "***", "tokens": None}


def test_wandb_falls_back_to_offline_without_a_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    tracker = Tracker(tmp_path, {"backend": "wandb", "project": "prefkd-test"}, {"x": 1}, name="offline-run")
    try:
        assert tracker.wandb.settings.mode == "offline"
        tracker.log({"train/loss": 2.0}, step=1)
    finally:
        tracker.close()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline run directory was written"


def test_env_file_is_loaded_without_overriding_the_environment(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("WANDB_PROJECT=from-dotenv\nHUGGINGFACE_TOKEN=hf_dotenv_secret\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    load_env()
    assert os.environ["WANDB_PROJECT"] == "from-dotenv"
    assert os.environ["HF_TOKEN"] == "hf_dotenv_secret"  # what transformers reads
    for key in ("WANDB_PROJECT", "HUGGINGFACE_TOKEN", "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)


def test_a_secret_in_the_environment_appears_in_no_run_file(tmp_path, monkeypatch):
    from tests.test_trainer import compose_cfg
    from prefkd.train import run

    secret = "hf_THIS_IS_A_TEST_SECRET_0123456789"
    monkeypatch.setenv("HUGGINGFACE_TOKEN", secret)
    run(compose_cfg("loss=sft", "trainer.max_steps=2"), tmp_path / "run")
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
