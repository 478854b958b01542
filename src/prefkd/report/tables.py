"""report.md, report.csv, nll.csv and training.csv.

report.md: the "How this was made" notes (``--note``), the ROUGE-L table(s) in the layout of the paper (rows =
methods, columns = sets then Avg., cells ``mean ± std`` ×100, one table per pair when several), what each row
pools, the held-out NLL tables (bits per byte, then nats per token; cells ``mean ± std`` over runs with the
count n), the preference results (if any), the training table (one row per run), the swept keys, the plots and
any warnings. A cell pooling a single value shows it without ``± std``.

report.csv: one row per ROUGE-L row: ``pair, method, swept (k=v;k=v), n_runs``, ``<set>_mean, <set>_std``
for every set, ``avg_mean, avg_std`` (4 decimals; empty cells where a row lacks a set, an empty std where a
cell pools a single value). A reference row (results.json outside any run) has an empty pair, its label as
method and ``n_runs`` 0; ``method`` ends in ``[best]``, ``[last]``... when a run was evaluated at several
checkpoints. Without any instruction results report.csv holds the training table instead (TRAINING_COLUMNS).

nll.csv (with NLL results): the same layout for the NLL rows, each figure twice: ``<set>_bpb_mean,
<set>_bpb_std, ..., avg_bpb_mean, avg_bpb_std``, then ``<set>_nll_mean, ..., avg_nll_std`` (nats per token).

training.csv (always): one row per run, TRAINING_COLUMNS.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from functools import partial

from prefkd.report.collect import Collection
from prefkd.report.groups import NLL_METRICS, ResultRow, by_pair, format_items, run_items, set_names
from prefkd.report.readers import finite

TRAINING_COLUMNS = ("run", "pair", "method", "swept", "steps", "final_loss", "best_metric", "best_value",
                    "tokens_per_s", "peak_mem_mb", "finished", "best_step", "dev_loss_final", "seed")
DASH = "–"
ROUGE_CAPTION = ("Mean ± std (population, ddof=0) of ROUGE-L ×100 over every pooled (run, evaluation seed) score; "
                 "Avg. pools the per-seed averages over sets. Pooled:")
NLL_CAPTIONS = {
    "bpb": "Held-out bits per UTF-8 byte of the reference answers (+ EOS), teacher-forced; lower is better. Bits "
           "per byte compare across tokenizers (the same text, however it is cut into tokens); nats per token "
           "(below) do not.",
    "nll": "Held-out nats per answer token (+ EOS), teacher-forced; lower is better. Not comparable across "
           "tokenizers (a coarser tokenizer spreads the same text over fewer, harder tokens): compare bits per "
           "byte across pairs and tokenizers.",
}
NLL_POOLING = ("Mean ± std (population, ddof=0) over the n pooled evaluations (one per run: replicate training "
               "seeds); Avg. pools the evaluations' averages over sets; a reference row (an evaluation outside any "
               "run) shows its single value.")


def cell(mean_std_n: tuple | None, digits: int = 2) -> str:
    """``mean ± std`` with ``digits`` decimals, the mean alone for a single value, or – when missing."""
    if not mean_std_n:
        return DASH
    mean, std, n = mean_std_n
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def num(value, spec: str = ".4f", empty: str = DASH) -> str:
    """A number formatted with ``spec``; ``empty`` for None and non-numbers."""
    if not finite(value):
        return empty
    return format(int(value) if spec == "d" else value, spec)


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in [header, *body]]
    return (["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def _seeds(values) -> str:
    return ", ".join(str(v) for v in values) or "?"


def pooled_from(row: ResultRow) -> str:
    """What a row pools: its runs and their training seeds, or (a reference row) its results.json files."""
    if row.runs:
        return f"{len(row.runs)} run{'s' if len(row.runs) != 1 else ''} (training seeds {_seeds(row.train_seeds)})"
    models = row.models
    return f"{len(row.evaluations)} results.json (model{'s' if len(models) > 1 else ''} {', '.join(models)})"


def per_pair(rows: list[ResultRow], title_level: str, table: Callable[[list[ResultRow]], list[str]]) -> list[str]:
    """The lines of ``table(group)`` for each table of ``rows`` (:func:`by_pair`), under a heading when several."""
    groups = by_pair(rows)
    out: list[str] = []
    for pair, group in groups.items():
        if len(groups) > 1:
            out += [f"{title_level} {'pair ' + pair if pair else 'Other models'}", ""]
        out += table(group) + [""]
    return out


def _rouge_table(group: list[ResultRow]) -> list[str]:
    names = set_names(group)
    body = [[r.label, *(cell(r.cells.get(n)) for n in names), cell(r.avg)] for r in group]
    return (_md_table(["method", *names, "Avg."], body) + ["", ROUGE_CAPTION, ""]
            + [f"- {r.label}: {pooled_from(r)} × evaluation seeds {_seeds(r.eval_seeds)}" for r in group])


def _nll_table(metric: str, pooled: bool, group: list[ResultRow]) -> list[str]:
    names = set_names(group)
    body = [[r.label, str(len(r.evaluations)), *(cell(r.cells.get(n), 4) for n in names), cell(r.avg, 4)]
            for r in group]
    caption = NLL_CAPTIONS[metric] + " " + NLL_POOLING + (" Pooled:" if pooled else "")
    return (_md_table(["method", "n", *names, "Avg."], body) + ["", caption]
            + (["", *(f"- {r.label}: {pooled_from(r)}" for r in group)] if pooled else []))


def results_markdown(rows: list[ResultRow], title_level: str = "###") -> str:
    """The ROUGE-L table(s) with, under each, what every row pools."""
    return "\n".join(per_pair(rows, title_level, _rouge_table))


def nll_markdown(tables: dict[str, list[ResultRow]], title_level: str = "###") -> str:
    """The NLL tables (``tables``: NLL metric -> rows, as :func:`prefkd.report.groups.nll_rows`), each under a
    heading; what every row pools is listed under the first (the headline, bits per byte) only."""
    out: list[str] = []
    for i, (metric, rows) in enumerate(tables.items()):
        out += [f"{title_level} {NLL_METRICS[metric].capitalize()}", ""]
        out += per_pair(rows, title_level + "#", partial(_nll_table, metric, i == 0))
    return "\n".join(out)


def _csv_stats(stats: tuple | None) -> list[str]:
    """mean and std (4 decimals): empty when missing, an empty std for a single value."""
    if not stats:
        return ["", ""]
    return [f"{stats[0]:.4f}", f"{stats[1]:.4f}" if stats[2] > 1 else ""]


def pooled_csv(tables: dict[str, list[ResultRow]]) -> str:
    """One line per row: ``pair, method, swept, n_runs``, then for each table ``<set>_<suffix>_mean,
    <set>_<suffix>_std, ..., avg_<suffix>_mean, avg_<suffix>_std`` (``tables``: suffix -> rows; an empty suffix
    gives ``<set>_mean``). Every table holds the same rows (its own pooled figure) in the same order."""
    names = [set_names(rows) for rows in tables.values()]
    columns = [(column, suffix) for suffix, sets in zip(tables, names) for column in [*sets, "avg"]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["pair", "method", "swept", "n_runs", *("_".join(filter(None, (column, suffix, stat)))
                                                       for column, suffix in columns for stat in ("mean", "std"))])
    for same in zip(*tables.values()):  # one row of each table
        r = same[0]
        stats = [s for row, sets in zip(same, names) for s in [*(row.cells.get(n) for n in sets), row.avg]]
        w.writerow([r.pair, r.method + (f" [{r.tag}]" if r.tag else ""), format_items(r.items, ";"), len(r.runs),
                    *(v for s in stats for v in _csv_stats(s))])
    return buf.getvalue()


def results_csv(rows: list[ResultRow]) -> str:
    """report.csv when there are instruction results (see the module docstring); nll.csv is ``pooled_csv`` of
    :func:`prefkd.report.groups.nll_rows`."""
    return pooled_csv({"": rows})


def training_records(collection: Collection, swept: list[str]) -> list[dict]:
    """One dict per run with TRAINING_COLUMNS (numbers as numbers, None when unknown)."""
    out = []
    for run in collection.runs:
        s = run.summary
        best = s.get("best") if isinstance(s.get("best"), dict) else {}
        out.append({"run": collection.rel(run.path), "pair": run.pair, "method": run.method,
                    "swept": run_items(run, swept), "steps": s.get("steps"), "final_loss": s.get("last_train_loss"),
                    "best_metric": best.get("metric"), "best_value": best.get("value"),
                    "tokens_per_s": s.get("tokens_per_s"), "peak_mem_mb": s.get("peak_mem_mb"),
                    "finished": s.get("finished"), "best_step": best.get("step"),
                    "dev_loss_final": s.get("dev_loss_final"), "seed": run.seed})
    return out


def training_markdown(records: list[dict]) -> str:
    """The training table: one row per run."""
    def yes(v):
        return DASH if v is None else ("yes" if v else "no")

    body = [[r["run"], r["pair"], r["method"], format_items(r["swept"]) or DASH, num(r["steps"], "d"),
             yes(r["finished"]), num(r["final_loss"]),
             f"{r['best_metric']} {num(r['best_value'])}" + (f" (step {r['best_step']})" if r["best_step"] is not None
                                                              else "") if r["best_metric"] else DASH,
             num(r["dev_loss_final"]), num(r["tokens_per_s"], ".1f"), num(r["peak_mem_mb"], ".0f")]
            for r in records]
    return "\n".join(_md_table(["run", "pair", "method", "swept", "steps", "finished", "final train loss",
                                "best dev metric", "dev loss final", "tokens/s", "peak memory (MiB)"], body)) + "\n"


def training_csv(records: list[dict]) -> str:
    """training.csv (and report.csv without instruction results): TRAINING_COLUMNS, swept as ``k=v;k=v``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TRAINING_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({**{k: ("" if v is None else v) for k, v in r.items()}, "swept": format_items(r["swept"], ";")})
    return buf.getvalue()


