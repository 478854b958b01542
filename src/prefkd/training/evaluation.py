"""Evaluation protocols run from a composed config: ``python -m prefkd.evaluate`` and a training run's ``final_eval``.

- ``eval=instruct`` (default): docs/methods.md §9 on the instruction sets; writes ``output_dir/results.{json,md,csv}``
  and ``output_dir/<set>/seed<S>.jsonl``; rerun with the same ``output_dir`` to resume.
- ``eval=nll``: held-out NLL of the reference answers on the same sets (teacher forcing; nats per token and bits
  per byte, :mod:`prefkd.eval.nll`); writes ``output_dir/results.{json,md,csv}`` and
  ``output_dir/<set>/examples.jsonl``.
- ``eval=preference``: docs/methods.md §10 preference accuracy and reward margins against ``reference.path``, and
  with ``reward_model.path`` the win rate; writes ``output_dir/results.json`` (and ``generations.jsonl``).

With ``logger=wandb`` the results go to wandb as a Table (``log_results``). ``check_final_eval`` and
``evaluate_after_training`` serve training's ``final_eval`` (the same protocols, right after training).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prefkd.models.bundle import ModelBundle
from prefkd.models.loading import adapter_base
from prefkd.training.checkpoint import is_adapter
from prefkd.training.schema import check_entry
from prefkd.utils.devices import set_num_threads

log = logging.getLogger("prefkd.evaluate")


def run_instruct(cfg: DictConfig, policy: ModelBundle, output_dir: Path, sets: dict[str, str]) -> dict:
    from prefkd.eval.generation import Sampling
    from prefkd.eval.instruct import evaluate_instruct
    from prefkd.eval.report import to_markdown

    e = cfg.eval
    sampling = Sampling(do_sample=e.do_sample, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                        no_repeat_ngram_size=e.no_repeat_ngram_size, max_new_tokens=e.max_new_tokens,
                        max_prompt_length=e.max_prompt_length)
    results = evaluate_instruct(policy.model, policy.tokenizer, sets, output_dir, seeds=list(e.seeds),
                                batch_size=e.batch_size, limit=e.limit, sampling=sampling, progress=cfg.progress,
                                model_name=cfg.model.path or adapter_base(cfg.model.adapter),
                                adapter=cfg.model.adapter)
    print("\n" + to_markdown(results))
    return results


def run_nll(cfg: DictConfig, policy: ModelBundle, output_dir: Path, sets: dict[str, str]) -> dict:
    from prefkd.eval.nll import evaluate_nll, to_markdown

    e = cfg.eval
    results = evaluate_nll(policy.model, policy.tokenizer, sets, output_dir, batch_size=e.batch_size, limit=e.limit,
                           max_prompt_length=e.max_prompt_length, max_length=e.max_length, progress=cfg.progress,
                           model_name=cfg.model.path or adapter_base(cfg.model.adapter), adapter=cfg.model.adapter)
    print("\n" + to_markdown(results))
    return results


def preference_data(e: DictConfig) -> str:
    """The pairs file of ``eval=preference``: a key of ``eval.sets`` or a JSONL path."""
    data = e.sets.get(e.dataset) or e.dataset
    if e.dataset not in e.sets and not str(data).endswith(".jsonl"):
        raise ValueError(f"eval.dataset={e.dataset!r}: use one of {sorted(e.sets)} or the path of a JSONL file.")
    return str(data)


def run_preference(cfg: DictConfig, policy: ModelBundle, output_dir: Path, pairs: list) -> dict:
    from prefkd.eval.generation import Sampling
    from prefkd.eval.preference import evaluate_preference, reward_win_rate
    from prefkd.utils.io import atomic_write

    e = cfg.eval
    data = preference_data(e)
    reference = instantiate(cfg.reference) if cfg.reference.path or cfg.reference.adapter else None
    results = {"model": policy.name, "reference": reference.name if reference else None, "data": str(data),
               **evaluate_preference(policy.model, policy.tokenizer, pairs,
                                     reference=reference.model if reference else None,
                                     reference_tokenizer=reference.tokenizer if reference else None, beta=e.beta,
                                     batch_size=e.batch_size, max_length=e.max_length,
                                     max_prompt_length=e.max_prompt_length, progress=cfg.progress)}
    if cfg.reward_model.path:
        rm = instantiate(cfg.reward_model)
        w = e.win_rate
        sampling = Sampling(max_new_tokens=w.max_new_tokens, no_repeat_ngram_size=w.no_repeat_ngram_size,
                            max_prompt_length=w.max_prompt_length, truncation_side="left")
        subset = pairs[:w.limit] if w.limit else pairs
        win = reward_win_rate(policy.model, policy.tokenizer, rm.model, rm.tokenizer, subset, sampling=sampling,
                              batch_size=e.batch_size, seed=w.seed, progress=cfg.progress)
        gens = win.pop("generations")
        atomic_write(output_dir / "generations.jsonl", "".join(
            json.dumps({"prompt": p.prompt, "generation": g, "chosen": p.chosen}, ensure_ascii=False) + "\n"
            for p, g in zip(subset, gens)))
        results.update(win, reward_model=rm.name)
    atomic_write(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


def training_run_of(*paths: str | None) -> Path | None:
    """The training run directory holding a checkpoint (the nearest parent with ``wandb_run.json``), if any."""
    for path in paths:
        if path:
            for parent in Path(path).expanduser().resolve().parents:
                if (parent / "wandb_run.json").is_file():
                    return parent
    return None


def log_results(cfg: DictConfig, results: dict, output_dir: Path) -> None:
    """``logger=wandb``: the results as a wandb Table ``eval/results`` plus ``eval/<set>/<metric>`` summary values,
    in the training run's wandb run when the model is one of its checkpoints (resumed by id), else in a new
    ``eval`` run."""
    from prefkd.training.tracking import Tracker

    logger = dict(cfg.get("logger") or {})
    if logger.get("backend") != "wandb":
        return
    run_dir = training_run_of(cfg.model.path, cfg.model.adapter)
    resume = json.loads((run_dir / "wandb_run.json").read_text()) if run_dir else None
    name = resume["name"] if resume else f"eval-{Path(str(cfg.model.path or cfg.model.adapter)).name}"
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("eval", "model", "reference", "reward_model")}
    tracker = Tracker(run_dir or output_dir, logger, {"evaluation": config}, name=name,
                      resume=resume, job_type="eval", metrics_file=False)
    try:
        tracker.log_eval(results)
    finally:
        tracker.close()


def run(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Load the model(s) named by a composed config and run its protocol; returns the results dict. The config's
    keys and the evaluation data are checked first, before any model loads."""
    from prefkd.eval.preference import load_pairs

    check_entry(cfg, "evaluate")
    set_num_threads(cfg.num_threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runners = {"instruct": run_instruct, "nll": run_nll, "preference": run_preference}
    if cfg.eval.protocol == "preference":
        data = load_pairs(preference_data(cfg.eval), cfg.eval.limit)
    else:
        data = check_set_files(cfg.eval, "eval")
    policy = instantiate(cfg.model)
    results = runners[cfg.eval.protocol](cfg, policy, output_dir, data)
    log_results(cfg, results, output_dir)
    return results


# ---------------------------------------------------------------- evaluation after training (final_eval)
def check_set_files(protocol: DictConfig, key: str) -> dict[str, str]:
    """The instruct/nll sets of ``protocol`` (an eval config at ``key``) exist and hold valid records: a missing file
    is an error before any model loads, naming the key to set and the command that fetches the missing sets; a bad
    record names its file, line and field. Returns {set name: file}."""
    from prefkd.data.fetch import fetch_hint
    from prefkd.eval.sets import load_eval_set, resolve_data_path, select_sets

    sets = select_sets(list(protocol.datasets), OmegaConf.to_container(protocol.sets, resolve=True))
    missing = {name: path for name, path in sets.items() if not resolve_data_path(path).is_file()}
    if missing:
        raise FileNotFoundError(f"{key}: no file for set(s) {missing}: {fetch_hint(missing.values())}place them or "
                                f"set {key}.sets.<name>=PATH (or drop them from {key}.datasets)")
    for path in sets.values():
        load_eval_set(path)  # every record read and checked
    return sets


def check_final_eval(cfg: DictConfig) -> None:
    """``final_eval.enabled``: a wrong protocol or a missing set file is an error before training, not after it."""
    final = cfg.get("final_eval")
    if final is None or not final.get("enabled"):
        return
    protocol = final.get("protocol")
    if protocol in ("instruct", "nll"):
        check_set_files(final, "final_eval")
    elif protocol != "preference":
        raise ValueError(f"final_eval.protocol={protocol!r}: pick eval@final_eval=instruct, eval@final_eval=nll "
                         f"or eval@final_eval=preference")


def checkpoint_to_evaluate(summary: dict) -> str | None:
    """The checkpoint a finished run is evaluated at: its best, else its last (a train summary's ``checkpoints``)."""
    return summary["checkpoints"].get("best") or summary["checkpoints"].get("last")


def evaluate_after_training(cfg: DictConfig, summary: dict, run_dir: Path, device: str) -> dict:
    """``final_eval.enabled``: the run's best checkpoint (else its last) through ``prefkd.evaluate``'s protocol
    ``final_eval`` (config/eval/*.yaml keys), results in ``<run_dir>/eval/``. A LoRA checkpoint is evaluated as an
    adapter on its base (docs/methods.md §9). Rerunning resumes an instruct evaluation like ``prefkd.evaluate`` does
    (nll recomputes)."""
    path = checkpoint_to_evaluate(summary)
    if path is None:
        raise FileNotFoundError(f"final_eval: {run_dir}/checkpoints holds no best or last checkpoint to evaluate")
    lora = is_adapter(path)
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(str(cfg.trainer.precision), "float32")
    model = {"_target_": "prefkd.models.loading.load_model", "path": None if lora else path,
             "adapter": path if lora else None,
             "tokenizer_path": path, "dtype": dtype, "device": device}
    none = {"_target_": "prefkd.models.loading.load_model", "path": None, "adapter": None}
    protocol = {k: v for k, v in OmegaConf.to_container(cfg.final_eval, resolve=True).items() if k != "enabled"}
    ecfg = OmegaConf.create({"eval": protocol, "model": model, "reference": none,
                             "reward_model": {"_target_": "prefkd.models.loading.load_reward_model", "path": None},
                             "device": device,
                             "num_threads": cfg.trainer.num_threads, "progress": True})
    print(f"\nfinal_eval: {cfg.final_eval.protocol} evaluation of {path} into {run_dir / 'eval'}")
    return run(ecfg, run_dir / "eval")
