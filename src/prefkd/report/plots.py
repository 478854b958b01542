"""The report's PNG plots (matplotlib, Agg backend, 100 dpi; every figure is closed after saving).

- ``rougeL_by_set.png`` (``rougeL_by_set_<pair>.png`` with several pairs): ROUGE-L per set and Avg. (groups)
  and row (bars), std as error bars; only with instruction results.
- ``bpb_by_set.png`` (``bpb_by_set_<pair>.png``): the same for held-out bits per byte; only with NLL results.
- ``train_loss.png``: train/loss against step, one line per run.
- ``dev_metrics.png``: one panel per dev/* metric, one line per run.
- ``sweep_<key>.png``: for each swept key with at least two values, the sweep metric against the value;
  a numeric axis when every value is a number (logarithmic when positive and spanning >= 2 orders of
  magnitude), categorical otherwise; one line per combination of the other swept keys, replicate seeds
  pooled into mean ± std over runs.

File names keep only ``[A-Za-z0-9._-]`` (anything else becomes ``_``).
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from prefkd.report.collect import Collection  # noqa: E402
from prefkd.report.groups import (  # noqa: E402
    SEED_KEY,
    ResultRow,
    SweepLine,
    by_pair,
    metric_label,
    natural,
    run_labels,
    set_names,
    sweep_lines,
)
from prefkd.utils.io import atomic_write_bytes  # noqa: E402

DPI = 100
BY_SET = {"rougeL": ("ROUGE-L (×100)", "ROUGE-L"),  # figure -> (y axis, title and caption)
          "bpb": ("bits per byte (lower is better)", "Held-out bits per byte")}


def safe_name(text: str) -> str:
    """``text`` with every character outside [A-Za-z0-9._-] replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def save(fig, path: Path) -> None:
    """Render ``fig`` to PNG, write it atomically (temporary file + rename) and close the figure."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _legend(ax, n: int) -> None:
    if n > 1:
        ax.legend(fontsize="small", ncol=1 if n <= 10 else 2, loc="best" if n <= 6 else "upper left",
                  bbox_to_anchor=None if n <= 6 else (1.02, 1.0))


def plot_by_set(rows: list[ResultRow], path: Path, ylabel: str, title: str) -> None:
    """Grouped bars: one group per set (then Avg.), one bar per row, population std as error bars (none on a
    bar of a single value)."""
    names = set_names(rows)
    groups = names + ["Avg."]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 0.25 * len(rows) * len(groups)), 4.5))
    for i, row in enumerate(rows):
        stats = [row.cells.get(n) for n in names] + [row.avg]
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [s[0] if s else float("nan") for s in stats], width, label=row.label,
               yerr=[s[1] if s and s[2] > 1 else float("nan") for s in stats], capsize=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax, len(rows))
    save(fig, path)


def plot_curves(collection: Collection, labels: dict, keys: list[str], path: Path, title: str) -> None:
    """One panel per metric in ``keys`` (x = step), one line per run that logged it."""
    cols = min(len(keys), 3)
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.8 * rows), squeeze=False)
    for i, (ax, key) in enumerate(zip(axes.flat, keys)):
        n = 0
        for run in collection.runs:
            series = run.series.get(key)
            if series:
                ax.plot(list(series), list(series.values()), marker="o" if len(series) < 30 else None,
                        markersize=3, label=labels[run.path])
                n += 1
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if i == 0:  # the same runs in every panel: one legend
            _legend(ax, n)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    save(fig, path)


def axis_kind(values: list[str]) -> str:
    """"log" when every value is a positive number and they span >= 2 orders of magnitude, "linear" for other
    numbers, "category" otherwise."""
    try:
        nums = [float(v) for v in values]
    except ValueError:
        return "category"
    if not all(math.isfinite(x) for x in nums):
        return "category"
    return "log" if nums and min(nums) > 0 and max(nums) / min(nums) >= 100 else "linear"


def plot_sweep(lines: list[SweepLine], key: str, ylabel: str, path: Path) -> None:
    """The metric against the values of ``key``: numeric (maybe log) or categorical axis (module docstring)."""
    values = sorted({x for line in lines for x, *_ in line.points}, key=natural)
    kind = axis_kind(values)
    numeric = kind != "category"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for line in lines:
        xs = [float(x) if numeric else values.index(x) for x, *_ in line.points]
        ax.errorbar(xs, [p[1] for p in line.points], yerr=[p[2] for p in line.points], marker="o", capsize=3,
                    label=line.label or None)
    if kind == "log":
        ax.set_xscale("log")
    rotation = 30 if max(len(v) for v in values) > 8 else 0
    if kind == "category":
        ax.set_xticks(range(len(values)), values, rotation=rotation)
    elif len(values) <= 12:  # the swept values themselves, as typed, instead of crowded automatic ticks
        ax.set_xticks([float(v) for v in values], values, rotation=rotation)
        ax.minorticks_off()
    ax.set_xlabel(key)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} against {key}")
    _legend(ax, sum(1 for line in lines if line.label))
    save(fig, path)


def plots_by_set(figure: str, rows: list[ResultRow], out: Path) -> list[tuple[str, str]]:
    """``<figure>_by_set[_<pair>].png`` (``figure``: a key of BY_SET) for each table of ``rows``; returns the
    (caption, file name) pairs."""
    ylabel, what = BY_SET[figure]
    tables = by_pair(rows)
    made = []
    for pair, group in tables.items():
        several = len(tables) > 1
        name = f"{figure}_by_set{'_' + safe_name(pair or 'other') if several else ''}.png"
        plot_by_set(group, out / name, ylabel, f"{what} by evaluation set{' — ' + pair if several else ''}")
        made.append((f"{what} by set{' (' + (pair or 'other') + ')' if several else ''}", name))
    return made


def make_plots(collection: Collection, swept: list[str], by_set: dict[str, list[ResultRow]], metric: str,
               out: Path) -> list[tuple[str, str]]:
    """Draw every plot that has data into ``out``; ``by_set``: the rows of each bar chart (a key of BY_SET ->
    table rows). Returns (caption, file name) pairs in drawing order."""
    made = [plot for figure, rows in by_set.items() for plot in plots_by_set(figure, rows, out)]
    labels = run_labels(collection, swept)
    if any(r.series.get("train/loss") for r in collection.runs):
        plot_curves(collection, labels, ["train/loss"], out / "train_loss.png", "training loss")
        made.append(("Training loss", "train_loss.png"))
    dev = sorted({k for r in collection.runs for k, s in r.series.items() if k.startswith("dev/") and s},
                 key=lambda k: (k != "dev/loss", k))
    if dev:
        plot_curves(collection, labels, dev, out / "dev_metrics.png", "dev metrics")
        made.append(("Dev metrics", "dev_metrics.png"))
    for key in swept:
        if key == SEED_KEY:
            continue
        lines = sweep_lines(collection.runs, key, swept, metric)
        if len({x for line in lines for x, *_ in line.points}) >= 2:
            name = f"sweep_{safe_name(key)}.png"
            plot_sweep(lines, key, metric_label(metric, collection.runs), out / name)
            made.append((f"Sweep over {key}", name))
    return made
