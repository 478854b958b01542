"""`final_eval.enabled=true`: the best checkpoint is evaluated right after training (docs/methods.md §9 protocol) into
<run_dir>/eval, as a full model or as a LoRA adapter applied to its base (not merged)."""

from __future__ import annotations

import json

import pytest

from prefkd.training.pipeline import run
from tests.helpers.runs import compose_cfg

EVAL = ("final_eval.enabled=true", "final_eval.datasets=[vicuna,dolly]", "final_eval.limit=2",
        "final_eval.seeds=[10,20]", "final_eval.max_new_tokens=4", "final_eval.batch_size=2")


def test_the_best_checkpoint_is_evaluated_after_training(tmp_path, capsys, shared):  # the sets of shared/data
    summary = run(compose_cfg("loss=sft", "trainer.max_steps=2", *EVAL), tmp_path / "run")
    assert f"evaluation: {tmp_path / 'run/eval/results.md'}" in capsys.readouterr().out
    results = json.loads((tmp_path / "run/eval/results.json").read_text())
    assert results == summary["eval"]
    assert results["model"] == summary["checkpoints"]["best"] and results["adapter"] is None
    assert results["seeds"] == [10, 20] and set(results["sets"]) == {"vicuna", "dolly"}
    for name in ("vicuna", "dolly"):
        assert results["sets"][name]["n"] == 2 and set(results["sets"][name]["seeds"]) == {"10", "20"}
        assert (tmp_path / f"run/eval/{name}/seed20.jsonl").is_file()
    again = run(compose_cfg("loss=sft", "trainer.max_steps=2", *EVAL), tmp_path / "run")  # resumes; nothing regenerated
    assert again["eval"]["sets"] == results["sets"]


def test_a_lora_student_is_evaluated_as_an_adapter_on_its_base(tmp_path, shared):  # the sets of shared/data
    from prefkd.models.tiny import build_tiny

    base = build_tiny("b", "llama", 32, num_layers=1, seed=1)
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    cfg = compose_cfg("loss=sft", "teacher=none", "student=checkpoint", f"student.path={tmp_path / 'base'}",
                      "student.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}",
                      "trainer.max_steps=2", *EVAL)
    summary = run(cfg, tmp_path / "run")
    results = summary["eval"]
    assert results["model"] == str(tmp_path / "base") and results["adapter"] == summary["checkpoints"]["best"]
    assert 0.0 <= results["average"]["rougeL_mean"] <= 100.0


def test_a_wrong_protocol_or_a_missing_set_is_an_error_before_training(tmp_path):
    with pytest.raises(ValueError, match="final_eval.protocol='rouge'"):
        run(compose_cfg("loss=sft", "final_eval.enabled=true", "final_eval.protocol=rouge"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="unni"):  # UnNI is not shipped
        run(compose_cfg("loss=sft", "final_eval.enabled=true", "final_eval.datasets=[dolly,unni]"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing trained, nothing written


def test_without_final_eval_the_run_prints_the_commands_that_come_next(tmp_path, capsys):
    summary = run(compose_cfg("loss=sft", "trainer.max_steps=1"), tmp_path / "run")
    out = capsys.readouterr().out
    assert (f"python -m prefkd.evaluate model.path={summary['checkpoints']['best']} "
            f"output_dir={tmp_path / 'run/eval'}") in out
    assert f"python -m prefkd.report {tmp_path / 'run'} --out {tmp_path / 'run/report'}" in out
