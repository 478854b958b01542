"""Swept keys, row labels, pooling of replicate runs, and the per-run figure the sweep plots show.

Swept keys: a Hydra override key is *swept* when its value differs among the runs of one sweep (same
``sweep_dir``; runs outside any sweep are compared with nothing), the union over sweeps, plus the keys a run's
run_info.json declares swept (its multirun's sweep overrides). ``hydra.*``, ``trainer.resume`` and
``run_name`` never count.

Results-table rows: runs with the same pair, method and overrides except ``trainer.seed`` (and bookkeeping keys
such as ``logger`` or ``trainer.num_threads`` that are not swept, see NEUTRAL) are one row (their evaluations
pooled). The label is the method plus the row's swept values, leaving out ``trainer.seed`` and the
keys the method or pair already show (``loss``, ``model``, ``experiment``); rows that would still share a
label also show the keys they differ in. When one run was evaluated at several checkpoints, each checkpoint
is its own row (``[best]``, ``[last]``). The ROUGE-L table groups the runs' instruction evaluations, the NLL
tables their NLL evaluations, the same way.

Reference rows: evaluations outside any run (the teacher, the untrained student) follow the runs' rows, one row
per label: results.json's ``"label"`` when it has one, else its folder relative to the common root without a
last part named ``eval``, ``eval_*`` or ``eval-*`` (``reference/teacher/eval_nll/results.json`` ->
``reference/teacher``, so one model's NLL and ROUGE-L rows share a label), else the evaluated model.

Pooled cells follow :mod:`prefkd.eval.report`: mean and population std (ddof=0). ROUGE-L pools every per-seed
score of every pooled (run, eval seed), and its Avg. column the per-seed averages over sets; NLL pools one value
per evaluation (per run: replicate training seeds), and its Avg. column the evaluations' own averages over sets.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field, replace

from prefkd.eval.report import mean_std  # mean and population std: the convention of the evaluation's own tables
from prefkd.report.collect import Collection, Evaluation, Run
from prefkd.report.readers import finite

SEED_KEY = "trainer.seed"
IDENTITY_KEYS = ("loss", "model", "experiment")  # shown by the method/pair columns
METRICS = ("auto", "avg_rougeL", "avg_bpb", "best", "dev_loss_final", "final_train_loss")
AVERAGES = {"avg_rougeL": ("instruct", "rougeL_mean"), "avg_bpb": ("nll", "bpb")}  # metric -> (kind, average key)
NLL_METRICS = {"bpb": "bits per byte", "nll": "nats per token"}  # the NLL tables, headline first
EVAL_FOLDER = re.compile(r"eval([_-].*)?")  # an evaluation's own output folder: eval/, eval_nll/, eval-rouge/


# bookkeeping: they do not split rows unless swept. trainer.teacher_cache: where the teacher's outputs come from,
# exact with cache.store=hidden or k = V (sweep it to compare a top-k cache with the live teacher).
NEUTRAL = ("logger", "trainer.num_threads", "trainer.log_every", "trainer.save_every", "trainer.keep_best",
           "trainer.eval_batch_size", "trainer.stop_at_step", "trainer.teacher_cache", "trainer.num_workers",
           "trainer.prefetch_factor", "trainer.pin_memory")


def neutral(key: str) -> bool:
    """Override keys that do not change what a run learns (logging, threads, checkpoint keeping)."""
    return key in NEUTRAL or key.startswith("logger.")


def ignored(key: str) -> bool:
    """Override keys that never count as swept (output locations, resume, names)."""
    return key.startswith("hydra.") or key in ("trainer.resume", "run_name")


def natural(value: str) -> tuple:
    """Sort key: numbers by value before other strings."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def swept_keys(runs: list[Run]) -> list[str]:
    """Keys whose override value differs among the runs of a sweep (the union over sweeps) or that a run declares
    swept, in the order the runs' overrides first name them. Runs outside any sweep are compared with nothing:
    separate commands (a pipeline's stages, say) differ in many keys that nobody swept."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.sweep_dir is not None:
            groups.setdefault(run.sweep_dir, []).append(run)
    swept = {key for group in groups.values() for key in {k for r in group for k in r.overrides}
             if not ignored(key) and len({r.overrides.get(key) for r in group}) > 1}
    swept |= {k for r in runs for k in r.declared if k in r.overrides and not ignored(k)}
    return [k for k in dict.fromkeys(k for r in runs for k in r.overrides) if k in swept]


def label_keys(swept: list[str]) -> list[str]:
    """The swept keys a row label shows: not the seed, not the keys the method/pair show."""
    return [k for k in swept if k != SEED_KEY and k not in IDENTITY_KEYS]


def run_items(run: Run, keys: list[str]) -> dict[str, str]:
    """The run's override values of ``keys`` (keys it does not override are left out)."""
    return {k: run.overrides[k] for k in keys if k in run.overrides}


