"""Finding and reading runs and evaluation results under the directories given to ``python -m prefkd.report``.

A *run directory* is any directory holding ``train_summary.json``; beside it the reader uses ``run_info.json``
(written by train.py), else ``.hydra/overrides.yaml`` and ``.hydra/hydra.yaml``, else ``config.yaml`` and the
directory name. ``metrics.jsonl`` gives the curves (the last value wins when a resumed run logged a step twice).

An *evaluation* is any ``results.json``. One inside a run directory belongs to that run (the deepest run
directory holding it; a run keeps every evaluation inside it, of any kind: ``eval_nll/`` and ``eval_rouge/`` side
by side both attach); one outside belongs to the run whose directory contains its ``"model"`` (or ``"adapter"``)
path; otherwise it stands alone (a reference such as the teacher). Held-out NLL results (``"protocol": "nll"``,
:mod:`prefkd.eval.nll`) feed the NLL tables; instruction results (a ``"sets"`` block) the ROUGE-L table;
preference results (``rewards/accuracies``) their own table; anything else is skipped with a warning.

Unreadable files and corrupt JSON lines are skipped with a warning naming the file (and line): a crashed
run can leave half a line behind, and one bad file never stops the report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from prefkd.report.readers import read_json, read_metrics, read_yaml, warn
from prefkd.training.run_info import parse_overrides

SUMMARY, RESULTS, RUN_INFO, METRICS = "train_summary.json", "results.json", "run_info.json", "metrics.jsonl"
SKIP_DIRS = {".git", ".hydra", "wandb", "__pycache__", ".cache"}


@dataclass
class Evaluation:
    """One results.json: ``kind`` is "instruct", "nll" or "preference"; ``target`` the evaluated model (+ adapter)."""

    path: Path
    data: dict
    kind: str
    target: str
    run: Run | None = field(default=None, repr=False)
    tag: str = ""  # the evaluated checkpoint relative to its run (e.g. "best"), "" when not inside the run


@dataclass
class Run:
    """One training run: identity (pair, method, seed, overrides, sweep) and its summary, curves, evaluations."""

    path: Path
    name: str
    pair: str
    method: str
    seed: int | None
    overrides: dict[str, str]
    sweep_dir: str | None
    summary: dict
    series: dict[str, dict[int, float]]
    evaluations: list[Evaluation] = field(default_factory=list)
    declared: set[str] = field(default_factory=set)  # run_info.json's "swept": the keys its multirun sweeps
    has_run_info: bool = True


@dataclass
class Collection:
    """Everything found: runs, all evaluations (attached or not) and the common root for relative paths."""

    dirs: list[Path]
    runs: list[Run]
    evaluations: list[Evaluation]
    root: Path
    warnings: list[str] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        """``path`` relative to the common root (POSIX separators)."""
        return Path(os.path.relpath(path, self.root)).as_posix()


class NothingFound(Exception):
    """No run directory and no results.json under the directories given."""


def find_inputs(dirs: list[Path]) -> tuple[list[Path], list[Path]]:
    """(run directories, results.json files) under ``dirs``, searched recursively, each once, sorted.
    A DIR may also be a results file or a train_summary.json. Raises FileNotFoundError naming a missing DIR."""
    runs: set[Path] = set()
    results: set[Path] = set()
    for d in dirs:
        if not d.exists():
            raise FileNotFoundError(f"{d}: no such directory")
        if d.is_file() and d.name == SUMMARY:
            runs.add(d.resolve().parent)
            continue
        if d.is_file():  # a results file of any name
            results.add(d.resolve())
            continue
        for here, subdirs, files in os.walk(d):
            subdirs[:] = sorted(s for s in subdirs if s not in SKIP_DIRS)
            if SUMMARY in files:
                runs.add(Path(here).resolve())
            if RESULTS in files:
                results.add((Path(here) / RESULTS).resolve())
    return sorted(runs), sorted(results)


def _hydra_runtime(run_dir: Path, warnings: list[str]) -> tuple[dict, str | None]:
    """(Hydra's runtime choices, the sweep directory or None) from ``.hydra/hydra.yaml``. The sweep directory is
    the nearest ancestor holding Hydra's multirun.yaml, else ``hydra.sweep.dir`` when it is resolved."""
    doc = read_yaml(run_dir / ".hydra" / "hydra.yaml", warnings)
    hydra = doc.get("hydra") if isinstance(doc, dict) and isinstance(doc.get("hydra"), dict) else {}
    runtime = hydra.get("runtime") if isinstance(hydra.get("runtime"), dict) else {}
    choices = runtime.get("choices") if isinstance(runtime.get("choices"), dict) else {}
    sweep = next((str(p) for p in list(run_dir.parents)[:3] if (p / "multirun.yaml").is_file()), None)
    if sweep is None and hydra.get("mode") == "MULTIRUN":
        declared = str((hydra.get("sweep") or {}).get("dir") or "")
        sweep = declared if declared and "${" not in declared else str(run_dir.parent)
    return choices, sweep


def _hydra_overrides(run_dir: Path, warnings: list[str]) -> dict[str, str]:
    items = read_yaml(run_dir / ".hydra" / "overrides.yaml", warnings)
    return parse_overrides(items if isinstance(items, list) else [])


def _method_from_target(config: dict) -> str:
    target = str((config.get("loss") or {}).get("_target_", "")) if isinstance(config.get("loss"), dict) else ""
    name = target.rsplit(".", 1)[-1]
    return (name[:-4] if name.endswith("Loss") and len(name) > 4 else name).lower() or "?"


def _identity_without_run_info(run_dir: Path, config: dict, warnings: list[str]) -> dict:
    """run_info.json's fields for an older run: from .hydra/ (choices, overrides, sweep), else config.yaml
    (``method``, ``run_name`` = ``<pair>-<loss>``, the loss class) and the directory name."""
    name = str(config.get("run_name") or run_dir.name)
    choices, sweep = _hydra_runtime(run_dir, warnings)
    head, dash, tail = name.partition("-")
    pair = str(choices.get("model") or (head if dash else "?"))
    experiment = str(choices.get("experiment") or "")
    if config.get("method"):
        method = str(config["method"])
    elif experiment:
        method = experiment[len(pair) + 1:] if experiment.startswith(pair + "_") else experiment
    else:
        method = str(choices.get("loss") or (tail if dash else _method_from_target(config)))
    return {"run_name": name, "pair": pair, "method": method, "overrides": _hydra_overrides(run_dir, warnings),
            "sweep_dir": sweep, "multirun": sweep is not None}


def load_run(run_dir: Path, warnings: list[str]) -> Run:
    """Read one run directory (see the module docstring for the fallbacks when run_info.json is absent)."""
    summary = read_json(run_dir / SUMMARY, warnings) or {}
    config = read_yaml(run_dir / "config.yaml", warnings)
    config = config if isinstance(config, dict) else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    info = read_json(run_dir / RUN_INFO, warnings) if (run_dir / RUN_INFO).is_file() else None
    ident = info if info is not None else _identity_without_run_info(run_dir, config, warnings)
    seed = ident.get("seed", trainer.get("seed"))
    try:
        seed = int(seed) if seed is not None else None
    except (TypeError, ValueError):
        seed = None
    swept = ident.get("swept") if isinstance(ident.get("swept"), dict) else {}
    return Run(path=run_dir, name=str(ident.get("run_name") or config.get("run_name") or run_dir.name),
               pair=str(ident.get("pair") or "?"), method=str(ident.get("method") or ident.get("loss") or "?"),
               seed=seed, overrides={str(k): str(v) for k, v in (ident.get("overrides") or {}).items()},
               sweep_dir=str(ident["sweep_dir"]) if ident.get("sweep_dir") and ident.get("multirun", True) else None,
               summary=summary, series=read_metrics(run_dir / METRICS, warnings), declared=set(map(str, swept)),
               has_run_info=info is not None)


def load_evaluation(path: Path, warnings: list[str]) -> Evaluation | None:
    """One results.json as an Evaluation, or None (with a warning) when it has none of the protocols' shapes."""
    data = read_json(path, warnings)
    if data is None:
        return None
    target = str(data.get("model") or data.get("adapter") or path.parent)
    if data.get("adapter") and data.get("model"):
        target = f"{data['model']} + {data['adapter']}"
    if isinstance(data.get("sets"), dict) and data.get("protocol") == "nll":
        return Evaluation(path, data, "nll", target)
    if isinstance(data.get("sets"), dict) and data.get("protocol", "instruct") != "preference":
        return Evaluation(path, data, "instruct", target)
    if data.get("protocol") == "preference" or "rewards/accuracies" in data:
        return Evaluation(path, data, "preference", target)
    warn(warnings, f"{path}: neither instruction results (no 'sets') nor preference results: skipped")
    return None


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _evaluated_paths(data: dict, base: Path) -> list[Path]:
    out = []
    for key in ("adapter", "model"):
        value = data.get(key)
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            out += [p] if p.is_absolute() else [base / p, Path.cwd() / p]
    return [Path(os.path.abspath(p)) for p in out]


def attach(runs: list[Run], evaluations: list[Evaluation]) -> None:
    """Give each evaluation its run: the deepest run directory containing the results file, else the one
    containing its adapter or model path (absolute, or relative to the results file's folder or the cwd)."""
    by_depth = sorted(runs, key=lambda r: len(r.path.parts), reverse=True)
    for ev in evaluations:
        run = next((r for r in by_depth if _inside(ev.path, r.path)), None)
        evaluated = _evaluated_paths(ev.data, ev.path.parent)
        if run is None:
            run = next((r for p in evaluated for r in by_depth if _inside(p, r.path)), None)
        if run is None:
            continue
        ev.run = run
        inner = next((p for p in evaluated if _inside(p, run.path) and p != run.path), None)
        ev.tag = inner.name if inner is not None else ""
        run.evaluations.append(ev)


def common_root(dirs: list[Path], run_dirs: list[Path]) -> Path:
    """The directory paths are shown relative to: the deepest one holding every DIR given (a file's folder),
    or its parent when that is itself a run directory (so a run is never shown as ".")."""
    folders = [d.resolve() if d.is_dir() else d.resolve().parent for d in dirs]
    root = Path(os.path.commonpath([str(d) for d in folders]))
    return root.parent if root in run_dirs else root


def collect(dirs: list[str | Path]) -> Collection:
    """Find and read every run and results.json under ``dirs``. Raises FileNotFoundError for a missing DIR and
    NothingFound when there is neither a run (train_summary.json) nor a readable results.json."""
    dirs = [Path(d) for d in dirs]
    run_dirs, result_files = find_inputs(dirs)
    if not run_dirs and not result_files:
        raise NothingFound(f"no run directories ({SUMMARY}) and no evaluation results ({RESULTS}) under "
                           + ", ".join(str(d) for d in dirs))
    warnings: list[str] = []
    runs = [load_run(d, warnings) for d in run_dirs]
    evaluations = [e for e in (load_evaluation(p, warnings) for p in result_files) if e is not None]
    if not runs and not evaluations:  # every results.json unreadable or of no known shape: no report to write
        raise NothingFound(f"nothing to report under {', '.join(str(d) for d in dirs)}: " + "; ".join(warnings))
    attach(runs, evaluations)
    return Collection(dirs=dirs, runs=runs, evaluations=evaluations, root=common_root(dirs, run_dirs),
                      warnings=warnings)
