"""`python -m prefkd.report DIR... [--out OUT] [--metric M] [--title T] [--note TEXT]...`: tables and plots of
runs and results.

Collects every run directory (``train_summary.json``) and every ``results.json`` under the DIRs (searched
recursively) and writes ``OUT/report.md``, ``OUT/report.csv``, ``OUT/training.csv``, ``OUT/nll.csv`` (with NLL
results) and the PNG plots, then prints the results tables (ROUGE-L, bits per byte; else the training table)
and the paths written. Exit codes: 0 written, 2 a DIR missing or nothing found.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from prefkd.report.collect import NothingFound, collect
from prefkd.report.groups import METRICS, ResultRow, auto_metric, nll_rows, result_rows, swept_keys
from prefkd.report.tables import (
    nll_markdown,
    pooled_csv,
    report_markdown,
    results_csv,
    results_markdown,
    training_csv,
    training_markdown,
    training_records,
)
from prefkd.utils.io import atomic_write

EPILOG = """\
outputs (in OUT):
  report.md      notes (--note), ROUGE-L table(s) (rows = method + swept values, columns = sets and Avg.,
                 mean ± std x100; replicate training seeds pooled), held-out NLL tables (bits per byte, then
                 nats per token: mean ± std over the n runs; lower is better), preference table, training
                 table, plots, warnings. Evaluations outside any run (teacher, untrained student) are
                 reference rows, labelled by results.json's "label", else their folder (reference/teacher)
  report.csv     one row per ROUGE-L row: pair,method,swept,n_runs,<set>_mean,<set>_std,...,avg_mean,avg_std;
                 without instruction results: the training table (columns of training.csv)
  nll.csv        with NLL results (eval=nll), one row per NLL row: pair,method,swept,n_runs,
                 <set>_bpb_mean,<set>_bpb_std,...,avg_bpb_mean,avg_bpb_std,<set>_nll_mean,...,avg_nll_std
  training.csv   one row per run: run,pair,method,swept,steps,final_loss,best_metric,best_value,tokens_per_s,
                 peak_mem_mb,finished,best_step,dev_loss_final,seed
  *.png          rougeL_by_set[_<pair>].png, bpb_by_set[_<pair>].png, train_loss.png, dev_metrics.png,
                 sweep_<key>.png

--metric (y axis of the sweep plots): auto (avg_rougeL when runs have instruction results, else avg_bpb when
they have NLL results, else best, else dev_loss_final), avg_rougeL, avg_bpb (lower is better), best (the run's
selection metric at its best), dev_loss_final, final_train_loss, or any metrics.jsonl key such as dev/rougeL
(its best value when it is the selection metric, else its last).

--note TEXT (repeatable): a paragraph of the "How this was made" section at the top of report.md, e.g. the
exact command and its wall time.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m prefkd.report``."""
    parser = argparse.ArgumentParser(prog="python -m prefkd.report", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Tables and plots of training runs and evaluation results found "
                                                 "under run or sweep directories (searched recursively).")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, sweep directories, any folder "
                                                                "holding them, or results.json files")
    parser.add_argument("--out", default="report", metavar="OUT",
                        help="output folder, created if missing (default: report/ in the current directory)")
    parser.add_argument("--metric", default="auto", metavar="M", help="figure of the sweep plots (see below)")
    parser.add_argument("--title", default="prefkd report", help="title of report.md")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="a paragraph of report.md's \"How this was made\" section (repeatable)")
    return parser


def printed_tables(rows: list[ResultRow], nll: dict[str, list[ResultRow]], records: list[dict]) -> str:
    """What the command prints: the ROUGE-L and bits-per-byte tables, else the training table."""
    tables = ([results_markdown(rows)] if rows else []) + ([nll_markdown({"bpb": nll["bpb"]})] if nll["bpb"] else [])
    return "\n".join(tables) if tables else training_markdown(records)


def write_report(dirs: list[str | Path], out: str | Path, *, metric: str = "auto", title: str = "prefkd report",
                 notes: list[str] | tuple[str, ...] = ()) -> tuple[list[Path], str]:
    """Collect ``dirs`` and write report.md, report.csv, training.csv, nll.csv (with NLL results) and the plots
    into ``out``; ``notes`` are the paragraphs of report.md's "How this was made". Returns (paths written, the
    results tables as printed). Raises FileNotFoundError / NothingFound."""
    collection = collect(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    swept = swept_keys(collection.runs)
    rows = result_rows(collection, swept)
    nll = nll_rows(collection, swept)
    records = training_records(collection, swept)
    metric = auto_metric(collection.runs) if metric == "auto" else metric
    from prefkd.report.plots import make_plots  # matplotlib: imported only when a report is written

    plots = make_plots(collection, swept, {"rougeL": rows, "bpb": nll["bpb"]}, metric, out)
    atomic_write(out / "report.md", report_markdown(collection, swept, rows, records, plots, title, nll, notes))
    atomic_write(out / "training.csv", training_csv(records))
    atomic_write(out / "report.csv", results_csv(rows) if rows else training_csv(records))
    written = [out / "report.md", out / "report.csv", out / "training.csv"]
    if nll["bpb"]:
        atomic_write(out / "nll.csv", pooled_csv(nll))
        written.append(out / "nll.csv")
    return written + [out / name for _, name in plots], printed_tables(rows, nll, records)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.metric not in METRICS and "/" not in args.metric:
        parser.error(f"--metric {args.metric!r}: use one of {', '.join(METRICS)} or a metrics.jsonl key (dev/...)")
    missing = [d for d in args.dirs if not Path(d).exists()]
    if missing:
        parser.error("no such directory: " + ", ".join(missing))
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: a file, not a folder; give a folder (created if missing)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        written, table = write_report(args.dirs, args.out, metric=args.metric, title=args.title, notes=args.note)
    except (FileNotFoundError, NothingFound) as err:
        print(f"python -m prefkd.report: error: {err}", file=sys.stderr)
        return 2
    print(table)
    for path in written:
        print(f"wrote {path}")
    return 0
