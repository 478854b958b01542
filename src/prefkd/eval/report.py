"""Aggregation over seeds and sets, and the three result files (results.json / .md / .csv).

For a set s with per-seed scores m_s(seed) (a metric ×100 over the first ``limit`` examples):

    m_s_mean = mean over seeds,   m_s_std = population std over seeds (numpy's ddof=0)
    average(seed) = mean over sets of m_s(seed);   average_mean / average_std over seeds

so ``average.rougeL_mean`` is also the mean of the per-set means.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping
from pathlib import Path

from prefkd.utils.io import atomic_write

METRICS = ("rougeL", "exact_match")
LABELS = {"rougeL": "ROUGE-L", "exact_match": "EM"}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std over seeds (0 for a single value)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(per_seed: Mapping[str, Mapping[int, dict]]) -> dict:
    """per_seed[set][seed] = {"rougeL", "exact_match", "n", "gen_len_mean"} -> the ``sets`` and ``average``
    blocks of results.json (seed keys become strings)."""
    sets: dict[str, dict] = {}
    for name, by_seed in per_seed.items():
        block: dict = {"n": next(iter(by_seed.values()))["n"], "seeds": {str(s): dict(v) for s, v in by_seed.items()}}
        for metric in (*METRICS, "gen_len_mean"):
            mean, std = mean_std([v[metric] for v in by_seed.values()])
            key = "gen_len" if metric == "gen_len_mean" else metric
            block[f"{key}_mean"], block[f"{key}_std"] = mean, std
        sets[name] = block
    seeds = sorted({s for by_seed in per_seed.values() for s in by_seed})
    average: dict = {"sets": list(per_seed), "seeds": {}}
    for seed in seeds:
        present = [by_seed[seed] for by_seed in per_seed.values() if seed in by_seed]
        average["seeds"][str(seed)] = {m: statistics.fmean(v[m] for v in present) for m in METRICS}
    for metric in METRICS:
        values = [v[metric] for v in average["seeds"].values()]
        average[f"{metric}_mean"], average[f"{metric}_std"] = mean_std(values) if values else (0.0, 0.0)
    return {"sets": sets, "average": average}


def to_markdown(results: dict) -> str:
    """The paper table: sets as columns (then Avg.), one row per metric, cells ``mean ± std``."""
    names = list(results["sets"])
    seeds = ", ".join(str(s) for s in results.get("seeds", []))
    limit = results.get("limit")
    adapter = f" + adapter {results['adapter']}" if results.get("adapter") else ""
    lines = [f"# {results.get('model', 'model')}" + adapter,
             "",
             f"Mean ± std over seeds {seeds}" + (f"; first {limit} examples per set" if limit else "; all examples")
             + "; scores ×100 (ROUGE-L F, max over references; exact match).",
             "",
             "| metric | " + " | ".join(names) + " | Avg. |",
             "|---|" + "---|" * (len(names) + 1)]
    for metric in METRICS:
        cells = [f"{results['sets'][n][metric + '_mean']:.2f} ± {results['sets'][n][metric + '_std']:.2f}"
                 for n in names]
        avg = results["average"]
        cells.append(f"{avg[metric + '_mean']:.2f} ± {avg[metric + '_std']:.2f}")
        lines.append(f"| {LABELS[metric]} | " + " | ".join(cells) + " |")
    lines += ["", "| set | examples | mean generation length (tokens) |", "|---|---|---|"]
    lines += [f"| {n} | {results['sets'][n]['n']} | {results['sets'][n]['gen_len_mean']:.1f} |" for n in names]
    return "\n".join(lines) + "\n"


def to_csv(results: dict) -> str:
    """Long format: one row per (set, seed), then per set the rows ``mean`` and ``std``, then ``average``."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["set", "seed", "n", "rougeL", "exact_match", "gen_len_mean"])
    for name, block in results["sets"].items():
        for seed, v in block["seeds"].items():
            w.writerow([name, seed, v["n"], f"{v['rougeL']:.4f}", f"{v['exact_match']:.4f}",
                        f"{v['gen_len_mean']:.2f}"])
        for stat in ("mean", "std"):
            w.writerow([name, stat, block["n"], f"{block['rougeL_' + stat]:.4f}", f"{block['exact_match_' + stat]:.4f}",
                        f"{block['gen_len_' + stat]:.2f}"])
    avg = results["average"]
    for seed, v in avg["seeds"].items():
        w.writerow(["average", seed, "", f"{v['rougeL']:.4f}", f"{v['exact_match']:.4f}", ""])
    for stat in ("mean", "std"):
        w.writerow(["average", stat, "", f"{avg['rougeL_' + stat]:.4f}", f"{avg['exact_match_' + stat]:.4f}", ""])
    return buf.getvalue()


def write_results(output_dir: Path, results: dict) -> None:
    """results.json, results.md and results.csv in ``output_dir``."""
    atomic_write(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write(output_dir / "results.md", to_markdown(results))
    atomic_write(output_dir / "results.csv", to_csv(results))
