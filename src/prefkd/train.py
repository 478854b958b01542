"""`python -m prefkd.train [group=option ...] [key=value ...]`: config → models → data → trainer → checkpoint.

With no overrides it runs the embedded demo. Config groups live in the repository's ``config/`` (or
``PREFKD_CONFIG_DIR``); ``--config-dir DIR`` adds a user's own groups.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import prefkd.run_info  # noqa: F401  (registers ${prefkd_job_subdir:...}, used by hydra.sweep.subdir)

log = logging.getLogger("prefkd.train")


def config_dir() -> str:
    """The config/ folder: PREFKD_CONFIG_DIR, else the repository's (found from an editable install)."""
    if os.environ.get("PREFKD_CONFIG_DIR"):
        return os.environ["PREFKD_CONFIG_DIR"]
    for parent in Path(__file__).resolve().parents:
        if (parent / "config" / "train.yaml").is_file():
            return str(parent / "config")
    raise FileNotFoundError("prefkd's config/ folder was not found: install with `pip install -e .` from a clone, "
                            "or set PREFKD_CONFIG_DIR to the folder holding train.yaml.")


# ${repo_dir:} in configs: the repository root (the folder holding config/), for paths such as ../shared.
OmegaConf.register_new_resolver("repo_dir", lambda: str(Path(config_dir()).parent), replace=True)


def load_env() -> None:
    """Secrets come from the environment or a .env file (never from the config)."""
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)
    if os.environ.get("HUGGINGFACE_TOKEN") and not os.environ.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = os.environ["HUGGINGFACE_TOKEN"]


def has_target(node) -> bool:
    return node is not None and isinstance(node, DictConfig) and node.get("_target_") is not None


def build_datasets(cfg: DictConfig, splits, student, teacher, loss):
    """Instruction data → DistillDataset (SPEC §1); ``dataset.kind: preference`` → PreferenceDataset (SPEC §10,
    parents with the teacher's tokenizer when the loss runs the teacher)."""
    from prefkd.data.dataset import DistillDataset

    preference = cfg.dataset.get("kind", "instruct") == "preference"
    if preference != loss.needs.pairs:
        raise ValueError(f"loss {cfg.loss._target_} trains on "
                         f"{'preference pairs' if loss.needs.pairs else 'instruction records'} but dataset "
                         f"{cfg.dataset.source._target_} holds {'pairs' if preference else 'instruction records'}: "
                         + ("pick a preference dataset (dataset=hh, or any config with `kind: preference`)"
                            if loss.needs.pairs else "pick an instruction dataset (dataset=hh_sft for the chosen "
                                                     "responses of pairs)"))
    if preference:
        from prefkd.data.preference import to_pairs
        from prefkd.data.preference_dataset import PreferenceDataset

        t_tok = teacher.tokenizer if teacher is not None and loss.needs.teacher else None
        common = dict(student_tokenizer=student.tokenizer, teacher_tokenizer=t_tok,
                      max_length=cfg.dataset.max_length, max_prompt_length=cfg.dataset.max_prompt_length,
                      eos_parent=cfg.dataset.get("eos_parent", True))
        train = PreferenceDataset(to_pairs(splits.train, f"{splits.source}:train"), **common,
                                  source=f"{splits.source}:train")
        dev = (PreferenceDataset(to_pairs(splits.dev, f"{splits.source}:dev"), **common, source=f"{splits.source}:dev")
               if splits.dev else None)
        return train, dev

    common = dict(student_tokenizer=student.tokenizer, teacher_tokenizer=teacher.tokenizer if teacher else None,
                  max_prompt_length=cfg.dataset.max_prompt_length, max_length=cfg.dataset.max_length,
                  precompute=loss.precompute, precompute_version=loss.precompute_version)
    train = DistillDataset(splits.train, source=f"{splits.source}:train", **common)
    dev = DistillDataset(splits.dev, source=f"{splits.source}:dev", **common) if splits.dev else None
    return train, dev


