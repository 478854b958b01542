"""The held-out NLL tables over an MCW-KD-style output directory in miniature: 2 methods × 2 training seeds, each
run with eval_nll/ (4 sets) and eval_rouge/ (2 sets, 2 evaluation seeds) of its best checkpoint, plus reference
evaluations of the teacher and of the untrained student outside any run; and `--note`."""

from __future__ import annotations

import contextlib
import csv
import io
import statistics

import pytest

from prefkd.eval.report import mean_std
from prefkd.report.cli import main
from prefkd.report.collect import collect
from prefkd.report.groups import auto_metric, nll_rows, result_rows, run_metric, swept_keys
from tests.helpers.report_runs import EVAL_SEEDS, SETS, make_run, md_row, nll_results, results, write_json

NLL_SETS = ("dolly", "self_inst", "vicuna", "sinst")
METHODS = ("kd", "mcw_kd")
SEEDS = (1, 2)
NOTES = ["Made by `bash scripts/mini_table.sh OUTDIR` (wall time 12 min 3 s).", "Second paragraph: limit=5."]
TEACHER = {name: (1.1 + 0.1 * i, 0.9 + 0.02 * i) for i, name in enumerate(NLL_SETS)}  # (nats/token, bits/byte)
STUDENT = {name: (3.0 + 0.1 * i, 2.5 + 0.02 * i) for i, name in enumerate(NLL_SETS)}


def bpb(m: int, seed: int, i: int) -> float:
    return 1.0 + 0.1 * m + 0.03 * seed + 0.05 * i + 0.011 * seed * i


def nats(m: int, seed: int, i: int) -> float:
    return 1.3 * bpb(m, seed, i) + 0.2 + 0.007 * seed


def rouge(m: int, seed: int, i: int, eval_seed: int) -> float:
    return 20 + 2 * m + seed + 3 * i + 0.1 * eval_seed


def fmt4(values: list[float]) -> str:
    return "{:.4f} ± {:.4f}".format(*mean_std(values))


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("outdir")
    for m, method in enumerate(METHODS):
        for seed in SEEDS:
            make_run(root / "runs" / method / f"seed{seed}", pair="gpt2", method=method, seed=seed,
                     overrides={"experiment": f"gpt2_{method}", "trainer.seed": str(seed)}, eval_dir="eval_rouge",
                     scores={name: {s: rouge(m, seed, i, s) for s in EVAL_SEEDS} for i, name in enumerate(SETS)},
                     nll={name: (nats(m, seed, i), bpb(m, seed, i)) for i, name in enumerate(NLL_SETS)})
    reference = root / "reference"
    write_json(reference / "teacher" / "eval_nll" / "results.json", nll_results("/ckpt/qwen-teacher", TEACHER))
    write_json(reference / "teacher" / "eval_rouge" / "results.json",
               results("/ckpt/qwen-teacher", {"dolly": {10: 30.0, 20: 31.0}, "self_inst": {10: 25.0, 20: 27.0}}))
    write_json(reference / "student_init" / "eval_nll" / "results.json",
               nll_results("gpt2", STUDENT, label="student (no training)"))
    write_json(reference / "student_init" / "eval_rouge" / "results.json",
               {**results("gpt2", {"dolly": {10: 10.0, 20: 12.0}}), "label": "student (no training)"})
    return root


@pytest.fixture(scope="module")
def report(outdir):
    out = outdir / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([str(outdir), "--out", str(out), "--title", "MCW-KD in miniature",
                     *(arg for note in NOTES for arg in ("--note", note))])
    assert code == 0
    return out, (out / "report.md").read_text(), printed.getvalue()


