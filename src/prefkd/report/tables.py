"""report.md, report.csv and training.csv.

report.md: the ROUGE-L table(s) in the layout of the paper (rows = methods, columns = sets then Avg., cells
``mean ± std`` ×100, one table per pair when several), what each row pools, the preference results (if any),
the training table (one row per run), the swept keys, the plots and any warnings.

report.csv: one row per ROUGE-L row: ``pair, method, swept (k=v;k=v), n_runs``, ``<set>_mean, <set>_std``
for every set, ``avg_mean, avg_std`` (4 decimals; empty cells where a row lacks a set). A stand-alone
results.json has an empty pair, its model path as method and ``n_runs`` 0; ``method`` ends in ``[best]``,
``[last]``... when a run was evaluated at several checkpoints. Without any instruction results report.csv holds
the training table instead (TRAINING_COLUMNS).

training.csv (always): one row per run, TRAINING_COLUMNS.
"""

from __future__ import annotations

import csv
import io

from prefkd.report.collect import Collection
from prefkd.report.readers import finite
from prefkd.report.groups import ResultRow, by_pair, format_items, run_items, set_names

TRAINING_COLUMNS = ("run", "pair", "method", "swept", "steps", "final_loss", "best_metric", "best_value",
                    "tokens_per_s", "peak_mem_mb", "finished", "best_step", "dev_loss_final", "seed")
DASH = "–"


def cell(mean_std_n: tuple | None) -> str:
    """``mean ± std`` with 2 decimals, or – when missing."""
    return f"{mean_std_n[0]:.2f} ± {mean_std_n[1]:.2f}" if mean_std_n else DASH


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


def results_markdown(rows: list[ResultRow], title_level: str = "###") -> str:
    """The ROUGE-L table(s) with, under each, what every row pools."""
    groups = by_pair(rows)
    out: list[str] = []
    for pair, group in groups.items():
        if len(groups) > 1:
            out += [f"{title_level} {'pair ' + pair if pair else 'Other models'}", ""]
        names = set_names(group)
        out += _md_table(["method", *names, "Avg."], [[r.label, *(cell(r.cells.get(n)) for n in names), cell(r.avg)]
                                                      for r in group])
        out += ["", "Mean ± std (population, ddof=0) of ROUGE-L ×100 over every pooled (run, evaluation seed) score; "
                    "Avg. pools the per-seed averages over sets. Pooled:", ""]
        for r in group:
            what = (f"{len(r.runs)} run{'s' if len(r.runs) != 1 else ''} (training seeds {_seeds(r.train_seeds)})"
                    if r.runs else f"{len(r.evaluations)} results.json")
            out.append(f"- {r.label}: {what} × evaluation seeds {_seeds(r.eval_seeds)}")
        out.append("")
    return "\n".join(out)


def results_csv(rows: list[ResultRow]) -> str:
    """report.csv when there are instruction results (see the module docstring)."""
    names = set_names(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["pair", "method", "swept", "n_runs", *(f"{n}_{s}" for n in names for s in ("mean", "std")),
                "avg_mean", "avg_std"])
    for r in rows:
        stats = [r.cells.get(n) for n in names] + [r.avg]
        w.writerow([r.pair, r.method + (f" [{r.tag}]" if r.tag else ""), format_items(r.items, ";"), len(r.runs),
                    *(f"{s[i]:.4f}" if s else "" for s in stats for i in (0, 1))])
    return buf.getvalue()


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
                    plots: list[tuple[str, str]], title: str) -> str:
    """The whole report.md; ``plots`` are (caption, file name) pairs relative to report.md."""
    kinds = [e.kind for e in collection.evaluations]
    lines = [f"# {title}", "",
             f"{len(collection.runs)} run(s) and {len(kinds)} evaluation result(s) ({kinds.count('instruct')} "
             f"instruction, {kinds.count('preference')} preference) under "
             + ", ".join(f"`{d}`" for d in collection.dirs) + f"; paths relative to `{collection.root}`.", "",
             "## ROUGE-L", ""]
    lines.append(results_markdown(rows) if rows else 'No instruction evaluation results (results.json with "sets").\n')
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
