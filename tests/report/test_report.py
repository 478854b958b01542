"""The whole report over a realistic tree: a 2×2 sweep (λ × training seed), a single run evaluated from
outside its directory, an old run without run_info.json (corrupt last metrics line), a stand-alone teacher
evaluation and a preference evaluation."""

from __future__ import annotations

import csv
import io
import logging
import math

import pytest

from prefkd.report.cli import write_report
from tests.helpers.report_runs import EVAL_SEEDS, SETS, make_run, md_row, results, write_json

SWEEP = [(1, 1), (1, 2), (10, 1), (10, 2)]  # (loss.lambda_logits, trainer.seed)


def score(lam: int, seed: int, set_index: int, eval_seed: int) -> float:
    return (20 + 0.5 * lam + 1.3 * seed + 3.1 * set_index + 0.07 * eval_seed + (seed * eval_seed % 7) * 0.4
            + (set_index + 1) * (eval_seed % 3) * 0.3)


def mean_pstd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def fmt(values: list[float]) -> str:
    return "{:.2f} ± {:.2f}".format(*mean_pstd(values))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sweep = root / "multirun" / "2026-11-23_18-00-00"
    for job, (lam, seed) in enumerate(SWEEP):
        make_run(sweep / f"{job}_loss.lambda_logits={lam},trainer.seed={seed}", method="mcw_kd", seed=seed,
                 sweep_dir=sweep, job_num=job, declared=("loss.lambda_logits", "trainer.seed"),
                 overrides={"model": "tiny", "loss": "mcw_kd", "loss.lambda_logits": str(lam),
                            "trainer.seed": str(seed), "trainer.max_steps": "4"},
                 scores={name: {s: score(lam, seed, i, s) for s in EVAL_SEEDS} for i, name in enumerate(SETS)},
                 losses=(5.0, 4.0 - 0.01 * lam, 3.5, 3.0 + 0.1 * seed), best_metric="dev/rougeL")
    kd = make_run(root / "outputs" / "tiny-kd" / "2026-11-23_17-00-00", overrides={"model": "tiny", "loss": "kd"})
    write_json(root / "evals" / "kd_best" / "results.json",
               results(str(kd / "checkpoints" / "best"), {"dolly": {10: 15.0, 20: 17.5}}))
    make_run(root / "outputs" / "tiny-sft" / "old", method="sft", run_info=False, corrupt_tail=True)
    write_json(root / "evals" / "teacher" / "results.json",
               results("gpt2-xl-teacher", {"dolly": {10: 30.0, 20: 31.0}, "self_inst": {10: 25.0, 20: 27.0}}))
    write_json(root / "evals" / "pref" / "results.json",
               {"model": str(kd / "checkpoints" / "best"), "reference": None, "data": "hh", "rewards/chosen": 0.1,
                "rewards/rejected": -0.1, "rewards/accuracies": 0.625, "rewards/margins": 0.2, "logps/chosen": -50.0,
                "logps/rejected": -55.0, "n": 8, "beta": 0.1})
    return root


