"""The training loop on tiny models: it learns, resumes exactly, and normalises over the global batch."""

from __future__ import annotations

import json

import pytest

from prefkd.training.pipeline import run
from tests.helpers.runs import assert_same_weights, compose_cfg, weights


def test_overfits_a_fixed_batch(tmp_path):
    cfg = compose_cfg("loss=kd", "dataset.source.n_train=8", "trainer.batch_size=8", "trainer.max_steps=60",
                      "trainer.lr=1e-2", "trainer.scheduler=constant", "trainer.group_by_length=false",
                      "trainer.eval_every=1000", "trainer.log_every=10")
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] == 60
    assert summary["last_train_loss"] < 0.3 * summary["first_train_loss"], summary
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "train/loss" in m]
    assert logged and all(m["perf/tokens_per_s"] > 0 and m["perf/peak_mem_mb"] > 0 for m in logged)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    common = ("loss=kd", "trainer.max_steps=6", "trainer.eval_every=2", "dataset.source.n_train=64",
              "trainer.dev_limit=8", "trainer.batch_size=4")
    straight = run(compose_cfg(*common), tmp_path / "straight")
    first = run(compose_cfg(*common, "trainer.stop_at_step=3"), tmp_path / "resumed")
    assert first["steps"] == 3 and not first["finished"]
    second = run(compose_cfg(*common), tmp_path / "resumed")  # resume=auto picks step-3
    assert second["steps"] == 6 and second["finished"]
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert straight["last_train_loss"] == pytest.approx(second["last_train_loss"], rel=1e-6)


def test_loader_workers_and_a_resume_across_epochs_change_nothing(tmp_path):
    """Two DataLoader workers collating ahead train the very weights of collation in the training process, and a
    run stopped at step 5 resumes onto them too, through the end of its epoch (the loader restarts at the epoch's
    next batch, then at the next epoch's first)."""
    common = ("loss=kd", "trainer.max_steps=7", "trainer.eval_every=1000", "dataset.source.n_train=24",
              "trainer.dev_limit=8", "trainer.batch_size=2", "trainer.gradient_accumulation_steps=2")
    inline = run(compose_cfg(*common), tmp_path / "inline")  # 24 examples / 4 per step: 6 steps an epoch
    workers = run(compose_cfg(*common, "trainer.num_workers=2", "trainer.prefetch_factor=3"), tmp_path / "workers")
    assert inline["epochs"] == workers["epochs"] == 1 and workers["steps"] == 7
    assert_same_weights(weights(tmp_path / "inline"), weights(tmp_path / "workers"))
    first = run(compose_cfg(*common, "trainer.num_workers=1", "trainer.stop_at_step=5"), tmp_path / "resumed")
    assert first["steps"] == 5 and not first["finished"]
    run(compose_cfg(*common, "trainer.num_workers=1"), tmp_path / "resumed")
    assert_same_weights(weights(tmp_path / "inline"), weights(tmp_path / "resumed"))
    with pytest.raises(ValueError, match="trainer.num_workers"):
        run(compose_cfg(*common, "trainer.num_workers=-1"), tmp_path / "bad")


def test_accumulation_equals_a_larger_batch(tmp_path):
    """docs/methods.md §2: loss sums are divided by the tokens of the whole optimizer step, not per micro-batch."""
    common = ("loss=kd", "trainer.max_steps=2", "dataset.source.n_train=32", "trainer.eval_every=1000",
              "trainer.group_by_length=false", "trainer.dev_limit=8")
    big = run(compose_cfg(*common, "trainer.batch_size=8"), tmp_path / "big")
    acc = run(compose_cfg(*common, "trainer.batch_size=4", "trainer.gradient_accumulation_steps=2"), tmp_path / "acc")
    assert big["first_train_loss"] == pytest.approx(acc["first_train_loss"], rel=1e-5)
    assert_same_weights(weights(tmp_path / "big"), weights(tmp_path / "acc"), atol=1e-5)