def format_items(items: dict[str, str], sep: str = ", ") -> str:
    """``k=v`` pairs joined by ``sep``."""
    return sep.join(f"{k}={v}" for k, v in items.items())


def run_labels(collection: Collection, swept: list[str]) -> dict:
    """A short, unique legend label per run path: [pair] method (swept values, seed); else its relative path."""
    pairs = {r.pair for r in collection.runs}
    keys = label_keys(swept) + ([SEED_KEY] if SEED_KEY in swept else [])
    labels = {}
    for run in collection.runs:
        items = format_items(run_items(run, keys))
        labels[run.path] = (f"{run.pair} " if len(pairs) > 1 else "") + run.method + (f" ({items})" if items else "")
    if len(set(labels.values())) < len(labels):
        labels = {r.path: collection.rel(r.path) for r in collection.runs}
    return labels


def reference_label(ev: Evaluation, collection: Collection) -> str:
    """The row label of an evaluation outside any run: its ``"label"``, else its folder (see module docstring)."""
    label = ev.data.get("label")
    if isinstance(label, str) and label.strip():
        return label.strip()
    folder = ev.path.parent.parent if EVAL_FOLDER.fullmatch(ev.path.parent.name) else ev.path.parent
    rel = collection.rel(folder)
    return ev.target if rel.split("/")[0] in (".", "..") else rel


@dataclass
class ResultRow:
    """One row of a results table: pooled evaluations of replicate runs (or the stand-alone results.json files
    of one reference label). ``cells`` and ``avg`` hold one metric: ROUGE-L, or bpb or nll for the NLL tables."""

    pair: str
    method: str
    items: dict[str, str]
    tag: str = ""
    runs: list[Run] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    cells: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # set -> (mean, std, n scores)
    avg: tuple[float, float, int] | None = None
    eval_seeds: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        items = format_items(self.items)
        return self.method + (f" ({items})" if items else "") + (f" [{self.tag}]" if self.tag else "")

    @property
    def train_seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs if r.seed is not None})

    @property
    def models(self) -> list[str]:
        """The evaluated models (+ adapters), each once."""
        return list(dict.fromkeys(e.target for e in self.evaluations))


def pool(row: ResultRow) -> ResultRow:
    """Fill ``row.cells``, ``row.avg`` and ``row.eval_seeds`` with ROUGE-L from ``row.evaluations`` (see module
    docstring); returns ``row``."""
    scores: dict[str, list[float]] = {}
    averages: list[float] = []
    seeds: set[str] = set()
    for ev in row.evaluations:
        for name, block in ev.data["sets"].items():
            by_seed = block.get("seeds") if isinstance(block, dict) else None
            if isinstance(by_seed, dict) and by_seed:
                for seed, v in by_seed.items():
                    if isinstance(v, dict) and finite(v.get("rougeL")):
                        scores.setdefault(name, []).append(float(v["rougeL"]))
                        seeds.add(str(seed))
            elif isinstance(block, dict) and finite(block.get("rougeL_mean")):
                scores.setdefault(name, []).append(float(block["rougeL_mean"]))
        average = ev.data.get("average") if isinstance(ev.data.get("average"), dict) else {}
        per_seed = average.get("seeds") if isinstance(average.get("seeds"), dict) else {}
        averages += [float(v["rougeL"]) for v in per_seed.values() if isinstance(v, dict) and finite(v.get("rougeL"))]
        if not per_seed and finite(average.get("rougeL_mean")):
            averages.append(float(average["rougeL_mean"]))
    row.cells, row.avg = {name: stat(v) for name, v in scores.items()}, stat(averages)
    row.eval_seeds = sorted(seeds, key=natural)
    return row


