"""Bad input fails before training, not after (issue 19 part 4).

For each entry point, one bad input per class (too few records, missing file, wrong field, incompatible keys, wrong
type or out of range, unknown key) fails in under 10 s with a message naming the cause, before any model loads: every
model factory is replaced by one that fails the test (:func:`no_models`). The entry points run in-process (Hydra's
compose and their run function); the pipeline script runs as a subprocess. Then the schema of every config group is
compared with the YAML files, so that the two cannot drift apart.

Run with ``-s`` to see every bad input and the message it gets.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hydra import compose, initialize_config_dir

from prefkd.utils.config import config_dir
from prefkd.utils.config_schema import key
from tests.helpers.runs import compose_cfg

REPO = Path(__file__).resolve().parents[1]
CONFIG = Path(config_dir())
FAST = 10.0  # seconds a bad input may take to be refused
PAIR = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
RECORD = {"prompt": "Say hi.", "output": "hi"}
FACTORIES = [("prefkd.models.loading", "load_pretrained"), ("prefkd.models.loading", "load_model"),
             ("prefkd.models.loading", "load_reward_model"), ("prefkd.models.tiny", "build_tiny"),
             ("prefkd.models.tiny", "build_shrunk"), ("prefkd.models.transplant", "load_transplanted")]


@pytest.fixture
def no_models(monkeypatch):
    """Every model factory fails the test when called; functools.wraps keeps the signatures the schema reads."""
    import importlib

    def refusing(factory):
        @functools.wraps(factory)
        def refuse(*args, **kwargs):
            raise AssertionError(f"{factory.__name__} was called: a model loaded before the bad input was refused")

        return refuse

    for module, name in FACTORIES:
        monkeypatch.setattr(importlib.import_module(module), name, refusing(getattr(importlib.import_module(module),
                                                                                      name)))


def fails_fast(case: str, call, match: str, error=Exception) -> str:
    """``call()`` raises ``error`` whose message contains ``match`` (literally), within FAST seconds; the message."""
    start = time.perf_counter()
    with pytest.raises(error) as raised:
        call()
    seconds = time.perf_counter() - start
    message = str(raised.value)
    print(f"\n[{case}] ({seconds:.1f} s) {type(raised.value).__name__}: {message}")
    assert match in message, message
    assert seconds < FAST, f"{case}: refused after {seconds:.1f} s"
    return message


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Small data files: instruction records, preference pairs, an empty file and one that does not exist."""
    return {"records": jsonl(tmp_path / "records.jsonl", [{**RECORD, "output": f"hi {i}"} for i in range(3)]),
            "pairs": jsonl(tmp_path / "pairs.jsonl", [{**PAIR, "chosen": f" {i}"} for i in range(3)]),
            "empty": jsonl(tmp_path / "empty.jsonl", []), "missing": tmp_path / "nowhere.jsonl"}


