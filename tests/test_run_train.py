"""run_train/<pair>/<method>.sh and config/experiment/*.yaml (issue 7): every script resolves its configuration
through run_train/launch.sh (`--cfg job`), every experiment starts a one-step run with the tiny pair in place of its
models, and the published numbers are where the experiments say."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from prefkd.utils.config import config_dir
from tests.helpers.runs import quick_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "run_train").glob("*/*.sh") if p.parent.name != "prefkd")
EXPERIMENTS = sorted(p.stem for p in (ROOT / "config/experiment").glob("*.yaml") if not p.stem.startswith("prefkd_"))
PREFKD_STAGES = ("teacher_sft", "teacher_dpo", "teacher_rdpo", "student_sft", "kd_tisdpo", "tisdpo_kdalign", "dpo",
                 "ipo", "tisdpo")
TINY = ("logger=none", "run_name=test", "trainer.device=cpu", "dataset=embedded", "dataset.source.n_train=16",
        "dataset.source.n_dev=4", "trainer.max_steps=1",
        "trainer.batch_size=4", "trainer.gradient_accumulation_steps=1", "trainer.eval.rouge=false",
        "trainer.num_threads=1", "trainer.eval_at_start=false")


def test_every_pair_has_every_method():
    names = {f"{p.parent.name}/{p.stem}" for p in SCRIPTS}
    for pair in ("gpt2", "gpt2_gpt2", "tinyllama", "gptxl"):
        for method in ("multicost", "multilevel_ot", "dskd_cma", "minedit", "uld", "sft", "teacher_sft"):
            assert f"{pair}/{method}" in names
            assert f"{pair}_{method}" in EXPERIMENTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_script_resolves_its_configuration(script, tmp_path):
    env = {**os.environ, "TEACHER_PATH": "/models/teacher", "STUDENT_PATH": "/models/student"}
    res = subprocess.run(["bash", str(script), "--cfg", "job"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = yaml.safe_load(res.stdout)
    pair, method = script.parent.name, script.stem
    assert cfg["run_name"] == f"{pair}-{method}"
    if method == "teacher_sft":  # the teacher is the model trained: TEACHER_PATH becomes student.path
        assert cfg["student"]["path"] == "/models/teacher" and not cfg["teacher"]
    else:
        assert cfg["student"]["path"] == "/models/student"
    if method not in ("sft", "teacher_sft"):
        assert cfg["teacher"]["path"] == "/models/teacher"
    loss = {"multicost": "MCWKDLoss", "multilevel_ot": "MultiLevelOTLoss", "dskd_cma": "DSKDCMALoss",
            "minedit": "MinEDLoss", "uld": "ULDLoss", "sft": "SFTLoss", "teacher_sft": "SFTLoss"}[method]
    assert cfg["loss"]["_target_"].endswith(loss)
    lora = pair in ("tinyllama", "gptxl")
    assert cfg["trainer"]["max_epochs"] == (15 if lora else 20)  # docs/methods.md §8
    assert cfg["trainer"]["batch_size"] * cfg["trainer"]["gradient_accumulation_steps"] == (16 if lora else 8)
    if method == "multicost":
        assert cfg["loss"]["kd_rate"] == (0.5 if lora else 5.0) and cfg["loss"]["top_k"] == 400


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_a_step_on_the_tiny_pair(experiment, tmp_path):
    model = "tiny_same" if experiment.startswith("gpt2_gpt2") else "tiny"
    tiny_student = []
    if experiment.endswith("teacher_sft"):  # a saved tiny model in place of the teacher's base
        from prefkd.models.tiny import build_tiny

        bundle = build_tiny("a", "llama", 32, num_layers=1, seed=1)
        bundle.model.save_pretrained(tmp_path / "base")
        bundle.tokenizer.save_pretrained(tmp_path / "base")
        tiny_student = [f"student.path={tmp_path / 'base'}", "student.lora=null", "student.dtype=float32",
                        "student.gradient_checkpointing=false"]
    tiny = list(TINY)
    if experiment == "demo_table":  # its own data: the Dolly dev records of ../shared
        if not (ROOT.parent / "shared/data/instruct/dolly_dev.jsonl").is_file():
            pytest.skip("demo_table trains on ../shared/data/instruct/dolly_dev.jsonl, which is not here")
        tiny = [o for o in tiny if not o.startswith("dataset")] + ["dataset.source.dev_size=4"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train",
                      overrides=[f"experiment={experiment}", f"model={model}", *tiny_student, *tiny])
    summary = quick_run(cfg, tmp_path / "run")
    assert summary["steps"] == 1 and summary["nonfinite_steps"] == 0


def test_the_preference_pipeline_has_a_script_and_an_experiment_per_stage():
    scripts = {p.stem for p in (ROOT / "run_train/prefkd").glob("*.sh") if not p.stem.startswith("_")}
    assert scripts == {*PREFKD_STAGES, "weights"}
    experiments = {p.stem for p in (ROOT / "config/experiment").glob("prefkd_*.yaml")}
    assert experiments == {f"prefkd_{s}" for s in PREFKD_STAGES}


@pytest.fixture
def stage_env(tmp_path):
    """A LoRA checkpoint (adapter_config.json) for the SFT teacher, full checkpoints for the others."""
    adapter = tmp_path / "teacher_sft/checkpoints/best"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    env = {**os.environ, "TEACHER_PATH": "/models/base", "STUDENT_PATH": "/models/qwen", "TEACHER_SFT": str(adapter),
           "TEACHER_DPO": "/models/dpo", "STUDENT_SFT": "/models/student_sft", "WEIGHTS": "/data/weights.jsonl"}
    return env, str(adapter)


@pytest.mark.parametrize("stage", PREFKD_STAGES)
def test_every_preference_stage_script_resolves_its_configuration(stage, stage_env, tmp_path):
    env, adapter = stage_env
    res = subprocess.run(["bash", str(ROOT / f"run_train/prefkd/{stage}.sh"), "--cfg", "job"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = yaml.safe_load(res.stdout)
    assert cfg["run_name"] == f"prefkd-{stage}" and cfg["method"] == stage
    loss = {"teacher_sft": "SFTLoss", "student_sft": "SFTLoss", "teacher_dpo": "DPOLoss", "teacher_rdpo": "DPOLoss",
            "dpo": "DPOLoss", "ipo": "DPOLoss", "kd_tisdpo": "KDTISDPOLoss", "tisdpo_kdalign": "TISDPOKDAlignLoss",
            "tisdpo": "TISDPOLoss"}[stage]
    assert cfg["loss"]["_target_"].endswith(loss)
    student = cfg["student"]
    if stage == "teacher_sft":  # the base teacher is the model trained, with a LoRA adapter
        assert student["path"] == "/models/base" and student["lora"]["r"] == 16
    elif stage in ("teacher_dpo", "teacher_rdpo"):  # the SFT adapter merged into the base, a fresh LoRA on top
        assert student["path"] == "/models/base" and student["adapter"] == adapter and student["lora"]["r"] == 16
        assert cfg["dataset"]["source"]["reverse"] == (stage == "teacher_rdpo")
        assert cfg["loss"]["reference"] == "initial" and cfg["loss"]["beta"] == 0.1
    elif stage == "student_sft":
        assert student["path"] == "/models/qwen"
    else:
        assert student["path"] == "/models/student_sft"
    if stage in ("kd_tisdpo", "tisdpo_kdalign"):  # a full DPO checkpoint replaces the teacher's base
        assert cfg["teacher"]["path"] == "/models/dpo" and cfg["loss"]["beta"] == 0.5  # docs/methods.md §10
    else:
        assert not cfg["teacher"]
    if stage in ("kd_tisdpo", "tisdpo_kdalign", "tisdpo"):
        assert cfg["dataset"]["source"]["train"] == "/data/weights.jsonl"
    kind = cfg["dataset"].get("kind")
    assert kind == ("instruct" if stage.endswith("_sft") else "preference")
    if stage == "ipo":
        assert cfg["loss"]["loss_type"] == "ipo"


def test_the_weights_stage_script_resolves_its_configuration(stage_env, tmp_path):
    env, adapter = stage_env
    env = {**env, "POSITIVE": adapter, "NEGATIVE": "/models/neg"}
    res = subprocess.run(["bash", str(ROOT / "run_train/prefkd/weights.sh"), "--cfg", "job"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = yaml.safe_load(res.stdout)
    assert cfg["positive"]["path"] == "/models/base" and cfg["positive"]["adapter"] == adapter
    assert cfg["negative"]["path"] == "/models/neg" and cfg["negative"]["adapter"] is None
    assert cfg["policy"]["path"] == "Qwen/Qwen2.5-1.5B"
    res = subprocess.run(["bash", str(ROOT / "run_train/prefkd/weights.sh")], capture_output=True, text=True,
                         env={k: v for k, v in env.items() if k != "POSITIVE"}, cwd=tmp_path, timeout=60)
    assert res.returncode != 0 and "POSITIVE" in res.stderr


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Saved tiny models: a byte-level teacher and a SentencePiece-style student (different tokenizers)."""
    from prefkd.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    for name, tok, arch in (("teacher", "a", "llama"), ("student", "b", "gpt2")):
        bundle = build_tiny(tok, arch, 32, num_layers=1, seed=1)
        bundle.model.save_pretrained(root / name)
        bundle.tokenizer.save_pretrained(root / name)
    return root


