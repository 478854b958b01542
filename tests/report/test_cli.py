"""The command line: errors, exit codes, several pairs, a report without evaluations, `python -m`."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import pytest

from prefkd.report.cli import main
from prefkd.report.tables import TRAINING_COLUMNS
from tests.helpers.report_runs import make_run


def test_missing_dir_is_an_error_naming_it(tmp_path, capsys):
    make_run(tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "run"), str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert f"no such directory: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_nothing_found_exits_2_naming_the_files_looked_for(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "train_summary.json" in err and "results.json" in err and str(tmp_path / "empty") in err


def test_bad_metric_is_refused(tmp_path):
    make_run(tmp_path / "run")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--metric", "bogus"])


def test_without_evaluations_report_csv_holds_the_training_table(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job, kd_rate in enumerate(("0.001", "0.01", "0.1")):
        make_run(sweep / str(job), sweep_dir=sweep, job_num=job, overrides={"loss.kd_rate": kd_rate},
                 dev=((0, 5.0, None), (4, 4.0 + job, None)))
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out), "--title", "KD rate"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'report.md'}" in printed and "| run | pair | method |" in printed
    rows = list(csv.reader(io.StringIO((out / "report.csv").read_text())))
    assert rows[0] == list(TRAINING_COLUMNS) and len(rows) == 4
    assert rows[0][:10] == ["run", "pair", "method", "swept", "steps", "final_loss", "best_metric", "best_value",
                            "tokens_per_s", "peak_mem_mb"]
    assert [r[3] for r in rows[1:]] == ["loss.kd_rate=0.001", "loss.kd_rate=0.01", "loss.kd_rate=0.1"]
    assert (out / "report.csv").read_text() == (out / "training.csv").read_text()
    md = (out / "report.md").read_text()
    assert md.startswith("# KD rate\n") and "No instruction evaluation results" in md
    assert {p.name for p in out.glob("*.png")} == {"train_loss.png", "dev_metrics.png", "sweep_loss.kd_rate.png"}


def test_several_pairs_get_a_table_and_a_bar_chart_each(tmp_path):
    make_run(tmp_path / "a", pair="gpt2", method="sft", scores={"dolly": {10: 10.0, 20: 11.0}})
    make_run(tmp_path / "b", pair="tinyllama", method="sft", scores={"dolly": {10: 20.0}, "vicuna": {10: 30.0}})
    out = tmp_path / "out"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "### pair gpt2\n\n| method | dolly | Avg. |\n" in md
    assert "### pair tinyllama\n\n| method | dolly | vicuna | Avg. |\n" in md
    for pair in ("gpt2", "tinyllama"):
        assert (out / f"rougeL_by_set_{pair}.png").read_bytes().startswith(b"\x89PNG")
    header = (out / "report.csv").read_text().splitlines()[0]
    assert header == "pair,method,swept,n_runs,dolly_mean,dolly_std,vicuna_mean,vicuna_std,avg_mean,avg_std"


def test_python_dash_m(tmp_path):
    make_run(tmp_path / "runs" / "r", scores={"dolly": {10: 10.0, 20: 11.0}})
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-m", "prefkd.report", str(tmp_path / "runs"), "--out", str(out),
                           "--metric", "dev/rougeL"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| kd | 10.50 ± 0.50 | 10.50 ± 0.50 |" in done.stdout and f"wrote {out / 'report.csv'}" in done.stdout
    helped = subprocess.run([sys.executable, "-m", "prefkd.report", "--help"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert "default: report/" in helped.stdout and "--metric" in helped.stdout
