"""What a run is, for humans and for ``prefkd.report``: ``<run_dir>/run_info.json`` and the wandb metadata.

    {"run_name": "gpt2-mcw_kd", "experiment": "gpt2_multicost", "pair": "gpt2", "loss": "mcw_kd",
     "method": "multicost", "tokenizers": "different", "seed": 42,
     "overrides": {"experiment": "gpt2_multicost", "loss.lambda_logits": "10"},
     "swept": {"loss.lambda_logits": "10"}, "multirun": true, "sweep_dir": "/abs/multirun/2026-11-23_18-00-00",
     "job_num": 1}

``overrides`` are the job's command-line overrides, values as typed; ``swept`` those of the keys its multirun
sweeps (``sweep_keys``). ``method`` is ``cfg.method`` when set (the experiments set it), else
the loss config's name.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def safe_name(text: str, limit: int = 200) -> str:
    """``text`` usable as one path component: '/' and other separators become '_'; past ``limit`` characters it
    is cut and a hash of the whole keeps it unique."""
    name = re.sub(r"[^A-Za-z0-9=,.+\-_\[\]]", "_", text)
    if len(name) > limit:
        name = f"{name[:limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def parse_overrides(task: list[str]) -> dict[str, str]:
    """Hydra's ``overrides.task`` (``["+a.b=1", "loss=kd"]``) → ``{"a.b": "1", "loss": "kd"}``; deletions
    (``~key``, ``~key=value``) set no value and are left out."""
    out = {}
    for item in map(str, task):
        key, sep, value = item.partition("=")
        if sep and not key.startswith("~"):
            out[key.lstrip("+")] = value
    return out


def sweep_keys(hydra_node: DictConfig) -> set[str]:
    """The keys a multirun sweeps: the sweep overrides of its command line (``loss.kd_rate=0.1,0.5``, read back from
    ``<hydra.sweep.dir>/multirun.yaml``, which Hydra's basic sweeper writes before the jobs start) and the keys of
    ``hydra.sweeper.params`` (the Optuna sweeper's search space)."""
    keys = {str(k) for k in (hydra_node.sweeper.get("params") or {})}
    saved = Path(str(hydra_node.sweep.dir)) / "multirun.yaml"
    if saved.is_file():
        from hydra.core.override_parser.overrides_parser import OverridesParser

        task = OmegaConf.load(saved).hydra.overrides.task
        keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(list(task)) if o.is_sweep_override()}
    return keys


def job_subdir(run_name: str, *, _root_: DictConfig) -> str:
    """``hydra.sweep.subdir``: ``<run_name>/<k=v,...>`` with the job's values of the swept keys only, so names are
    short, readable and the same for the same values (a rerun into the same ``hydra.sweep.dir`` resumes each job).
    When the swept keys cannot be told, all of the job's overrides name it (minus the excluded keys)."""
    h = _root_.hydra
    exclude = set(h.job.config.override_dirname.exclude_keys)
    job = {k: v for k, v in parse_overrides(list(h.overrides.task)).items() if k not in exclude}
    swept = sweep_keys(h)
    items = [f"{k}={v}" for k, v in sorted(job.items()) if not swept or k in swept]
    return safe_name(str(run_name)) + (f"/{safe_name(','.join(items))}" if items else "")


# ${prefkd_job_subdir:${run_name}} in config/train.yaml (hydra.sweep.subdir).
OmegaConf.register_new_resolver("prefkd_job_subdir", job_subdir, replace=True)


def tokenizer_relation(student_tokenizer, teacher_tokenizer) -> str:
    """``none`` (no teacher), ``same`` (identical vocabularies) or ``different``."""
    if teacher_tokenizer is None:
        return "none"
    return "same" if student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab() else "different"


def describe_run(cfg: DictConfig, hydra_cfg: DictConfig | None = None, *, tokenizers: str = "none") -> dict:
    """The run's identity from its config and, under ``@hydra.main``, Hydra's runtime choices and overrides."""
    info = {"run_name": cfg.get("run_name"), "experiment": None, "pair": None, "loss": None, "method": None,
            "tokenizers": tokenizers, "seed": int(cfg.trainer.seed), "overrides": {}, "swept": {}, "multirun": False,
            "sweep_dir": None, "job_num": None}
    if hydra_cfg is not None:
        from hydra.types import RunMode

        choices = hydra_cfg.runtime.choices
        info.update(experiment=choices.get("experiment"), pair=choices.get("model"), loss=choices.get("loss"),
                    overrides=parse_overrides(list(hydra_cfg.overrides.task)))
        if hydra_cfg.mode == RunMode.MULTIRUN:
            keys = sweep_keys(hydra_cfg)
            info.update(multirun=True, sweep_dir=str(Path(str(hydra_cfg.sweep.dir)).resolve()),
                        job_num=int(hydra_cfg.job.num),
                        swept={k: v for k, v in info["overrides"].items() if k in keys})
    if info["loss"] is None:  # composed without Hydra's runtime (tests, notebooks): the loss class names it
        info["loss"] = str(cfg.loss.get("_target_", "loss")).rsplit(".", 1)[-1]
    info["method"] = cfg.get("method") or info["loss"]
    return info


def swept_label(info: dict) -> str:
    """The job's values of the swept keys as ``k=v,k=v`` (empty for a single run)."""
    return ",".join(f"{k}={v}" for k, v in sorted(info.get("swept", {}).items()))


def wandb_metadata(info: dict, logger_cfg: dict) -> dict:
    """Run name, group (the experiment) and tags (pair, loss, method, tokenizer relation) for ``wandb.init``."""
    swept = swept_label(info)
    name = f"{info['run_name']}" + (f"[{swept}]" if swept else "") + f"-seed{info['seed']}"
    tags = [f"loss:{info['loss']}", f"method:{info['method']}", f"tokenizers:{info['tokenizers']}"]
    if info["pair"]:
        tags.insert(0, f"pair:{info['pair']}")
    tags += [str(t) for t in logger_cfg.get("tags") or []]
    group = logger_cfg.get("group") or info["experiment"] or info["run_name"]
    return {"name": name, "group": group, "tags": tags}
