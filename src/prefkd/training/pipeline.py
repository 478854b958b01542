"""One training run from a composed config: config → models → data → trainer → checkpoint (→ final evaluation).

``python -m prefkd.train`` calls :func:`run`; sweeps optimise :func:`objective` of its summary.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prefkd.models.bundle import ModelBundle
from prefkd.training.checkpoint import is_adapter
from prefkd.training.datasets import build_datasets, check_data
from prefkd.training.engine_checks import check_engine, check_sharded_models, describe_engine, fill_deepspeed_batch_size
from prefkd.training.evaluation import check_final_eval, checkpoint_to_evaluate, evaluate_after_training
from prefkd.training.on_policy import OnPolicySettings, check_on_policy
from prefkd.training.run_info import describe_run, tokenizer_relation, wandb_metadata
from prefkd.training.schema import check_entry
from prefkd.training.teacher_cache import TeacherCache
from prefkd.training.teacher_placement import TeacherPlacement, place_teacher, split_teacher_config
from prefkd.training.tracking import Tracker
from prefkd.training.trainer import Trainer, higher_is_better, select_metric
from prefkd.utils.devices import set_num_threads


def check_cache_serves(cache: TeacherCache, loss, target: str) -> None:
    """A top-k cache serves the logit-based losses (kd, uld, minedit, multilevel_ot); a hidden-state cache also those
    that read the teacher's hidden states. Neither serves preference pairs or a teacher used as reference."""
    needs = loss.needs
    if needs.pairs or needs.reference == "teacher":
        raise ValueError(f"trainer.teacher_cache: loss {target} needs the teacher model itself: drop "
                         f"trainer.teacher_cache")
    if needs.hidden_states and cache.store != "hidden":
        raise ValueError(f"trainer.teacher_cache: a top-k cache serves the logit-based losses (kd, uld, minedit, "
                         f"multilevel_ot); loss {target} needs the teacher model itself (its hidden states): build "
                         f"the cache with cache.store=hidden, or drop trainer.teacher_cache")


def has_target(node) -> bool:
    return node is not None and isinstance(node, DictConfig) and node.get("_target_") is not None


def run(cfg: DictConfig, run_dir: Path, hydra_cfg: DictConfig | None = None) -> dict:
    """Build everything from a composed config and train (then evaluate with ``final_eval.enabled``).

    ``hydra_cfg`` (Hydra's runtime config under ``@hydra.main``) names the run in run_info.json and wandb.
    Returns the train summary, with ``eval`` holding the evaluation results when one ran."""
    check_entry(cfg, "train")  # unset keys, every key's type, range and name, and the groups' key combinations
    check_final_eval(cfg)  # a wrong evaluation setting fails now, not after training

    tcfg = cfg.trainer
    set_num_threads(tcfg.num_threads)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(tcfg.find_unused_parameters))
    accelerator = Accelerator(mixed_precision=tcfg.precision, cpu=tcfg.device == "cpu", kwargs_handlers=[ddp])
    engine = describe_engine(accelerator)
    check_engine(engine, cfg)  # DeepSpeed and FSDP settings prefkd cannot run fail here, before any model loads
    fill_deepspeed_batch_size(accelerator, tcfg.batch_size)
    run_dir = Path(broadcast_object_list([str(run_dir)])[0]) if accelerator.num_processes > 1 else Path(run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    set_seed(tcfg.seed)
    teacher_cfg, placement = (split_teacher_config(cfg.teacher) if has_target(cfg.get("teacher")) else
                              (None, TeacherPlacement()))
    placement.check(processes=accelerator.num_processes, teacher_cache=bool(tcfg.get("teacher_cache")))

    loss = instantiate(cfg.loss)
    cache = None  # a teacher cache is read and checked against the loss before any model loads
    if tcfg.get("teacher_cache") and loss.needs.teacher:
        cache = TeacherCache(tcfg.teacher_cache)
        check_cache_serves(cache, loss, cfg.loss._target_)
    if teacher_cfg is None and (loss.needs.teacher and not (cache and cache.store == "topk")
                                or loss.needs.reference == "teacher"):
        raise ValueError(f"loss {cfg.loss._target_} needs a teacher but teacher=none: pick a teacher "
                         f"(e.g. teacher=smollm2 or a model= preset) or use loss=sft.")
    check_on_policy(OnPolicySettings.from_config(tcfg.get("on_policy")), loss, cfg.loss._target_, cache)
    check_sharded_models(engine, loss.needs, cfg, cache)
    splits = instantiate(cfg.dataset.source)  # the records are read (and checked) before any model loads
    check_data(cfg, splits, loss, accelerator.num_processes)  # the loss's kind of records, one step's worth
    student = instantiate(cfg.student)
    teacher = None
    if cache is not None and cache.store == "topk":
        teacher = ModelBundle(None, cache.tokenizer(), cache.teacher)  # the data still needs the teacher tokenizer
    elif loss.needs.teacher or loss.needs.reference == "teacher":  # live, or a hidden-state cache (head, embeddings)
        teacher = instantiate(teacher_cfg)
        if cache is not None and teacher.name != cache.teacher:
            raise ValueError(f"trainer.teacher_cache={tcfg.teacher_cache} holds {cache.teacher}'s hidden states, "
                             f"but this run's teacher is {teacher.name}: rebuild the cache or pick that teacher")
    loss.setup(student.tokenizer, teacher.tokenizer if teacher else None)
    loss.build(student.model, teacher.model if teacher else None)
    train_set, dev_set = build_datasets(cfg, splits, student, teacher, loss)
    if teacher is not None and teacher.model is not None:  # sharded over the processes, or whole on the device
        teacher.model = place_teacher(teacher.model, placement, device=accelerator.device,
                                      processes=accelerator.num_processes)
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
        print(f"{summary['tokens']:.0f} tokens in {summary['wall_time_s']:.1f} s "
              f"({summary['tokens_per_s']:.0f} tokens/s)")
        print_next_steps(summary, run_dir)
    return summary


def print_next_steps(summary: dict, run_dir: Path) -> None:
    """The commands that usually come next: evaluate the best checkpoint (unless final_eval did), then report."""
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