def pool_nll(row: ResultRow, metric: str) -> ResultRow:
    """A copy of ``row`` whose cells and Avg. pool ``metric`` ("bpb" or "nll") over its NLL evaluations."""
    values: dict[str, list[float]] = {}
    averages: list[float] = []
    for ev in row.evaluations:
        for name, block in ev.data["sets"].items():
            if isinstance(block, dict) and finite(block.get(metric)):
                values.setdefault(name, []).append(float(block[metric]))
        average = ev.data.get("average") if isinstance(ev.data.get("average"), dict) else {}
        if finite(average.get(metric)):
            averages.append(float(average[metric]))
    return replace(row, cells={name: stat(v) for name, v in values.items()}, avg=stat(averages))


def stat(values: list[float]) -> tuple[float, float, int] | None:
    """(mean, population std, count) of ``values``; None when there are none."""
    return (*mean_std(values), len(values)) if values else None


def result_rows(collection: Collection, swept: list[str]) -> list[ResultRow]:
    """The pooled rows of the ROUGE-L table (see :func:`group_rows`)."""
    return [pool(row) for row in group_rows(collection, swept, "instruct")]


def nll_rows(collection: Collection, swept: list[str]) -> dict[str, list[ResultRow]]:
    """The rows of each NLL table (NLL_METRICS: "bpb", "nll"), the same rows in the same order."""
    rows = group_rows(collection, swept, "nll")
    return {metric: [pool_nll(row, metric) for row in rows] for metric in NLL_METRICS}


def group_rows(collection: Collection, swept: list[str], kind: str) -> list[ResultRow]:
    """The rows of the evaluations of ``kind``, not yet pooled: runs' evaluations first (by pair, method, swept
    values), then reference rows (evaluations outside any run, by label: see the module docstring)."""
    shown = label_keys(swept)
    tagged = any(len({e.tag for e in r.evaluations if e.kind == kind}) > 1 for r in collection.runs)
    rows: dict[tuple, ResultRow] = {}
    for run in collection.runs:
        for ev in (e for e in run.evaluations if e.kind == kind):
            tag = ev.tag if tagged else ""
            rest = tuple(sorted((k, v) for k, v in run.overrides.items() if k != SEED_KEY and k not in IDENTITY_KEYS
                                and not ignored(k) and (k in shown or not neutral(k))))
            row = rows.setdefault((run.pair, run.method, tag, rest),
                                  ResultRow(run.pair, run.method, run_items(run, shown), tag))
            row.evaluations.append(ev)
            if run not in row.runs:
                row.runs.append(run)
    _disambiguate(rows)
    ordered = sorted(rows.values(), key=lambda r: (r.pair, r.method, [natural(v) for v in r.items.values()],
                                                   list(r.items), r.tag))
    references: dict[str, ResultRow] = {}
    for ev in collection.evaluations:
        if ev.run is None and ev.kind == kind:
            label = reference_label(ev, collection)
            references.setdefault(label, ResultRow("", label, {})).evaluations.append(ev)
    return ordered + list(references.values())


def _disambiguate(rows: dict[tuple, ResultRow]) -> None:
    """Rows sharing a label get the override keys their pooled runs differ in."""
    by_label: dict[tuple, list[tuple]] = {}
    for key, row in rows.items():
        by_label.setdefault((row.pair, row.label), []).append(key)
    for keys in by_label.values():
        if len(keys) < 2:
            continue
        candidates = sorted({k for key in keys for k, _ in key[3]} - set(rows[keys[0]].items))
        differing = [k for k in candidates if len({dict(key[3]).get(k) for key in keys}) > 1]
        for key in keys:
            extra = {k: dict(key[3]).get(k, "–") for k in differing}
            rows[key].items = {**rows[key].items, **extra}


def auto_metric(runs: list[Run]) -> str:
    """The sweep-plot figure when none is asked for: average ROUGE-L when some run has instruction results, else
    average bits per byte when some run has NLL results, else the best (selection) dev metric, else the final
    dev loss."""
    for metric, (kind, _) in AVERAGES.items():
        if any(e.kind == kind for r in runs for e in r.evaluations):
            return metric
    if any(isinstance(r.summary.get("best"), dict) and finite(r.summary["best"].get("value")) for r in runs):
        return "best"
    return "dev_loss_final"


