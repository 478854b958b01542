"""`python -m prefkd.evaluate model.path=P [model.adapter=A] [eval=instruct|nll|preference] [key=value ...]`.

- ``eval=instruct`` (default): SPEC §9 on the instruction sets; writes ``output_dir/results.{json,md,csv}``
  and ``output_dir/<set>/seed<S>.jsonl``; rerun with the same ``output_dir`` to resume.
- ``eval=nll``: held-out NLL of the reference answers on the same sets (teacher forcing; nats per token and bits
  per byte, :mod:`prefkd.eval.nll`); writes ``output_dir/results.{json,md,csv}`` and
  ``output_dir/<set>/examples.jsonl``.
- ``eval=preference``: SPEC §10 preference accuracy and reward margins against ``reference.path``, and
  with ``reward_model.path`` the win rate; writes ``output_dir/results.json`` (and ``generations.jsonl``).

A LoRA adapter is applied to its base with peft, not merged; ``model.path`` may be left out, the base is
then read from the adapter's ``adapter_config.json``. ``dataset=NAME`` is shorthand for ``eval.dataset=NAME``.
With ``logger=wandb`` the results go to wandb as a Table (``log_results``). ``check_final_eval`` and
``evaluate_after_training`` serve ``prefkd.train``'s ``final_eval`` (the same protocols, right after training).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prefkd.checkpoint import is_adapter
from prefkd.models.bundle import ModelBundle
from prefkd.train import config_dir, load_env

log = logging.getLogger("prefkd.evaluate")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def adapter_base(adapter: str) -> str:
    """``base_model_name_or_path`` of a peft adapter directory."""
    config = Path(adapter).expanduser() / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"adapter={adapter!r}: no adapter_config.json there; pass a peft adapter directory.")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config} names no base_model_name_or_path: pass model.path=BASE.")
    return base


def load_model(path: str | None = None, adapter: str | None = None, tokenizer_path: str | None = None,
               dtype: str = "float32", device: str = "auto") -> ModelBundle:
    """A frozen model in eval mode: ``path`` alone, or its base with a peft ``adapter`` applied (not merged)."""
    from prefkd.models.loading import ModelLoadError, load_pretrained

    if path is None and adapter:
        path = adapter_base(adapter)
    if path is None:
        raise ValueError("no model given: pass model.path=CHECKPOINT (or model.adapter=LORA_DIR).")
    bundle = load_pretrained(path, tokenizer_path=tokenizer_path, dtype=dtype, freeze=True)
    if adapter:
        from peft import PeftModel

        try:
            bundle.model = PeftModel.from_pretrained(bundle.model, adapter, is_trainable=False)
        except Exception as err:  # peft raises several types for a wrong or missing adapter
            raise ModelLoadError(f"cannot apply adapter={adapter!r} to {path!r}: {err}") from err
        bundle.name = f"{path}+{adapter}"
    bundle.model.to(resolve_device(device)).eval()
    return bundle


def load_reward_model(path: str, tokenizer_path: str | None = None, dtype: str = "float32",
                      device: str = "auto") -> ModelBundle:
    """A sequence-classification reward model (logit 0 is the reward) with its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from prefkd.models.loading import DTYPES, load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPES[dtype])
    tokenizer = load_tokenizer(tokenizer_path or path)
    return ModelBundle(model.to(resolve_device(device)).eval(), tokenizer, path)


def run_instruct(cfg: DictConfig, policy: ModelBundle, output_dir: Path) -> dict:
    from prefkd.eval.generation import Sampling
    from prefkd.eval.instruct import evaluate_instruct
    from prefkd.eval.report import to_markdown
    from prefkd.eval.sets import select_sets

    e = cfg.eval
    sampling = Sampling(do_sample=e.do_sample, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                        no_repeat_ngram_size=e.no_repeat_ngram_size, max_new_tokens=e.max_new_tokens,
                        max_prompt_length=e.max_prompt_length)
    sets = select_sets(list(e.datasets), OmegaConf.to_container(e.sets, resolve=True))
    results = evaluate_instruct(policy.model, policy.tokenizer, sets, output_dir, seeds=list(e.seeds),
                                batch_size=e.batch_size, limit=e.limit, sampling=sampling, progress=cfg.progress,
                                model_name=cfg.model.path or adapter_base(cfg.model.adapter),
                                adapter=cfg.model.adapter)
    print("\n" + to_markdown(results))
    return results


