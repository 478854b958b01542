"""Metrics out of a run: ``metrics.jsonl`` always, wandb when configured, plus throughput and memory."""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# A key is secret-looking when one of these words is a whole part of it (hf_token, api_key, db_password), not when
# it merely contains one (tokenizer, max_new_tokens, exclude_keys stay readable).
SECRET_KEY = re.compile(r"(^|[_\-.])(token|key|apikey|secret|password)($|[_\-.])")


def redact(config: dict) -> dict:
    """A copy of a (nested) config dict with values of secret-looking keys replaced."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif SECRET_KEY.search(str(k).lower()) and v not in (None, "", False):
            out[k] = "***"
        else:
            out[k] = v
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on the CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class Tracker:
    """Writes every logged dict to ``<run>/metrics.jsonl`` and, with ``backend: wandb``, to wandb.

    wandb runs online when WANDB_API_KEY is set, offline otherwise (``mode`` or WANDB_MODE override). The wandb
    run's id goes to ``<run>/wandb_run.json`` so that a later ``prefkd.evaluate`` of the run's checkpoints logs into
    the same wandb run (``resume=``). Only the main process logs.
    """

    def __init__(self, run_dir: Path, cfg: dict, config: dict, *, name: str, enabled: bool = True,
                 group: str | None = None, tags: list[str] | tuple = (), resume: dict | None = None,
                 job_type: str = "train", metrics_file: bool = True):
        self.enabled = enabled
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled and metrics_file else None
        self.wandb = None
        if enabled and cfg.get("backend") == "wandb":
            import wandb

            mode = cfg.get("mode") or os.environ.get("WANDB_MODE") or (
                "online" if os.environ.get("WANDB_API_KEY") else "offline")
            if mode == "offline" and not cfg.get("mode") and not os.environ.get("WANDB_MODE"):
                log.info("wandb: no WANDB_API_KEY, logging offline into %s/wandb (sync later with `wandb sync`)",
                         run_dir)
            ids = {"id": resume["id"], "resume": "allow"} if resume else {}
            self.wandb = wandb.init(project=(resume or {}).get("project") or cfg.get("project"),
                                    entity=(resume or {}).get("entity") or cfg.get("entity"),
                                    group=group or cfg.get("group"), tags=list(tags or cfg.get("tags") or []),
                                    name=name, dir=str(run_dir), mode=mode, job_type=job_type,
                                    config=redact(config), settings=wandb.Settings(silent=True), **ids)
            if not resume:
                record = {"id": self.wandb.id, "project": self.wandb.project, "entity": self.wandb.entity,
                          "name": name, "group": group, "mode": mode}
                (Path(run_dir) / "wandb_run.json").write_text(json.dumps(record, indent=2) + "\n")

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=step)

    def summary(self, values: dict) -> None:
        """Run-level figures (wandb's summary): numbers and strings; None values are left out."""
        if self.wandb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                    self.wandb.summary[k] = v

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A wandb Table (e.g. the evaluation results: one row per set)."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Table(columns=columns, data=rows)})

    def log_eval(self, results: dict) -> None:
        """Evaluation results (``prefkd.evaluate``'s dict) as the Table ``eval/results`` plus summary values."""
        columns, rows, values = eval_table(results)
        self.table("eval/results", columns, rows)
        self.summary(values)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def eval_table(results: dict) -> tuple[list[str], list[list], dict]:
    """Evaluation results → (columns, rows, summary values) for ``Tracker.table`` / ``Tracker.summary``.

    Instruction results (``sets``/``average``): one row per set and one for the average, ROUGE-L and exact match
    mean ± std over seeds. NLL results (``protocol: nll``): one row per set and the average, nll and bpb.
    Preference results: one row of their scalar metrics."""
    if results.get("protocol") == "nll":
        columns = ["set", "n", "nll", "bpb"]
        rows = [[name, s["n"], s["nll"], s["bpb"]] for name, s in results["sets"].items()]
        avg = results["average"]
        rows.append(["average", sum(s["n"] for s in results["sets"].values()), avg["nll"], avg["bpb"]])
        summary = {f"eval/{r[0]}/nll": r[2] for r in rows} | {f"eval/{r[0]}/bpb": r[3] for r in rows}
        return columns, rows, summary
    if "sets" in results:
        columns = ["set", "n", "rougeL_mean", "rougeL_std", "exact_match_mean", "exact_match_std"]
        rows = [[name, s["n"], s["rougeL_mean"], s["rougeL_std"], s["exact_match_mean"], s["exact_match_std"]]
                for name, s in results["sets"].items()]
        avg = results["average"]
        rows.append(["average", sum(s["n"] for s in results["sets"].values()), avg["rougeL_mean"], avg["rougeL_std"],
                     avg["exact_match_mean"], avg["exact_match_std"]])
        summary = {f"eval/{r[0]}/rougeL": r[2] for r in rows} | {f"eval/{r[0]}/exact_match": r[4] for r in rows}
        return columns, rows, summary
    scalars = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return list(scalars), [list(scalars.values())], {f"eval/{k}": v for k, v in scalars.items()}


def _plain(v):
    return v.item() if isinstance(v, torch.Tensor) else v