def run_metric(run: Run, metric: str) -> float | None:
    """The figure ``metric`` of one run (None when it has none): ``avg_rougeL`` / ``avg_bpb`` (mean of its
    instruction / NLL evaluations' average over sets), ``best`` (the selection metric's best value),
    ``dev_loss_final``, ``final_train_loss``, or a metrics.jsonl key: its best value when it is the selection
    metric, else its last logged value."""
    best = run.summary.get("best") if isinstance(run.summary.get("best"), dict) else {}
    if metric in AVERAGES:
        kind, key = AVERAGES[metric]
        values = [e.data["average"][key] for e in run.evaluations if e.kind == kind
                  and isinstance(e.data.get("average"), dict) and finite(e.data["average"].get(key))]
        value = statistics.fmean(values) if values else None
    elif metric == "best":
        value = best.get("value")
    elif metric == "dev_loss_final":
        value = run.summary.get("dev_loss_final")
    elif metric == "final_train_loss":
        value = run.summary.get("last_train_loss")
    elif best.get("metric") == metric:
        value = best.get("value")
    else:
        series = run.series.get(metric) or {}
        value = series[max(series)] if series else None
    return float(value) if finite(value) else None


def metric_label(metric: str, runs: list[Run]) -> str:
    """Axis label of ``metric``."""
    if metric == "best":
        names = {r.summary["best"].get("metric") for r in runs if isinstance(r.summary.get("best"), dict)}
        return f"best {'/'.join(sorted(str(n) for n in names)) or 'dev metric'}"
    return {"avg_rougeL": "average ROUGE-L (×100)", "avg_bpb": "average bits per byte (lower is better)",
            "dev_loss_final": "final dev loss",
            "final_train_loss": "final train loss"}.get(metric, metric)


@dataclass
class SweepLine:
    """One line of a sweep plot: x values (strings as typed) with mean, std and count of the metric."""

    label: str
    points: list[tuple[str, float, float, int]]


def sweep_lines(runs: list[Run], key: str, swept: list[str], metric: str) -> list[SweepLine]:
    """Lines of ``sweep_<key>.png``: one per combination of the other swept keys (and of pair/method when they
    vary, unless ``key`` is loss/model/experiment, which decides them); replicate runs (seeds) are pooled into
    mean ± std over runs. Runs without ``key`` or without the metric are left out."""
    others = [k for k in swept if k not in (key, SEED_KEY, *IDENTITY_KEYS)]  # pair/method already show those
    points: dict[tuple, dict[str, list[float]]] = {}
    combos: dict[tuple, dict[str, str]] = {}
    for run in runs:
        value = run_metric(run, metric)
        if key not in run.overrides or value is None:
            continue
        shown = {} if key in IDENTITY_KEYS else {"pair": run.pair, "method": run.method}  # the key decides them
        combo = {**shown, **{k: run.overrides.get(k, "–") for k in others}}
        ident = tuple(combo.items())
        combos[ident] = combo
        points.setdefault(ident, {}).setdefault(run.overrides[key], []).append(value)
    varying = [k for k in dict.fromkeys(k for c in combos.values() for k in c)
               if len({c.get(k) for c in combos.values()}) > 1]
    lines = []
    for ident, by_x in points.items():
        combo = combos[ident]
        label = ", ".join(combo.get(k, "–") if k in ("pair", "method") else f"{k}={combo.get(k, '–')}"
                          for k in varying)
        xs = sorted(by_x, key=natural)
        lines.append(SweepLine(label, [(x, *stat(by_x[x])) for x in xs]))
    return sorted(lines, key=lambda line: line.label)


def by_pair(rows: list[ResultRow]) -> dict[str, list[ResultRow]]:
    """Rows per table: one table (key = the pair or "") when at most one pair is present, stand-alone
    evaluations included; else one per pair, stand-alone evaluations in their own table (key "")."""
    pairs = sorted({r.pair for r in rows if r.pair})
    if len(pairs) <= 1:
        return {pairs[0] if pairs else "": rows} if rows else {}
    groups = {p: [r for r in rows if r.pair == p] for p in pairs}
    loose = [r for r in rows if not r.pair]
    return {**groups, "": loose} if loose else groups


def set_names(rows: list[ResultRow]) -> list[str]:
    """The evaluation sets of ``rows`` in first-seen order."""
    return list(dict.fromkeys(name for r in rows for name in r.cells))
