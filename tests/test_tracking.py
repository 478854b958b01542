"""Experiment tracking: metrics.jsonl always, wandb offline without a key, secrets never written."""

from __future__ import annotations

import json
import os

import pytest

from prefkd.training.tracking import Tracker, redact
from prefkd.utils.config import load_env


def test_metrics_file_and_redaction(tmp_path):
    tracker = Tracker(tmp_path, {"backend": "none"}, {"a": 1}, name="t")
    tracker.log({"train/loss": 1.5}, step=3)
    tracker.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["train/loss"] == 1.5 and json.loads(line)["step"] == 3
    assert redact({"logger": {"api_key": "abc", "project": "p"}, "hf_token": "x", "tokens": None}) == {
        "logger": {"api_key": "***", "project": "p"}, "hf_token": "***", "tokens": None}
    harmless = {"tokenizer": "a", "tokenizer_path": "/t", "max_new_tokens": 8, "exclude_keys": ["a"], "monkey": 1}
    assert redact(harmless) == harmless  # config values that only look like secrets stay readable in wandb
    assert redact({"WANDB_API_KEY": "k", "secret": "s", "db_password": "p", "access-token": "t"}) == {
        "WANDB_API_KEY": "***", "secret": "***", "db_password": "***", "access-token": "***"}


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
    for key in ("WANDB_PROJECT", "HUGGINGFACE_TOKEN", "HF_TOKEN"):  # load_dotenv set them outside monkeypatch
        os.environ.pop(key, None)


def test_a_secret_in_the_environment_appears_in_no_run_file(tmp_path, monkeypatch):
    from prefkd.training.pipeline import run
    from tests.helpers.runs import compose_cfg

    secret = "hf_THIS_IS_A_TEST_SECRET_0123456789"
    monkeypatch.setenv("HUGGINGFACE_TOKEN", secret)
    run(compose_cfg("loss=sft", "trainer.max_steps=2"), tmp_path / "run")
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_eval_table_rows_for_both_protocols():
    from prefkd.eval.report import summarize
    from prefkd.training.tracking import eval_table

    per_seed = {"dolly": {10: {"rougeL": 20.0, "exact_match": 1.0, "n": 2, "gen_len_mean": 5.0},
                          20: {"rougeL": 30.0, "exact_match": 0.0, "n": 2, "gen_len_mean": 6.0}}}
    columns, rows, values = eval_table(summarize(per_seed))
    assert columns[:4] == ["set", "n", "rougeL_mean", "rougeL_std"]
    assert rows[0][:4] == ["dolly", 2, 25.0, 5.0] and rows[-1][0] == "average"
    assert values["eval/dolly/rougeL"] == 25.0 and values["eval/average/exact_match"] == 0.5
    columns, rows, values = eval_table({"model": "m", "rewards/accuracies": 0.75, "n": 8, "ok": True})
    assert columns == ["rewards/accuracies", "n"] and rows == [[0.75, 8]] and values["eval/rewards/accuracies"] == 0.75


def test_evaluating_a_checkpoint_logs_into_the_training_runs_wandb(tmp_path, monkeypatch, shared):  # vicuna
    """The trainer records its wandb run (wandb_run.json); prefkd.evaluate of a checkpoint of that run resumes it
    by id and logs the results Table there (offline here: a second offline directory with the same id)."""
    pytest.importorskip("wandb")
    from hydra import compose, initialize_config_dir

    from prefkd import evaluate
    from prefkd.training.pipeline import run
    from prefkd.utils.config import config_dir
    from tests.helpers.runs import compose_cfg

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    run(compose_cfg("loss=sft", "trainer.max_steps=1", "logger=wandb"), run_dir)
    meta = json.loads((run_dir / "wandb_run.json").read_text())
    assert meta["mode"] == "offline" and meta["name"] == "test-seed42"
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model.path={run_dir / 'checkpoints/best'}", "device=cpu",
                                             "eval.datasets=[vicuna]", "eval.limit=1", "eval.seeds=[10]",
                                             "eval.max_new_tokens=4", "progress=false", "logger=wandb",
                                             f"output_dir={tmp_path / 'eval'}"])
    results = evaluate.run(cfg, tmp_path / "eval")
    (table,) = run_dir.glob(f"wandb/offline-run-*-{meta['id']}*/files/media/table/eval/results_*.table.json")
    rows = {r[0]: r for r in json.loads(table.read_text())["data"]}
    assert rows["vicuna"][2] == pytest.approx(results["sets"]["vicuna"]["rougeL_mean"])
    assert not (tmp_path / "eval/wandb").exists()  # no second wandb run
