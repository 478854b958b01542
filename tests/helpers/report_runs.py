"""Realistic run directories for the report tests: the files train.py, the trainer and prefkd.evaluate write."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from prefkd.eval.report import summarize

SETS = ("dolly", "self_inst")
EVAL_SEEDS = (10, 20)


def results(model: str, scores: dict[str, dict[int, float]], adapter: str | None = None) -> dict:
    """results.json content of the instruction protocol: ``scores[set][seed]`` = ROUGE-L ×100."""
    per_seed = {name: {seed: {"rougeL": v, "exact_match": v / 10, "n": 5, "gen_len_mean": 40.0 + seed / 10}
                       for seed, v in by_seed.items()} for name, by_seed in scores.items()}
    seeds = sorted({s for by_seed in scores.values() for s in by_seed})
    return {"model": model, "adapter": adapter, "seeds": seeds, "limit": 5, "batch_size": 4, **summarize(per_seed)}


def nll_results(model: str, values: dict[str, tuple[float, float]], label: str | None = None) -> dict:
    """results.json content of the NLL protocol (prefkd.eval.nll): ``values[set]`` = (nats/token, bits/byte)."""
    sets = {name: {"nll": nll, "bpb": bpb, "tokens": 400, "bytes": 1500, "n": 5, "truncated": 0}
            for name, (nll, bpb) in values.items()}
    average = {"sets": list(sets), **{m: statistics.fmean(s[m] for s in sets.values()) for m in ("nll", "bpb")}}
    return {"protocol": "nll", "model": model, "adapter": None, "limit": 5, "batch_size": 4, "max_prompt_length": 256,
            "max_length": 1024, "sets": sets, "average": average, "wall_time_s": 1.5,
            **({"label": label} if label is not None else {})}


def md_row(text: str, label: str) -> list[str]:
    """The cells after the label of the markdown table row labelled ``label`` in ``text``."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def make_run(run_dir: Path, *, pair: str = "tiny", method: str = "kd", seed: int = 42,
             overrides: dict[str, str] | None = None, sweep_dir: Path | None = None, run_info: bool = True,
             scores: dict[str, dict[int, float]] | None = None, losses=(5.0, 4.6, 4.3, 4.1),
             dev=((0, 5.2, None), (2, 4.8, 10.0), (4, 4.5, 12.0)), best_metric: str = "dev/loss",
             corrupt_tail: bool = False, job_num: int = 0, declared: tuple[str, ...] = (), eval_dir: str = "eval",
             nll: dict[str, tuple[float, float]] | None = None) -> Path:
    """A finished run: config.yaml, run_info.json (optional), train_summary.json, metrics.jsonl with train lines
    (``losses`` at steps 1..N) interleaved with dev lines (step, dev/loss, dev/rougeL) and, given ``scores``,
    ``<eval_dir>/results.json`` evaluating ``checkpoints/best`` (given ``nll``, also ``eval_nll/results.json``).
    ``declared``: the keys run_info.json's "swept" names."""
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    config = {"run_name": f"{pair}-{method}", "loss": {"_target_": "prefkd.losses.kd.KDLoss", "kd_rate": 0.5},
              "trainer": {"seed": seed, "max_steps": len(losses), "lr": 0.001}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if run_info:
        write_json(run_dir / "run_info.json", {
            "run_name": f"{pair}-{method}", "experiment": None, "pair": pair, "loss": method, "method": method,
            "tokenizers": "different", "seed": seed, "overrides": overrides,
            "swept": {k: overrides[k] for k in declared}, "multirun": sweep_dir is not None,
            "sweep_dir": str(sweep_dir) if sweep_dir else None, "job_num": job_num})
    lines = []
    dev_at = {step: (loss, rouge) for step, loss, rouge in dev}
    if 0 in dev_at:
        lines.append({"step": 0, "time": 1.0, "dev/loss": dev_at[0][0]})
    for step, loss in enumerate(losses, 1):
        lines.append({"step": step, "time": 1.0 + step, "train/loss": loss, "train/lr": 1e-3,
                      "perf/tokens_per_s": 160.0, "perf/peak_mem_mb": 800.0})
        if step in dev_at:
            d_loss, d_rouge = dev_at[step]
            lines.append({"step": step, "time": 1.5 + step, "dev/loss": d_loss,
                          **({"dev/rougeL": d_rouge} if d_rouge is not None else {})})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 9, "train/lo' if corrupt_tail else ""))
    dev_losses = [(step, loss) for step, loss, _ in dev]
    best_step, best_value = min(dev_losses[1:] or dev_losses, key=lambda x: x[1])
    if best_metric == "dev/rougeL":
        best_step, _, best_value = max((d for d in dev if d[2] is not None), key=lambda d: d[2])
    ckpt = run_dir / "checkpoints"
    write_json(run_dir / "train_summary.json", {
        "run_dir": str(run_dir), "finished": True, "steps": len(losses), "epochs": 0, "tokens": 512.0,
        "wall_time_s": 3.1, "tokens_per_s": 165.2, "first_train_loss": losses[0], "last_train_loss": losses[-1],
        "dev_loss_start": dev[0][1], "dev_loss_final": dev[-1][1],
        "best": {"metric": best_metric, "value": best_value, "step": best_step}, "nonfinite_steps": 0,
        "peak_mem_mb": 812.0, "checkpoints": {"best": str(ckpt / "best"), "last": str(ckpt / "last")}})
    if scores is not None:
        write_json(run_dir / eval_dir / "results.json", results(str(ckpt / "best"), scores))
    if nll is not None:
        write_json(run_dir / "eval_nll" / "results.json", nll_results(str(ckpt / "best"), nll))
    return run_dir
