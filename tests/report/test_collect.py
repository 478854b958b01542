"""Reading runs and results, swept keys, row labels and pooling, without plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from prefkd.report.collect import Run, collect, load_run
from prefkd.report.groups import result_rows, run_metric, sweep_lines, swept_keys
from prefkd.report.plots import axis_kind, safe_name
from prefkd.report.readers import read_metrics
from tests.helpers.report_runs import make_run, results, write_json


def run(path: str, overrides: dict, sweep: str | None = None, **kw) -> Run:
    return Run(path=Path(path), name="r", pair=kw.get("pair", "tiny"), method=kw.get("method", "kd"),
               seed=None, overrides=overrides, sweep_dir=sweep, summary=kw.get("summary", {}), series={})


def test_swept_keys_differ_within_a_sweep_not_across_sweeps():
    runs = [run("/a/0", {"loss": "kd", "trainer.lr": "1e-3", "trainer.max_steps": "2", "hydra.run.dir": "x"}, "/a"),
            run("/a/1", {"loss": "kd", "trainer.lr": "1e-4", "trainer.max_steps": "2", "hydra.run.dir": "y"}, "/a"),
            run("/b/0", {"loss": "kd", "trainer.seed": "1", "trainer.max_steps": "8"}, "/b"),
            run("/b/1", {"loss": "kd", "trainer.seed": "2", "trainer.max_steps": "8"}, "/b")]
    assert swept_keys(runs) == ["trainer.lr", "trainer.seed"]  # max_steps differs only across sweeps
    # runs outside any sweep (separate commands) are compared with nothing: nobody swept their differences
    assert swept_keys([run(r.path, r.overrides) for r in runs]) == []
    assert swept_keys(runs[:1]) == []
    declared = run("/c/0", {"loss.kd_rate": "0.5", "trainer.lr": "1"}, "/c")
    declared.declared = {"loss.kd_rate"}  # run_info.json's "swept": one job of a sweep is enough
    assert swept_keys([declared]) == ["loss.kd_rate"]


def test_metrics_keep_the_last_value_of_a_repeated_step_and_warn_on_corrupt_lines(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "time": 0, "train/loss": 3.0}, {"step": 2, "time": 0, "train/loss": 2.5},
             {"step": 2, "time": 0, "dev/loss": 2.9}, {"step": 2, "time": 1, "train/loss": 2.4},  # resumed
             {"step": 3, "time": 1, "train/loss": 2.2, "note": "text", "flag": True}]
    text = "\n".join(json.dumps(x) for x in lines[:2]) + "\n[1, 2]\n{\"time\": 3}\n\n"
    path.write_text(text + "\n".join(json.dumps(x) for x in lines[2:]) + "\n{\"step\": 4, \"trai")
    with caplog.at_level(logging.WARNING, logger="prefkd.report"):
        series = read_metrics(path, warnings := [])
    assert series == {"train/loss": {1: 3.0, 2: 2.4, 3: 2.2}, "dev/loss": {2: 2.9}}
    assert [w.split(": corrupt")[0] for w in warnings] == [f"{path}:3", f"{path}:4", f"{path}:9"]
    assert len(caplog.records) == 3


def test_run_without_run_info_falls_back_to_hydra_files(tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-23"
    run_dir = make_run(sweep / "gpt2-multicost" / "trainer.seed=3", run_info=False)  # <sweep>/<run_name>/<k=v>
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["experiment=gpt2_multicost", "+trainer.extra=1", "trainer.seed=3", "~logger"]))
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"model": "gpt2", "loss": "multicost", "experiment": "gpt2_multicost"}}}}))
    r = load_run(run_dir, [])
    assert (r.pair, r.method, r.sweep_dir, r.seed) == ("gpt2", "multicost", str(sweep), 42)
    assert r.overrides == {"experiment": "gpt2_multicost", "trainer.extra": "1", "trainer.seed": "3"}
    assert not r.has_run_info
    plain = load_run(make_run(tmp_path / "outputs" / "x", pair="tinyllama", method="uld", run_info=False), [])
    assert (plain.pair, plain.method, plain.overrides, plain.sweep_dir) == ("tinyllama", "uld", {}, None)


def test_corrupt_json_files_are_skipped_not_fatal(tmp_path, caplog):
    broken = make_run(tmp_path / "broken", scores={"dolly": {10: 1.0}})
    (broken / "train_summary.json").write_text('{"steps": 3, "fini')
    (broken / "eval" / "results.json").write_text("[]")
    write_json(tmp_path / "odd" / "results.json", {"model": "m", "something": 1})
    with caplog.at_level(logging.WARNING, logger="prefkd.report"):
        c = collect([tmp_path])
    assert [r.path.name for r in c.runs] == ["broken"] and c.runs[0].summary == {} and c.evaluations == []
    assert any("train_summary.json: cannot read JSON" in w for w in c.warnings)
    assert any("results.json: holds a list" in w for w in c.warnings)
    assert any("odd/results.json: neither" in w for w in c.warnings)


def test_results_attach_via_model_or_adapter_and_checkpoints_get_their_own_rows(tmp_path):
    a = make_run(tmp_path / "runs" / "a", scores={"dolly": {10: 10.0, 20: 12.0}})
    write_json(tmp_path / "evals" / "a_last" / "results.json",
               results(str(a / "checkpoints" / "last"), {"dolly": {10: 20.0, 20: 22.0}}))
    write_json(tmp_path / "evals" / "lora" / "results.json",
               results("gpt2", {"dolly": {10: 5.0}}, adapter=str(tmp_path / "runs" / "b" / "checkpoints" / "best")))
    make_run(tmp_path / "runs" / "b", method="sft")
    write_json(tmp_path / "evals" / "elsewhere" / "results.json", results("/somewhere/else", {"dolly": {10: 1.0}}))
    c = collect([tmp_path / "runs", tmp_path / "evals"])
    runs = {r.path.name: r for r in c.runs}
    assert sorted(e.tag for e in runs["a"].evaluations) == ["best", "last"]
    assert [e.tag for e in runs["b"].evaluations] == ["best"]
    rows = {r.label: r for r in result_rows(c, swept_keys(c.runs))}
    assert sorted(rows) == ["evals/elsewhere", "kd [best]", "kd [last]", "sft [best]"]  # a reference: its folder
    assert rows["kd [last]"].cells["dolly"] == (21.0, 1.0, 2)
    assert rows["evals/elsewhere"].runs == [] and rows["evals/elsewhere"].pair == ""
    assert rows["evals/elsewhere"].models == ["/somewhere/else"]


def test_rows_differing_outside_the_swept_keys_are_not_pooled(tmp_path):
    for sweep, lr in (("s1", "1e-3"), ("s2", "1e-4")):
        for seed in (1, 2):
            bookkeeping = {"logger": "none", "trainer.num_threads": "1"} if sweep == "s1" else {}  # no split
            make_run(tmp_path / sweep / str(seed), seed=seed, sweep_dir=tmp_path / sweep,
                     overrides={"trainer.lr": lr, "trainer.seed": str(seed), **bookkeeping},
                     scores={"dolly": {10: float(seed) + (lr == "1e-3")}})
    c = collect([tmp_path])
    swept = swept_keys(c.runs)
    assert swept == ["trainer.seed"]
    rows = result_rows(c, swept)
    assert [(r.label, len(r.runs), r.cells["dolly"][:2]) for r in rows] == [
        ("kd (trainer.lr=1e-4)", 2, (1.5, 0.5)), ("kd (trainer.lr=1e-3)", 2, (2.5, 0.5))]  # numeric order


def test_sweep_lines_pool_seeds_and_split_by_other_keys():
    runs = [run(f"/s/{i}", {"loss.w": w, "trainer.lr": lr, "trainer.seed": s}, "/s",
                summary={"best": {"metric": "dev/loss", "value": v, "step": 1}})
            for i, (w, lr, s, v) in enumerate([("0.1", "1", "1", 1.0), ("0.1", "1", "2", 3.0), ("10", "1", "1", 5.0),
                                              ("0.1", "2", "1", 7.0), ("10", "2", "1", 9.0)])]
    swept = swept_keys(runs)
    lines = sweep_lines(runs, "loss.w", swept, "best")
    assert [(line.label, line.points) for line in lines] == [
        ("trainer.lr=1", [("0.1", 2.0, 1.0, 2), ("10", 5.0, 0.0, 1)]),
        ("trainer.lr=2", [("0.1", 7.0, 0.0, 1), ("10", 9.0, 0.0, 1)])]
    assert axis_kind(["0.1", "10"]) == "log" and axis_kind(["1", "10"]) == "linear"
    assert axis_kind(["-1", "1000"]) == "linear" and axis_kind(["kd", "1"]) == "category"
    assert safe_name("sweep_loss.w/a b=c") == "sweep_loss.w_a_b_c"


@pytest.mark.parametrize("metric,expected", [("dev_loss_final", 4.5), ("final_train_loss", 4.1),
                                             ("dev/rougeL", 12.0), ("best", 4.5), ("avg_rougeL", None)])
def test_run_metric(tmp_path, metric, expected):
    r = load_run(make_run(tmp_path / "r"), [])
    assert run_metric(r, metric) == expected