def composed(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


# ------------------------------------------------------------------------------------------------ prefkd.train
def test_train(tmp_path, files, no_models):
    from prefkd.training.pipeline import run

    def train(*overrides):
        return lambda: run(compose_cfg(*overrides), tmp_path / "run")

    jsonl_data = ("dataset=jsonl", "dataset.source.dev_size=0")
    fails_fast("train: too few records", train("dataset.source.n_train=3", "trainer.batch_size=4"),
               "the training split holds 3 records, fewer than one optimizer step's 4 (trainer.batch_size=4")
    fails_fast("train: missing file", train(*jsonl_data, f"dataset.source.train={files['missing']}"),
               "nowhere.jsonl: not found")
    fails_fast("train: wrong field", train(*jsonl_data, f"dataset.source.train={files['pairs']}"),
               "missing field 'output' (this line holds `chosen`/`rejected`: a preference pair")
    fails_fast("train: incompatible keys", train("dataset.max_prompt_length=512"),
               "dataset.max_prompt_length=512 with dataset.max_length=512: the prompt would fill the whole budget")
    fails_fast("train: incompatible keys (loss and data)", train("loss=dpo"),
               "trains on preference pairs but dataset prefkd.data.embedded.embedded_splits holds instruction records")
    fails_fast("train: incompatible keys (loss and teacher)", train("loss=kd", "teacher=none"),
               "needs a teacher but teacher=none")
    message = fails_fast("train: wrong type and out of range",
                         train("trainer.max_steps=abc", "trainer.batch_size=0", "trainer.lr=-1"), "3 problems")
    for part in ("trainer.max_steps='abc': expects an integer ≥ 1 or null", "trainer.batch_size=0: expects an integer "
                 "≥ 1", "trainer.lr=-1: expects a number > 0"):
        assert part in message
    fails_fast("train: wrong type in a _target_ node", train("loss.kd_rate=abc"),
               "loss.kd_rate='abc': expects a number (the parameter kd_rate of prefkd.losses.kd.KDLoss)")
    fails_fast("train: unknown key", train("+trainer.bach_size=4"),
               "trainer.bach_size: unknown key; did you mean trainer.batch_size? (accepted: batch_size, ")
    fails_fast("train: unknown key of a _target_ node", train("+student.hiden_size=8"),
               "student.hiden_size: unknown key; did you mean student.hidden_size?")
    fails_fast("train: unknown key of the teacher (placement keys known)", train("+teacher.shards=true"),
               "teacher.shards: unknown key; did you mean teacher.shard?")


def test_a_users_own_yaml_is_checked_too(tmp_path, no_models):
    """Groups from a user's own config folder (``--config-dir``, here Hydra's search path): a loss YAML with a
    misspelt key, a trainer YAML with a value out of range, a student YAML without its factory's required parameter
    and a trainer YAML that leaves keys out are refused like command-line overrides."""
    from prefkd.training.pipeline import run

    (tmp_path / "mine" / "loss").mkdir(parents=True)
    (tmp_path / "mine" / "trainer").mkdir()
    (tmp_path / "mine" / "loss" / "my_kd.yaml").write_text("_target_: prefkd.losses.kd.KDLoss\ndivergance: js\n")
    (tmp_path / "mine" / "trainer" / "short.yaml").write_text("defaults:\n  - default\n  - _self_\n\nlr: 1e-4\n"
                                                               "warmup_ratio: 1.5\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'mine'}]"
    fails_fast("train: a user's loss YAML", lambda: run(compose_cfg(search, "loss=my_kd"), tmp_path / "run"),
               "loss.divergance: unknown key; did you mean loss.divergence?")
    fails_fast("train: a user's trainer YAML", lambda: run(compose_cfg(search, "trainer=short"), tmp_path / "run"),
               "trainer.warmup_ratio=1.5: expects a number in [0, 1)")
    (tmp_path / "mine" / "student").mkdir()
    (tmp_path / "mine" / "student" / "pathless.yaml").write_text("_target_: prefkd.models.loading.load_pretrained\n")
    fails_fast("train: a user's student YAML without its path",
               lambda: run(compose_cfg(search, "student=pathless"), tmp_path / "run"),
               "student.path: missing; prefkd.models.loading.load_pretrained needs it (a string)")
    (tmp_path / "mine" / "trainer" / "bare.yaml").write_text("lr: 1e-4\n")
    fails_fast("train: a user's trainer YAML without defaults",
               lambda: run(composed("train", search, "trainer=bare", "model=tiny_same", "loss=kd", "logger=none",
                                    "run_name=t"), tmp_path / "run"),
               "trainer.seed: missing; expects an integer (seed of data order and dropout)")


def test_train_on_the_command_line(tmp_path):
    """``python -m prefkd.train`` (a subprocess): Hydra still refuses an unknown key without ``+``; a schema problem
    ends the command with exit code 2 and the message alone, no traceback, before the run writes anything. The
    command's CPU time (the imports, mostly) stays under 10 s; its wall time depends on the machine's load."""
    import resource

    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"Could not override 'trainer.bach_size'"):
        compose_cfg("trainer.bach_size=4")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "WANDB_MODE": "disabled"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([sys.executable, "-m", "prefkd.train", "model=tiny_same", "loss=kd", "logger=none",
                          "+trainer.bach_size=4", "trainer.max_steps=abc", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"\n[train CLI: unknown key and wrong type] ({cpu:.1f} s CPU) {res.stderr.strip()}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith("error: 2 problems in the configuration:") and "Traceback" not in res.stderr
    assert "trainer.max_steps='abc': expects an integer ≥ 1 or null" in res.stderr
    assert "trainer.bach_size: unknown key; did you mean trainer.batch_size?" in res.stderr
    assert cpu < FAST and not (tmp_path / "run" / "config.yaml").exists()


# ------------------------------------------------------------------------------------------------ prefkd.evaluate
def test_evaluate(tmp_path, files, no_models):
    from prefkd.training.evaluation import run

    def evaluate(*overrides):
        base = ("logger=none", "model.path=unused", "device=cpu", "progress=false")
        return lambda: run(composed("evaluate", *base, *overrides), tmp_path / "eval")

    fails_fast("evaluate: too few records", evaluate("eval=preference", f"eval.dataset={files['empty']}"),
               "empty.jsonl: the file holds no preference pairs (it is empty or holds only blank lines); each line "
               "must be a JSON object with `chosen` and `rejected`")
    fails_fast("evaluate: missing file", evaluate("eval=nll", f"eval.datasets=[{files['missing']}]"),
               "eval: no file for set(s) {'nowhere':")
    fails_fast("evaluate: wrong field", evaluate("eval=instruct", f"eval.datasets=[{files['pairs']}]"),
               "pairs.jsonl line 1: missing field 'output' (this line holds `chosen`/`rejected`")
    fails_fast("evaluate: wrong field (pairs)", evaluate("eval=preference", f"eval.dataset={files['records']}"),
               "records.jsonl line 1: missing field 'chosen' (this line holds `output`: an instruction record")
    fails_fast("evaluate: incompatible keys", evaluate("eval=nll", "eval.max_prompt_length=1024"),
               "eval.max_prompt_length=1024 with eval.max_length=1024")
    fails_fast("evaluate: no model", evaluate("model.path=null"), "model.path: null (and no model.adapter)")
    fails_fast("evaluate: wrong type", evaluate("eval.limit=abc"), "eval.limit='abc': expects an integer ≥ 1 or null")
    fails_fast("evaluate: out of range", evaluate("eval=preference", "eval.beta=0"),
               "eval.beta=0: expects a number > 0")
    fails_fast("evaluate: unknown key", evaluate("+model.revison=main"),
               "model.revison: unknown key (accepted: path, adapter, tokenizer_path, dtype, device)")
    fails_fast("evaluate: unknown protocol", evaluate("eval.protocol=rouge"),
               "eval.protocol='rouge': expects one of instruct, nll, preference")


# ------------------------------------------------------------------------------------------------ prefkd.generate
def test_generate(tmp_path, files, no_models):
    from prefkd.generate import run

    def generate(*overrides):
        base = ("model.path=unused", f"out={tmp_path / 'gen.jsonl'}", "device=cpu")
        return lambda: run(composed("generate", *base, *overrides))

    records = ("dataset=jsonl", f"dataset.source.train={files['records']}")
    fails_fast("generate: too few records", generate(*records, "split=test"),
               "split='test': dataset jsonl(records.jsonl) has no test records (train: 3, dev: 0, test: 0)")
    fails_fast("generate: missing file", generate("dataset=jsonl", f"dataset.source.train={files['missing']}"),
               "nowhere.jsonl: not found")
    fails_fast("generate: wrong field", generate("dataset=jsonl", f"dataset.source.train={files['pairs']}"),
               "missing field 'output' (this line holds `chosen`/`rejected`")
    fails_fast("generate: incompatible keys", generate("dataset=hh"), "holds preference pairs")
    fails_fast("generate: wrong type", generate("num_samples=abc"), "num_samples='abc': expects an integer ≥ 1")
    fails_fast("generate: out of range", generate("sampling.top_p=0"),
               "sampling.top_p=0: expects a number in (0, 1]")
    fails_fast("generate: unknown key", generate("+sampling.topp=0.9"),
               "sampling.topp: unknown key; did you mean sampling.top_p?")


# ------------------------------------------------------------------------------------------------ prefkd.teacher_cache
def test_teacher_cache(tmp_path, files, no_models):
    from prefkd.training.teacher_cache import build

    def cache(*overrides):
        base = ("model=tiny_same", "loss=kd", "logger=none", "run_name=t", "trainer.device=cpu",
                f"cache.dir={tmp_path / 'cache'}")
        return lambda: build(composed("teacher_cache", *base, *overrides))

    records = ("dataset=jsonl", f"dataset.source.train={files['records']}")
    fails_fast("teacher_cache: too few records", cache(*records, "dataset.source.dev_size=3"),
               "cannot carve 3 dev examples out of 3 training examples")
    fails_fast("teacher_cache: missing file", cache("dataset=jsonl", f"dataset.source.train={files['missing']}"),
               "nowhere.jsonl: not found")
    fails_fast("teacher_cache: wrong field", cache("dataset=jsonl", f"dataset.source.train={files['pairs']}"),
               "missing field 'output'")
    fails_fast("teacher_cache: incompatible keys", cache("teacher=none"),
               "teacher: empty (teacher=none), but a teacher cache holds a teacher's outputs")
    fails_fast("teacher_cache: wrong type", cache("cache.store=logits"),
               "cache.store='logits': expects one of topk, hidden")
    fails_fast("teacher_cache: out of range", cache("cache.top_k=0"), "cache.top_k=0: expects an integer ≥ 1")
    fails_fast("teacher_cache: unknown key", cache("+cache.topk=5"),
               "cache.topk: unknown key; did you mean cache.top_k?")
    assert not (tmp_path / "cache").exists()  # nothing written


# ------------------------------------------------------------------------------------------- prefkd.reference_logps
def test_reference_logps(tmp_path, files, no_models):
    from prefkd.reference_logps import run

    def logps(*overrides):
        base = ("model.path=unused", f"dataset.source.train={files['pairs']}", f"output={tmp_path / 'ref.jsonl'}")
        return lambda: run(composed("reference_logps", *base, *overrides), tmp_path)

    fails_fast("reference_logps: too few records", logps(f"dataset.source.train={files['empty']}"),
               "the file holds no preference pairs")
    fails_fast("reference_logps: missing file", logps(f"dataset.source.train={files['missing']}"),
               "nowhere.jsonl: not found")
    fails_fast("reference_logps: wrong field", logps(f"dataset.source.train={files['records']}"),
               "missing field 'chosen' (this line holds `output`: an instruction record")
    fails_fast("reference_logps: incompatible keys", logps("dataset=hh_sft"),
               "dataset: prefkd.reference_logps reads preference pairs (chosen/rejected)")
    fails_fast("reference_logps: unset key", lambda: run(composed("reference_logps"), tmp_path),
               "the configuration leaves model.path unset")
    fails_fast("reference_logps: out of range", logps("batch_size=0"), "batch_size=0: expects an integer ≥ 1")
    fails_fast("reference_logps: unknown key", logps("+model.revison=main"), "model.revison: unknown key")


# ------------------------------------------------------------------------------------------------ prefkd.weights
def test_weights(tmp_path, files, no_models):
    from prefkd.weights.__main__ import run

    def weights(*overrides):
        base = ("positive.path=unused", "negative.path=unused", f"dataset.source.train={files['pairs']}",
                f"output={tmp_path / 'w.jsonl'}")
        return lambda: run(composed("weights", *base, *overrides), tmp_path)

    fails_fast("weights: too few records", weights("dataset.source.limit=0"), "no pair left to weight (limit=0")
    fails_fast("weights: missing file", weights(f"dataset.source.train={files['missing']}"),
               "nowhere.jsonl: not found")
    fails_fast("weights: wrong field", weights(f"dataset.source.train={files['records']}"),
               "missing field 'chosen' (this line holds `output`")
    fails_fast("weights: incompatible keys", weights("weights.lower=2", "weights.upper=1"),
               "weights.lower=2 is above weights.upper=1: the clamp [lower, upper] is empty")
    fails_fast("weights: wrong type", weights("weights.transform=rank"),
               "weights.transform='rank': expects one of origin, binary, threshold")
    fails_fast("weights: unknown key", weights("+weights.params.treshold={lo: 1}"),
               "weights.params.treshold: unknown transform")
    fails_fast("weights: missing policy tokenizer", weights(f"policy.path={tmp_path / 'no-student'}"), "no-student")


# ------------------------------------------------------------------------------------------------ prefkd.term_gradients
def test_term_gradients(tmp_path, files, no_models):
    from prefkd.term_gradients import term_gradients

    def terms(*overrides):
        base = ("model=tiny", "logger=none", "run_name=t", "trainer.device=cpu")
        return lambda: term_gradients(composed("term_gradients", *base, *overrides))

    fails_fast("term_gradients: missing file", terms("dataset=jsonl", f"dataset.source.train={files['missing']}"),
               "nowhere.jsonl: not found")
    fails_fast("term_gradients: unknown loss key in a term", terms("+terms.mix={kd_rat: 0.5}"),
               "terms.mix.kd_rat: unknown key; did you mean terms.mix.kd_rate?")
    fails_fast("term_gradients: incompatible keys", terms("differences.kd_tea=[kd,kd_teacher]"),
               "differences.kd_tea: 'kd_teacher' is not a term (terms: ce, kd, kd_stu)")
    fails_fast("term_gradients: out of range", terms("examples=0"), "examples=0: expects an integer ≥ 1")


# ------------------------------------------------------------------------------------------------ prefkd.data fetch
def test_data_fetch(tmp_path, capsys):
    from prefkd.data.fetch import main

    def fetch(*argv):
        def call():
            if main(["fetch", *argv]) == 2:
                raise ValueError(capsys.readouterr().err)
        return call

    fails_fast("data fetch: unknown set", fetch("dolly", "vicunna"), "unknown set(s) vicunna")
    fails_fast("data fetch: missing folder", fetch("vicuna", "--from", str(tmp_path / "nowhere")),
               f"--from {tmp_path / 'nowhere'}: no such folder")
    (tmp_path / "copies" / "vicuna").mkdir(parents=True)
    fails_fast("data fetch: a set without its copy", fetch("vicuna", "dolly", "--from", str(tmp_path / "copies")),
               "dolly: no local copy of databricks/databricks-dolly-15k under --from")
    (tmp_path / "file").write_text("")
    fails_fast("data fetch: --dir is a file", fetch("vicuna", "--dir", str(tmp_path / "file" / "data")),
               f"{tmp_path / 'file'} is a file, not a folder")
    jsonl(tmp_path / "copies" / "vicuna" / "valid.jsonl", [{"question": "Hi?"}])
    fails_fast("data fetch: wrong field", fetch("vicuna", "--from", str(tmp_path / "copies"),
                                                "--dir", str(tmp_path / "data")),
               "no string field 'instruction' (fields: ['question'])")


# ------------------------------------------------------------------------------------------------ prefkd.report
def test_report(tmp_path, capsys):
    from prefkd.report.cli import main

    def report(*argv):
        def call():
            try:
                code = main([*argv])
            except SystemExit as e:  # argparse's usage errors
                code = e.code
            if code == 2:
                raise ValueError(capsys.readouterr().err)
        return call

    (tmp_path / "runs").mkdir()
    fails_fast("report: nothing to report", report(str(tmp_path / "runs"), "--out", str(tmp_path / "r")),
               "no run directories (train_summary.json) and no evaluation results (results.json) under")
    fails_fast("report: missing folder", report(str(tmp_path / "nowhere")), "no such directory:")
    (tmp_path / "runs" / "results.json").write_text('{"model": "x", "sets": ')
    fails_fast("report: a corrupt results.json", report(str(tmp_path / "runs"), "--out", str(tmp_path / "r")),
               "nothing to report under")
    (tmp_path / "runs" / "results.json").write_text('{"model": "x", "accuracy": 0.5}')
    fails_fast("report: results.json of no known shape", report(str(tmp_path / "runs"), "--out", str(tmp_path / "r")),
               "results.json: neither instruction results (no 'sets') nor preference results: skipped")
    (tmp_path / "file").write_text("")
    fails_fast("report: --out is a file", report(str(tmp_path / "runs"), "--out", str(tmp_path / "file")),
               "a file, not a folder")
    fails_fast("report: unknown metric", report(str(tmp_path / "runs"), "--metric", "rouge"), "--metric 'rouge'")


# ------------------------------------------------------------------------------------------------ the pipeline script
PIPELINE_CASES = [  # (environment, what the message says)
    ({"N_TRAIN": "256", "N_TEST": "64"},
     "DATA has 40 pairs; N_TRAIN + N_TEST = 320 (lower N_TRAIN/N_TEST or give more pairs)"),
    ({"DATA": "{tmp}/nowhere.jsonl"}, "/nowhere.jsonl: no such file (expected a JSONL of preference pairs)"),
    ({"DATA": "{tmp}/records.jsonl"}, "missing field 'chosen' (this line holds `output`: an instruction record"),
    ({"WEIGHT_PAIRS": "30"}, "WEIGHT_PAIRS=30: above N_TRAIN=20: only training pairs get weights"),
    ({"DEV_SIZE": "20"}, "DEV_SIZE=20: the dev pairs are carved from the 20 training pairs"),
    ({"STEPS": "abc"}, "STEPS=abc: expects a whole number ≥ 0"),
    ({"LOSS": "kd"}, "LOSS=kd: expects one of: kd_tisdpo tisdpo_kdalign"),
    ({"MODEL": "huge"}, "MODEL=huge: use tiny, smollm or prefkd"),
]


def test_the_pipeline_script_checks_its_settings_before_the_first_stage(tmp_path):
    """``run_train/prefkd_pipeline.sh`` with 40 pairs (the example of issue 19) and other bad settings: each stops
    before any stage starts (no stage folder is made), in under 10 s, naming the setting."""
    jsonl(tmp_path / "pairs.jsonl", [{**PAIR, "chosen": f" {i}"} for i in range(40)])
    jsonl(tmp_path / "records.jsonl", [RECORD] * 40)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "PYTHON": sys.executable,
           "MODEL": "tiny", "DATA": str(tmp_path / "pairs.jsonl"), "N_TRAIN": "20", "N_TEST": "10"}
    for case, (settings, message) in enumerate(PIPELINE_CASES):
        out = tmp_path / f"out{case}"
        start = time.perf_counter()
        res = subprocess.run(["bash", str(REPO / "run_train/prefkd_pipeline.sh"), str(out)], capture_output=True,
                             text=True, timeout=60,
                             env={**env, **{k: v.format(tmp=tmp_path) for k, v in settings.items()}})
        seconds = time.perf_counter() - start
        print(f"\n[pipeline: {settings}] ({seconds:.1f} s) {res.stderr.strip()}")
        assert res.returncode != 0 and message in res.stderr, (settings, res.stdout, res.stderr)
        assert seconds < FAST and not (out / "teacher_sft").exists(), settings


# ------------------------------------------------------------------------------------------------ schema == YAML
def yaml_keys(path: Path) -> set[str]:
    return set(yaml.safe_load(path.read_text()) or {}) - {"defaults"}


def nested_keys(data: dict, prefix: str = "") -> set[str]:
    """Dotted keys of a YAML mapping, descending into the nodes the schema describes field by field."""
    out = set()
    for k, v in data.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k in ("eval", "on_policy", "win_rate"):
            out |= nested_keys(v, f"{prefix}{k}.")
    return out


def schema_keys(schema, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(schema):
        out.add(prefix + f.name)
        if isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
            out |= schema_keys(f.type, f"{prefix}{f.name}.")
    return out


def test_every_group_schema_holds_exactly_the_keys_of_its_yaml_files():
    """trainer, dataset (outside source), eval (per protocol), logger (per backend): the keys of the YAML files are
    the schema's, neither more nor fewer."""
    from prefkd.training.schema import groups

    trainer = set().union(*(nested_keys(yaml.safe_load(p.read_text())) for p in (CONFIG / "trainer").glob("*.yaml")))
    assert trainer == schema_keys(groups.Trainer)
    dataset = set().union(*(yaml_keys(p) for p in (CONFIG / "dataset").glob("*.yaml")))
    assert dataset == schema_keys(groups.Dataset)
    for protocol, schema in groups.EVAL.options.items():
        assert nested_keys(yaml.safe_load((CONFIG / "eval" / f"{protocol}.yaml").read_text())) == schema_keys(schema)
        assert schema_keys(groups.FINAL_EVAL.options[protocol]) == schema_keys(schema) | {"enabled"}
    for backend, schema in groups.LOGGER.options.items():
        assert yaml_keys(CONFIG / "logger" / f"{backend}.yaml") == schema_keys(schema)


@pytest.mark.parametrize("entry", ["train", "evaluate", "generate", "teacher_cache", "reference_logps", "weights",
                                   "term_gradients"])
def test_every_entry_schema_holds_the_keys_of_its_config(entry):
    """config/<entry>.yaml's own top-level keys are in its schema; every key the schema requires is in the composed
    config."""
    from prefkd.training.schema.entries import ENTRIES

    schema = ENTRIES[entry]
    assert yaml_keys(CONFIG / f"{entry}.yaml") <= {f.name for f in dataclasses.fields(schema)}
    cfg = composed(entry)
    required = {f.name for f in dataclasses.fields(schema) if not f.metadata["optional"]}
    assert required <= set(cfg.keys()), required - set(cfg.keys())


def test_every_schema_field_says_what_it_is_for():
    from prefkd.training.schema import entries, groups

    for module in (groups, entries):
        for schema in vars(module).values():
            if isinstance(schema, type) and dataclasses.is_dataclass(schema) and schema.__module__ == module.__name__:
                for f in dataclasses.fields(schema):
                    assert len(f.metadata.get("doc", "")) > 5, f"{schema.__name__}.{f.name}"


def test_the_schema_follows_the_code_it_describes():
    """The keys the schema lists where the code has its own list: sampling, on-policy, teacher placement, weight
    transforms."""
    from prefkd.eval.generation import Sampling
    from prefkd.training.on_policy import OnPolicySettings
    from prefkd.training.schema import entries, groups
    from prefkd.training.teacher_placement import TeacherPlacement
    from prefkd.weights.transforms import TRANSFORMS

    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    assert names(groups.SamplingKeys) == names(Sampling) - {"truncation_side"}
    assert names(groups.OnPolicy) == names(OnPolicySettings)
    assert names(groups.TeacherPlacementKeys) == names(TeacherPlacement)
    assert set(entries.WEIGHT_TRANSFORMS) == set(TRANSFORMS)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["teacher", "student", "model", "loss", "dataset", "trainer", "logger",
                                   "experiment"])
def test_every_shipped_config_passes_the_schema(group):
    """Every option of every group (and every experiment), composed into the train config, has no problem: the
    schema refuses nothing the repository ships (``???`` keys are the entry points' own check)."""
    from prefkd.training.schema import entry_problems

    for option in options(group):
        assert entry_problems(composed("train", f"{group}={option}", "run_name=x"), "train") == [], option
    if group == "loss":
        for option in options("term_split"):
            assert entry_problems(composed("term_gradients", f"loss={option}", "run_name=x"), "term_gradients") == []
    if group == "dataset":
        for option in options("eval"):
            cfg = composed("evaluate", f"eval={option}", "model.path=x", "output_dir=o")
            assert entry_problems(cfg, "evaluate") == [], option
            assert entry_problems(composed("train", f"eval@final_eval={option}", "run_name=x"), "train") == []


@dataclasses.dataclass
class Node:
    """A schema of two keys (its annotations are strings here: the checker resolves them)."""

    size: int = key("how many", ge=1)
    mode: Literal["fast", "slow"] = key("how")


def test_problem_lines_name_the_key_and_what_it_accepts():
    """The checker's words: ranges, unions, choices, lists; several problems become one error listing all."""
    from prefkd.utils.config_schema import ConfigError, check
    from prefkd.utils.config_types import Limits, describe

    assert describe(int | None, Limits(ge=1)) == "an integer ≥ 1 or null"
    assert describe(float, Limits(ge=0, lt=1)) == "a number in [0, 1)"
    assert describe(list[float], Limits(length=2)) == "a list of 2 numbers"
    assert describe(list[str], Limits(nonempty=True)) == "a non-empty list of strings"
    assert describe(Literal["a", "b"]) == "one of a, b"

    assert check({"size": 0, "mode": "fast"}, Node, "x") == ["x.size=0: expects an integer ≥ 1"]
    assert check({"size": True, "mode": "fast"}, Node, "x") == ["x.size=True: expects an integer ≥ 1"]
    problems = check({"sise": 2}, Node, "x")
    assert problems == ["x.sise: unknown key; did you mean x.size? (accepted: size, mode)",
                        "x.size: missing; expects an integer ≥ 1 (how many)",
                        "x.mode: missing; expects one of fast, slow (how)"]
    assert str(ConfigError(problems)).startswith("3 problems in the configuration:\n  - x.sise: unknown key")