@pytest.fixture
def hh_pairs(shared):
    """The HH pairs of shared/data (skipped without them)."""
    return shared / "data/preference/hh_harmless_test.jsonl"


@pytest.mark.parametrize("stage", PREFKD_STAGES)
def test_every_preference_experiment_runs_a_step_on_tiny_models(stage, tiny_checkpoints, tmp_path, hh_pairs):
    models = [f"student.path={tiny_checkpoints / ('teacher' if stage.startswith('teacher') else 'student')}",
              "student.lora=null", "student.dtype=float32", "student.gradient_checkpointing=false"]
    if stage in ("kd_tisdpo", "tisdpo_kdalign"):
        models += [f"teacher.path={tiny_checkpoints / 'teacher'}", "teacher.dtype=float32"]
    data = [f"dataset.source.train={hh_pairs}", "dataset.source.limit=12", "dataset.source.dev_size=4",
            "dataset.max_length=96", "dataset.max_prompt_length=48"]
    tiny = [o for o in TINY if not o.startswith(("dataset=", "dataset.source.n_"))]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment=prefkd_{stage}", *models, *data, *tiny,
                                                      "trainer.eval_every=null"])
    summary = quick_run(cfg, tmp_path / "run")
    assert summary["steps"] == 1 and summary["nonfinite_steps"] == 0