def run_nll(cfg: DictConfig, policy: ModelBundle, output_dir: Path) -> dict:
    from prefkd.eval.nll import evaluate_nll, to_markdown
    from prefkd.eval.sets import select_sets

    e = cfg.eval
    sets = select_sets(list(e.datasets), OmegaConf.to_container(e.sets, resolve=True))
    results = evaluate_nll(policy.model, policy.tokenizer, sets, output_dir, batch_size=e.batch_size, limit=e.limit,
                           max_prompt_length=e.max_prompt_length, max_length=e.max_length, progress=cfg.progress,
                           model_name=cfg.model.path or adapter_base(cfg.model.adapter), adapter=cfg.model.adapter)
    print("\n" + to_markdown(results))
    return results


def run_preference(cfg: DictConfig, policy: ModelBundle, output_dir: Path) -> dict:
    from prefkd.eval.generation import Sampling
    from prefkd.eval.preference import evaluate_preference, load_pairs, reward_win_rate
    from prefkd.eval.report import atomic_write

    e = cfg.eval
    data = e.sets.get(e.dataset) or e.dataset
    if e.dataset not in e.sets and not str(data).endswith(".jsonl"):
        raise ValueError(f"eval.dataset={e.dataset!r}: use one of {sorted(e.sets)} or the path of a JSONL file.")
    pairs = load_pairs(data, e.limit)
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
    from prefkd.tracking import Tracker

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
    """Load the model(s) named by a composed config and run its protocol; returns the results dict."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runners = {"instruct": run_instruct, "nll": run_nll, "preference": run_preference}
    if cfg.eval.protocol not in runners:
        raise ValueError(f"eval.protocol={cfg.eval.protocol!r} is not one of {sorted(runners)}.")
    if cfg.eval.protocol in ("instruct", "nll"):
        check_set_files(cfg.eval, "eval")  # before the model loads
    policy = instantiate(cfg.model)
    results = runners[cfg.eval.protocol](cfg, policy, output_dir)
    log_results(cfg, results, output_dir)
    return results


# ---------------------------------------------------------------- evaluation after training (final_eval)
def check_set_files(protocol: DictConfig, key: str) -> None:
    """The instruct/nll sets of ``protocol`` (an eval config at ``key``) exist: a missing file is an error before any
    model loads, naming the key to set."""
    from prefkd.eval.sets import resolve_data_path, select_sets

    sets = select_sets(list(protocol.datasets), OmegaConf.to_container(protocol.sets, resolve=True))
    missing = {name: path for name, path in sets.items() if not resolve_data_path(path).is_file()}
    if missing:
        raise FileNotFoundError(f"{key}: no file for set(s) {missing}: place them or set "
                                f"{key}.sets.<name>=PATH (or drop them from {key}.datasets)")


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
    adapter on its base (SPEC §9). Rerunning resumes an instruct evaluation like ``prefkd.evaluate`` does (nll
    recomputes)."""
    path = checkpoint_to_evaluate(summary)
    if path is None:
        raise FileNotFoundError(f"final_eval: {run_dir}/checkpoints holds no best or last checkpoint to evaluate")
    lora = is_adapter(path)
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(str(cfg.trainer.precision), "float32")
    model = {"_target_": "prefkd.evaluate.load_model", "path": None if lora else path, "adapter": path if lora else None,
             "tokenizer_path": path, "dtype": dtype, "device": device}
    none = {"_target_": "prefkd.evaluate.load_model", "path": None, "adapter": None}
    ecfg = OmegaConf.create({"eval": OmegaConf.to_container(cfg.final_eval, resolve=True), "model": model,
                             "reference": none, "reward_model": {"path": None}, "device": device,
                             "num_threads": cfg.trainer.num_threads, "progress": True})
    print(f"\nfinal_eval: {cfg.final_eval.protocol} evaluation of {path} into {run_dir / 'eval'}")
    return run(ecfg, run_dir / "eval")


def _dataset_shorthand(argv: list[str]) -> list[str]:
    """``dataset=X`` -> ``eval.dataset=X``: config/dataset is the training data group, unused here."""
    return [f"eval.{a}" if a.startswith("dataset=") else a for a in argv]


@hydra.main(config_path=config_dir(), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    load_env()
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    sys.argv = _dataset_shorthand(sys.argv)
    main()