def check_required(cfg: DictConfig) -> None:
    """Every ``???`` (mandatory) value that is still unset is an error naming the key and how to set it."""
    missing = []

    def walk(node, prefix: str) -> None:
        for key in node:
            full = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                missing.append(full)
            elif isinstance(node[key], DictConfig):
                walk(node[key], f"{full}.")

    walk(cfg, "")
    if missing:
        hints = {"path": "a checkpoint directory, hub id or .gguf file", "train": "a JSONL file"}
        items = "; ".join(f"{k}=<{hints.get(k.rsplit('.', 1)[-1], 'a value')}>" for k in missing)
        raise ValueError(f"the configuration leaves {', '.join(missing)} unset (??? in config/): pass {items} on "
                         f"the command line")


def run(cfg: DictConfig, run_dir: Path, hydra_cfg: DictConfig | None = None) -> dict:
    """Build everything from a composed config and train (then evaluate with ``final_eval.enabled``).

    ``hydra_cfg`` (Hydra's runtime config under ``@hydra.main``) names the run in run_info.json and wandb.
    Returns the train summary, with ``eval`` holding the evaluation results when one ran."""
    from prefkd.evaluate import check_final_eval, evaluate_after_training
    from prefkd.run_info import describe_run, tokenizer_relation, wandb_metadata
    from prefkd.tracking import Tracker
    from prefkd.trainer import Trainer

    check_required(cfg)
    check_final_eval(cfg)  # a wrong evaluation setting fails now, not after training

    tcfg = cfg.trainer
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    accelerator = Accelerator(mixed_precision=tcfg.precision, cpu=tcfg.device == "cpu")
    run_dir = Path(broadcast_object_list([str(run_dir)])[0]) if accelerator.num_processes > 1 else Path(run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    set_seed(tcfg.seed)

    loss = instantiate(cfg.loss)
    student = instantiate(cfg.student)
    teacher, cache = None, None
    if tcfg.get("teacher_cache") and loss.needs.teacher:
        from prefkd.models.bundle import ModelBundle
        from prefkd.teacher_cache import TeacherCache

        if loss.needs.hidden_states or loss.needs.pairs or loss.needs.reference == "teacher":
            raise ValueError(f"trainer.teacher_cache serves the logit-based losses (kd, uld, minedit, multilevel_ot); "
                             f"loss {cfg.loss._target_} needs the teacher model itself: drop trainer.teacher_cache")
        cache = TeacherCache(tcfg.teacher_cache)
        teacher = ModelBundle(None, cache.tokenizer(), cache.teacher)  # the data still needs the teacher tokenizer
    elif loss.needs.teacher or loss.needs.reference == "teacher":
        if not has_target(cfg.get("teacher")):
            raise ValueError(f"loss {cfg.loss._target_} needs a teacher but teacher=none: pick a teacher "
                             f"(e.g. teacher=smollm2 or a model= preset) or use loss=sft.")
        teacher = instantiate(cfg.teacher)
    loss.setup(student.tokenizer, teacher.tokenizer if teacher else None)
    loss.build(student.model, teacher.model if teacher else None)
    splits = instantiate(cfg.dataset.source)
    train_set, dev_set = build_datasets(cfg, splits, student, teacher, loss)
    if cache is not None:
        for split, ds in (("train", train_set), ("dev", dev_set)):
            if ds is not None:
                cache.check(split, ds)

    config = OmegaConf.to_container(cfg, resolve=True)
    info = describe_run(cfg, hydra_cfg, tokenizers=tokenizer_relation(
        student.tokenizer, teacher.tokenizer if teacher is not None else None))
    if accelerator.is_main_process:
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    tracker = Tracker(run_dir, dict(cfg.logger), config, enabled=accelerator.is_main_process,
                      **wandb_metadata(info, dict(cfg.logger)))
    try:
        trainer = Trainer(tcfg, accelerator=accelerator, student=student, teacher=teacher, loss=loss,
                          train_set=train_set, dev_set=dev_set, run_dir=run_dir, tracker=tracker, teacher_cache=cache)
        summary = trainer.fit()
        final_eval = cfg.get("final_eval")
        if final_eval is not None and final_eval.get("enabled") and accelerator.is_main_process:
            del trainer, teacher, student, loss  # the evaluation loads the best checkpoint afresh
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            summary["eval"] = evaluate_after_training(cfg, summary, run_dir, str(accelerator.device))
            tracker.log_eval(summary["eval"])
    finally:
        tracker.close()
    if accelerator.is_main_process:
        before, after = summary["dev_loss_start"], summary["dev_loss_final"]
        print(f"\ncheckpoint: {summary['checkpoints'].get('last')}")
        if summary["best"]:
            print(f"best checkpoint: {summary['checkpoints'].get('best')} ({summary['best']['metric']} "
                  f"{summary['best']['value']:.4f} at step {summary['best']['step']})")
        if before is not None and after is not None:
            print(f"dev loss: {before:.4f} before training -> {after:.4f} after {summary['steps']} steps")
        print(f"{summary['tokens']:.0f} tokens in {summary['wall_time_s']:.1f} s ({summary['tokens_per_s']:.0f} tokens/s)")
        print_next_steps(summary, run_dir)
    return summary


def print_next_steps(summary: dict, run_dir: Path) -> None:
    """The commands that usually come next: evaluate the best checkpoint (unless final_eval did), then report."""
    from prefkd.checkpoint import is_adapter
    from prefkd.evaluate import checkpoint_to_evaluate

    best = checkpoint_to_evaluate(summary)
    if "eval" in summary:
        results = run_dir / "eval" / "results.md"
        print(f"evaluation: {results if results.is_file() else results.with_suffix('.json')}")
    elif best:
        key = "model.adapter" if is_adapter(best) else "model.path"
        print(f"evaluate:   python -m prefkd.evaluate {key}={best} output_dir={run_dir / 'eval'}")
    print(f"report:     python -m prefkd.report {run_dir} --out {run_dir / 'report'}")


def check_sweep_direction(cfg: DictConfig, hydra_cfg) -> None:
    """An Optuna sweep must optimise the objective the right way: maximise dev ROUGE-L or accuracies, minimise
    losses. A mismatch would silently search for the worst settings, so it is an error before any training."""
    direction = (hydra_cfg.sweeper.get("direction") if hydra_cfg is not None else None)
    if not isinstance(direction, str):  # not Optuna (or a multi-objective list, which prefkd does not return)
        return
    from prefkd.trainer import higher_is_better, select_metric

    metric = select_metric(cfg.trainer)
    wanted = "maximize" if higher_is_better(metric) else "minimize"
    if direction != wanted:
        raise ValueError(f"hydra.sweeper.direction={direction} but each trial returns its best {metric}, which "
                         f"should be {wanted}d: set hydra.sweeper.direction={wanted}, or change trainer.select_metric "
                         f"(trainer.eval.rouge=true makes it dev/rougeL)")


def objective(summary: dict) -> float | None:
    """The number a sweeper optimises: the best ``trainer.select_metric`` value (dev/rougeL, or dev/loss), else
    the final dev loss, else the last training loss. The Optuna example (config/hydra/sweeper/) names the direction."""
    for value in ((summary.get("best") or {}).get("value"), summary.get("dev_loss_final"),
                  summary.get("last_train_loss")):
        if value is not None:
            return float(value)
    return None


def pass_signal_on(stop) -> None:
    """After a pre-emption checkpoint, call the handler that was installed for the signal before prefkd's own,
    if any: a cluster launcher's (submitit requeues the job, which then resumes from that checkpoint)."""
    handler = signal.getsignal(stop.signum)
    if callable(handler):
        print(f"{stop}: passing signal {stop.signum} on to {getattr(handler, '__qualname__', handler)}",
              file=sys.stderr)
        handler(stop.signum, None)


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from prefkd.trainer import PREEMPT_EXIT_CODE, NonFiniteLossError, Preempted

    load_env()
    hydra_cfg = HydraConfig.get()
    check_sweep_direction(cfg, hydra_cfg)
    try:
        return objective(run(cfg, Path(hydra_cfg.runtime.output_dir), hydra_cfg))
    except Preempted as stop:
        pass_signal_on(stop)
        print(f"{stop}: exiting with code {PREEMPT_EXIT_CODE}; rerun the same command to resume", file=sys.stderr)
        sys.exit(PREEMPT_EXIT_CODE)
    except NonFiniteLossError as stop:
        print(f"NonFiniteLossError: {stop}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