def test_a_pair_script_and_a_stage_script_start_one_step_runs(tiny_checkpoints, tmp_path, hh_pairs):
    """The wrappers themselves (not only their experiments) train: extra arguments reach Hydra, paths come from the
    environment, a stage's checkpoint becomes the next stage's input."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUM_GPUS": "1"}
    tiny = [*TINY, f"hydra.run.dir={tmp_path / 'gpt2'}"]
    res = subprocess.run(["bash", str(ROOT / "run_train/gpt2/multicost.sh"), "model=tiny", *tiny], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "gpt2/train_summary.json").read_text())
    assert summary["steps"] == 1 and json.loads((tmp_path / "gpt2/run_info.json").read_text())["method"] == "multicost"

    env.update(STUDENT_SFT=str(tiny_checkpoints / "student"), TEACHER_DPO=str(tiny_checkpoints / "teacher"))
    data = [f"dataset.source.train={hh_pairs}", "dataset.source.limit=12", "dataset.source.dev_size=4",
            "dataset.max_length=96", "dataset.max_prompt_length=48", "teacher.dtype=float32",
            "student.gradient_checkpointing=false", f"hydra.run.dir={tmp_path / 'kd'}"]
    tiny = [o for o in TINY if not o.startswith(("dataset=", "dataset.source.n_"))]
    res = subprocess.run(["bash", str(ROOT / "run_train/prefkd/kd_tisdpo.sh"), *data, *tiny], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "kd/train_summary.json").read_text())["steps"] == 1
    cfg = yaml.safe_load((tmp_path / "kd/config.yaml").read_text())
    assert cfg["student"]["path"] == str(tiny_checkpoints / "student")
    assert cfg["teacher"]["path"] == str(tiny_checkpoints / "teacher")