def preference_markdown(collection: Collection) -> str:
    """A small table of preference results: accuracy, margin (and win rate) per evaluation; "" when none."""
    evs = [e for e in collection.evaluations if e.kind == "preference"]
    if not evs:
        return ""
    body = [[collection.rel(e.path.parent), collection.rel(e.run.path) if e.run else e.target,
             str(e.data.get("reference") or DASH), str(e.data.get("data", DASH)), num(e.data.get("n"), "d"),
             num(e.data.get("rewards/accuracies")), num(e.data.get("rewards/margins")), num(e.data.get("win_rate"))]
            for e in evs]
    return "\n".join(_md_table(["results", "run / model", "reference", "data", "pairs", "accuracy", "margin",
                                 "win rate"], body)) + "\n"


def report_markdown(collection: Collection, swept: list[str], rows: list[ResultRow], records: list[dict],
                    plots: list[tuple[str, str]], title: str, nll: dict[str, list[ResultRow]] | None = None,
                    notes: list[str] | tuple[str, ...] = ()) -> str:
    """The whole report.md; ``plots`` are (caption, file name) pairs relative to report.md, ``nll`` the NLL
    tables' rows (:func:`prefkd.report.groups.nll_rows`), ``notes`` the paragraphs of "How this was made"."""
    kinds = [e.kind for e in collection.evaluations]
    lines = [f"# {title}", "",
             f"{len(collection.runs)} run(s) and {len(kinds)} evaluation result(s) ({kinds.count('instruct')} "
             f"instruction, {kinds.count('nll')} NLL, {kinds.count('preference')} preference) under "
             + ", ".join(f"`{d}`" for d in collection.dirs) + f"; paths relative to `{collection.root}`.", ""]
    notes = [note.strip() for note in notes if note.strip()]
    if notes:
        lines += ["## How this was made", ""] + [line for note in notes for line in (note, "")]
    lines += ["## ROUGE-L", ""]
    lines.append(results_markdown(rows) if rows else 'No instruction evaluation results (results.json with "sets").\n')
    if nll and any(nll.values()):
        lines += ["## Held-out NLL", "", nll_markdown(nll)]
    pref = preference_markdown(collection)
    if pref:
        lines += ["## Preference evaluation", "", pref]
    lines += ["## Training", "",
              training_markdown(records) if records else "No run directories (train_summary.json).\n",
              "Swept keys (override values that differ within a sweep): "
              + (", ".join(f"`{k}`" for k in swept) if swept else "none") + ".", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{caption}]({name})\n" for caption, name in plots]
    if collection.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in collection.warnings] + [""]
    return "\n".join(lines)