def section(md: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of its level or above."""
    level = len(heading.split(" ")[0])
    lines = md.split(heading + "\n", 1)[1].splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("#") and len(line.split(" ")[0]) <= level),
               len(lines))
    return "\n".join(lines[:end])


def test_both_evaluations_of_a_run_are_attached(outdir):
    c = collect([outdir])
    assert len(c.runs) == 4 and len(c.evaluations) == 12
    for run in c.runs:
        assert sorted((e.kind, e.path.parent.name, e.tag) for e in run.evaluations) == [
            ("instruct", "eval_rouge", "best"), ("nll", "eval_nll", "best")]
    references = {c.rel(e.path): e.kind for e in c.evaluations if e.run is None}
    assert references == {"reference/teacher/eval_nll/results.json": "nll",
                          "reference/teacher/eval_rouge/results.json": "instruct",
                          "reference/student_init/eval_nll/results.json": "nll",
                          "reference/student_init/eval_rouge/results.json": "instruct"}


def test_bpb_table_pools_the_runs_and_shows_the_references(report):
    _, md, printed = report
    table = section(md, "### Bits per byte")
    assert "| method | n | dolly | self_inst | vicuna | sinst | Avg. |" in table
    for m, method in enumerate(METHODS):
        cells = [fmt4([bpb(m, seed, i) for seed in SEEDS]) for i in range(len(NLL_SETS))]
        averages = [statistics.fmean(bpb(m, seed, i) for i in range(len(NLL_SETS))) for seed in SEEDS]
        assert md_row(table, method) == ["2", *cells, fmt4(averages)]
        assert md_row(section(printed, "### Bits per byte"), method) == ["2", *cells, fmt4(averages)]  # printed
        assert f"- {method}: 2 runs (training seeds 1, 2)" in table
    teacher = [f"{TEACHER[name][1]:.4f}" for name in NLL_SETS]
    average = statistics.fmean(v[1] for v in TEACHER.values())
    assert md_row(table, "reference/teacher") == ["1", *teacher, f"{average:.4f}"]  # n = 1, no std
    assert md_row(table, "student (no training)")[:2] == ["1", f"{STUDENT['dolly'][1]:.4f}"]
    assert "- reference/teacher: 1 results.json (model /ckpt/qwen-teacher)" in table
    assert "lower is better" in table and "compare across tokenizers" in table
    assert table.count("\n| ") == 1 + 4


def test_nats_per_token_table(report):
    table = section(report[1], "### Nats per token")
    cells = [fmt4([nats(1, seed, i) for seed in SEEDS]) for i in range(len(NLL_SETS))]
    assert md_row(table, "mcw_kd")[:-1] == ["2", *cells]
    assert md_row(table, "reference/teacher")[1] == f"{TEACHER['dolly'][0]:.4f}"
    assert "lower is better" in table and "Not comparable across tokenizers" in table


def test_nll_csv_has_the_same_rows(report):
    out = report[0]
    rows = list(csv.reader(io.StringIO((out / "nll.csv").read_text())))
    figures = [*NLL_SETS, "avg"]
    assert rows[0] == ["pair", "method", "swept", "n_runs", *(f"{name}_{metric}_{stat}" for metric in ("bpb", "nll")
                                                            for name in figures for stat in ("mean", "std"))]
    by_method = {r[1]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert list(by_method) == [*METHODS, "student (no training)", "reference/teacher"]
    kd = by_method["kd"]
    assert (kd["pair"], kd["swept"], kd["n_runs"]) == ("gpt2", "", "2")
    for i, name in enumerate(NLL_SETS):
        for metric, value in (("bpb", bpb), ("nll", nats)):
            mean, std = mean_std([value(0, seed, i) for seed in SEEDS])
            assert float(kd[f"{name}_{metric}_mean"]) == pytest.approx(mean, abs=1e-4)
            assert float(kd[f"{name}_{metric}_std"]) == pytest.approx(std, abs=1e-4)
    teacher = by_method["reference/teacher"]
    assert teacher["pair"] == "" and teacher["n_runs"] == "0"
    assert float(teacher["vicuna_bpb_mean"]) == pytest.approx(TEACHER["vicuna"][1]) and teacher["vicuna_bpb_std"] == ""


def test_rouge_table_has_the_runs_and_the_references_only(report):
    out, md, _ = report
    table = section(md, "## ROUGE-L")
    assert table.count("\n| ") == 1 + 4  # kd, mcw_kd, teacher, student: no row for the NLL results
    assert md_row(table, "reference/teacher")[0] == "30.50 ± 0.50"
    assert md_row(table, "student (no training)") == ["11.00 ± 1.00", "–", "11.00 ± 1.00"]
    assert [r.split(",")[1] for r in (out / "report.csv").read_text().splitlines()[1:]] == [
        *METHODS, "student (no training)", "reference/teacher"]  # references in path order
    assert "12 evaluation result(s) (6 instruction, 6 NLL, 0 preference)" in md


def test_notes_bpb_plot_and_outputs(report):
    out, md, printed = report
    assert md.startswith("# MCW-KD in miniature\n")
    notes = section(md, "## How this was made")
    assert notes.strip() == "\n\n".join(NOTES)
    assert md.index("## How this was made") < md.index("## ROUGE-L") < md.index("## Held-out NLL")
    data = (out / "bpb_by_set.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert "](bpb_by_set.png)" in md and "](rougeL_by_set.png)" in md
    assert f"wrote {out / 'nll.csv'}" in printed


def test_avg_bpb_is_a_sweep_metric(outdir, tmp_path):
    c = collect([outdir])
    run = next(r for r in c.runs if r.method == "kd" and r.seed == 2)
    assert run_metric(run, "avg_bpb") == pytest.approx(statistics.fmean(bpb(0, 2, i) for i in range(len(NLL_SETS))))
    assert auto_metric(c.runs) == "avg_rougeL"
    for r in c.runs:
        r.evaluations = [e for e in r.evaluations if e.kind == "nll"]
    assert auto_metric(c.runs) == "avg_bpb"
    sweep = tmp_path / "sweep"
    for job, rate in enumerate(("0.1", "0.5")):
        make_run(sweep / str(job), sweep_dir=sweep, overrides={"loss.kd_rate": rate}, job_num=job,
                 nll={"dolly": (2.0, 1.5 - 0.1 * job)})
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--metric", "avg_bpb"]) == 0
    assert (tmp_path / "out" / "sweep_loss.kd_rate.png").read_bytes().startswith(b"\x89PNG")
    assert "No instruction evaluation results" in (tmp_path / "out" / "report.md").read_text()


def test_a_reference_given_as_a_file_is_labelled_by_its_model(outdir):
    c = collect([outdir / "reference" / "teacher" / "eval_nll" / "results.json"])
    rows = nll_rows(c, swept_keys(c.runs))
    assert [r.label for r in rows["bpb"]] == ["/ckpt/qwen-teacher"]
    assert result_rows(c, []) == []