def test_run_directory_layout_and_checkpoints_load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = run(compose_cfg("loss=sft", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.keep_best=1",
                              "trainer.eval_at_start=true"), tmp_path / "run")
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").exists() and (run_dir / "train_summary.json").exists()
    saved = json.loads((run_dir / "train_summary.json").read_text())
    assert saved["steps"] == 4 and saved["dev_loss_start"] is not None and saved["best"]["metric"] == "dev/loss"
    names = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert {"last", "best", "step-4"} <= names and not any(n.startswith(".") for n in names)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "last")
    tok = AutoTokenizer.from_pretrained(run_dir / "checkpoints" / "last")
    assert model.config.vocab_size >= len(tok)
    assert (run_dir / "checkpoints" / "last" / "trainer_state" / "dcp" / ".metadata").exists()  # the training state
    assert summary["checkpoints"]["last"].endswith("last")


def test_lora_student_saves_an_adapter(tmp_path):
    run(compose_cfg("loss=sft", "trainer.max_steps=2", "trainer.eval_every=1000",
                    "student.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [c_attn]}"), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last"
    assert (last / "adapter_config.json").exists() and (last / "adapter_model.safetensors").exists()
    assert not (last / "model.safetensors").exists()
    from prefkd.training.train_state import read_train_state

    trained = read_train_state(last / "trainer_state" / "dcp")  # the resume state: the adapter, not the frozen base
    assert trained["model"] and all("lora_" in name for name in trained["model"]), sorted(trained["model"])[:5]


def test_kd_trains_on_different_tokenizers_with_mined(tmp_path, caplog):
    """loss=kd on the cross-tokenizer tiny pair now trains with MinED's alignment (docs/methods.md §6),
    says so once in the log, and reports the aligned fraction of the response tokens."""
    cfg = compose_cfg("model=tiny", "loss=kd", "trainer.max_steps=20", "trainer.log_every=5",
                      "trainer.eval_at_start=true")
    with caplog.at_level("INFO", logger="prefkd.losses.kd"):
        summary = run(cfg, tmp_path / "run")
    notices = [r for r in caplog.records if "tokenizers differ: kd aligns them with MinED" in r.getMessage()]
    assert len(notices) == 1
    assert summary["steps"] == 20 and summary["dev_loss_final"] < summary["dev_loss_start"], summary
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [m["train/aligned"] for m in metrics if "train/aligned" in m]
    assert len(rates) == 4 and all(0.0 < r <= 1.0 for r in rates)


def test_sft_runs_on_the_cross_tokenizer_pair_without_a_teacher(tmp_path):
    summary = run(compose_cfg("model=tiny", "loss=sft", "trainer.max_steps=3", "teacher=none"), tmp_path / "run")
    assert summary["steps"] == 3


def test_dev_rouge_selects_the_best_checkpoint(tmp_path):
    summary = run(compose_cfg("loss=sft", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.eval.rouge=true",
                              "trainer.eval.rouge_samples=1", "trainer.eval.max_new_tokens=8",
                              "trainer.eval.rouge_limit=4"), tmp_path / "run")
    assert summary["best"]["metric"] == "dev/rougeL"
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rouges = [h["dev/rougeL"] for h in history if "dev/rougeL" in h]
    assert len(rouges) == 2 and all(0.0 <= r <= 100.0 for r in rouges)
    assert summary["best"]["value"] == max(rouges)


@pytest.mark.parametrize("deepspeed", [True, False])
def test_only_the_last_micro_batch_steps_a_deepspeed_engine(deepspeed):
    """accelerator.backward steps a DeepSpeed engine whenever Accelerate's sync_gradients is set: prefkd's own
    accumulation sets it for the last micro-batch of a step only, and leaves it set (DDP keeps its no_sync)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from prefkd.training.trainer import Trainer

    kind = DistributedType.DEEPSPEED if deepspeed else DistributedType.NO
    trainer = SimpleNamespace(acc=SimpleNamespace(distributed_type=kind, num_processes=1, sync_gradients=True),
                              module=None)
    seen = []
    for sync in (False, False, True):
        with Trainer._micro_step(trainer, sync=sync):
            seen.append(trainer.acc.sync_gradients)
    assert seen == ([False, False, True] if deepspeed else [True] * 3) and trainer.acc.sync_gradients
    with pytest.raises(RuntimeError), Trainer._micro_step(trainer, sync=False):
        raise RuntimeError("a failed backward")
    assert trainer.acc.sync_gradients  # set again after a failure too
