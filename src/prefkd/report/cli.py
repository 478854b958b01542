"""`python -m prefkd.report DIR... [--out OUT] [--metric M] [--title T]`: tables and plots of runs and results.

Collects every run directory (``train_summary.json``) and every ``results.json`` under the DIRs (searched
recursively) and writes ``OUT/report.md``, ``OUT/report.csv``, ``OUT/training.csv`` and the PNG plots, then
prints the paths written and the results table. Exit codes: 0 written, 2 a DIR missing or nothing found.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from prefkd.eval.report import atomic_write
from prefkd.report.collect import NothingFound, collect
from prefkd.report.groups import METRICS, auto_metric, result_rows, swept_keys
from prefkd.report.tables import (report_markdown, results_csv, results_markdown, training_csv, training_markdown,
                                  training_records)


EPILOG = """\
outputs (in OUT):
  report.md      ROUGE-L table(s) (rows = method + swept values, columns = sets and Avg., mean ± std x100;
                 replicate training seeds pooled), preference table, training table, plots, warnings
  report.csv     one row per ROUGE-L row: pair,method,swept,n_runs,<set>_mean,<set>_std,...,avg_mean,avg_std;
                 without instruction results: the training table (columns of training.csv)
  training.csv   one row per run: run,pair,method,swept,steps,final_loss,best_metric,best_value,tokens_per_s,
                 peak_mem_mb,finished,best_step,dev_loss_final,seed
  *.png          rougeL_by_set[_<pair>].png, train_loss.png, dev_metrics.png, sweep_<key>.png

--metric (y axis of the sweep plots): auto (avg_rougeL when runs were evaluated, else best, else
dev_loss_final), avg_rougeL, best (the run's selection metric at its best), dev_loss_final, final_train_loss,
or any metrics.jsonl key such as dev/rougeL (its best value when it is the selection metric, else its last).
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
    return parser


def write_report(dirs: list[str | Path], out: str | Path, *, metric: str = "auto",
                 title: str = "prefkd report") -> tuple[list[Path], str]:
    """Collect ``dirs`` and write report.md, report.csv, training.csv and the plots into ``out``.
    Returns (paths written, the results table as printed). Raises FileNotFoundError / NothingFound."""
    collection = collect(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    swept = swept_keys(collection.runs)
    rows = result_rows(collection, swept)
    records = training_records(collection, swept)
    metric = auto_metric(collection.runs) if metric == "auto" else metric
    from prefkd.report.plots import make_plots  # matplotlib: imported only when a report is written

    plots = make_plots(collection, swept, rows, metric, out)
    atomic_write(out / "report.md", report_markdown(collection, swept, rows, records, plots, title))
    atomic_write(out / "training.csv", training_csv(records))
    atomic_write(out / "report.csv", results_csv(rows) if rows else training_csv(records))
    written = [out / "report.md", out / "report.csv", out / "training.csv"] + [out / name for _, name in plots]
    table = results_markdown(rows) if rows else training_markdown(records)
    return written, table


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.metric not in METRICS and "/" not in args.metric:
        parser.error(f"--metric {args.metric!r}: use one of {', '.join(METRICS)} or a metrics.jsonl key (dev/...)")
    missing = [d for d in args.dirs if not Path(d).exists()]
    if missing:
        parser.error("no such directory: " + ", ".join(missing))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        written, table = write_report(args.dirs, args.out, metric=args.metric, title=args.title)
    except (FileNotFoundError, NothingFound) as err:
        print(f"python -m prefkd.report: error: {err}", file=sys.stderr)
        return 2
    print(table)
    for path in written:
        print(f"wrote {path}")
    return 0