@pytest.fixture(scope="module")
def report(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "report"
    logger = logging.getLogger("prefkd.report")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        written, table = write_report([tree], out)
    finally:
        logger.removeHandler(handler)
    return out, written, table, records


def test_results_table_pools_training_seeds_and_averages(report):
    out, _, table, _ = report
    md = (out / "report.md").read_text()
    assert "| method | dolly | self_inst | Avg. |" in md
    for lam in (1, 10):
        runs = [(lam, seed) for l_, seed in SWEEP if l_ == lam]
        expected = [fmt([score(lam, seed, i, s) for _, seed in runs for s in EVAL_SEEDS]) for i in range(len(SETS))]
        averages = [sum(score(lam, seed, i, s) for i in range(len(SETS))) / len(SETS)
                    for _, seed in runs for s in EVAL_SEEDS]
        assert md_row(md, f"mcw_kd (loss.lambda_logits={lam})") == [*expected, fmt(averages)]
        assert md_row(table, f"mcw_kd (loss.lambda_logits={lam})") == [*expected, fmt(averages)]
        assert (f"- mcw_kd (loss.lambda_logits={lam}): 2 runs (training seeds 1, 2) × evaluation seeds 10, 20"
                in md)
    assert md_row(md, "kd") == [fmt([15.0, 17.5]), "–", fmt([15.0, 17.5])]  # attached from outside its run dir
    assert md_row(md, "evals/teacher") == [fmt([30.0, 31.0]), fmt([25.0, 27.0]), fmt([27.5, 29.0])]
    assert "- evals/teacher: 1 results.json (model gpt2-xl-teacher) × evaluation seeds 10, 20" in md
    results_section = md.split("## ROUGE-L")[1].split("## ")[0]
    assert "sft" not in results_section  # not evaluated: no row
    assert results_section.count("\n| ") == 1 + 4  # header and 4 rows


def test_csv_parses_with_expected_header_and_numbers(report):
    out = report[0]
    rows = list(csv.reader(io.StringIO((out / "report.csv").read_text())))
    assert rows[0] == ["pair", "method", "swept", "n_runs", "dolly_mean", "dolly_std", "self_inst_mean",
                       "self_inst_std", "avg_mean", "avg_std"]
    by_label = {(r[1], r[2]): dict(zip(rows[0], r)) for r in rows[1:]}
    assert len(by_label) == 4
    row = by_label[("mcw_kd", "loss.lambda_logits=10")]
    assert row["pair"] == "tiny" and row["n_runs"] == "2"
    mean, std = mean_pstd([score(10, seed, 1, s) for seed in (1, 2) for s in EVAL_SEEDS])
    assert float(row["self_inst_mean"]) == pytest.approx(mean, abs=1e-4)
    assert float(row["self_inst_std"]) == pytest.approx(std, abs=1e-4)
    kd = by_label[("kd", "")]
    assert kd["n_runs"] == "1" and kd["self_inst_mean"] == "" and float(kd["avg_mean"]) == pytest.approx(16.25)
    assert by_label[("evals/teacher", "")]["n_runs"] == "0"
    training = list(csv.DictReader(io.StringIO((out / "training.csv").read_text())))
    assert len(training) == 6
    sft = next(r for r in training if r["method"] == "sft")
    assert sft["run"] == "outputs/tiny-sft/old" and sft["pair"] == "tiny" and float(sft["final_loss"]) == 4.1


def test_training_table_and_swept_keys(report):
    md = (report[0] / "report.md").read_text()
    training = md.split("## Training")[1]
    assert training.count("\n| ") == 1 + 6
    row = md_row(training, "multirun/2026-11-23_18-00-00/3_loss.lambda_logits=10,trainer.seed=2")
    assert row[:4] == ["tiny", "mcw_kd", "loss.lambda_logits=10, trainer.seed=2", "4"]
    assert row[4:] == ["yes", "3.2000", "dev/rougeL 12.0000 (step 4)", "4.5000", "165.2", "812"]
    assert md_row(training, "outputs/tiny-sft/old")[:3] == ["tiny", "sft", "–"]  # no run_info.json
    swept = training.split("Swept keys")[1].splitlines()[0]
    for key in ("loss.lambda_logits", "trainer.seed"):
        assert f"`{key}`" in swept
    for key in ("trainer.max_steps", "loss", "model"):  # the same in the sweep; the other runs are not a sweep
        assert f"`{key}`" not in swept


def test_preference_results_get_their_own_table(report):
    md = (report[0] / "report.md").read_text()
    pref = md.split("## Preference evaluation")[1].split("## ")[0]
    assert md_row(pref, "evals/pref") == ["outputs/tiny-kd/2026-11-23_17-00-00", "–", "hh", "8", "0.6250", "0.2000",
                                          "–"]


def test_corrupt_metrics_line_is_skipped_with_a_warning(report):
    out, _, _, records = report
    message = next(m for m in records if "metrics.jsonl" in m)
    assert "outputs/tiny-sft/old/metrics.jsonl:" in message and "skipped" in message
    line = int(message.split("metrics.jsonl:")[1].split(":")[0])
    assert line == 8  # dev at step 0, 4 train lines, dev at steps 2 and 4, then the half-written line
    assert "## Warnings" in (out / "report.md").read_text()


def test_plots_are_pngs_and_sweeps_only_for_keys_with_several_values(report):
    out, written, _, _ = report
    names = {"rougeL_by_set.png", "train_loss.png", "dev_metrics.png", "sweep_loss.lambda_logits.png"}
    for name in names:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG")
        assert f"]({name})" in (out / "report.md").read_text()
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == names  # none for trainer.seed (pooled), trainer.max_steps or loss (not swept within a sweep)
    assert {p.name for p in written} == names | {"report.md", "report.csv", "training.csv"}
    assert not list(out.glob(".*"))  # no temporary files left behind
