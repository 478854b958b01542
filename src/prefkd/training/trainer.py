"""The one training loop. It never looks at which loss it runs: the loss says what it needs (teacher,
hidden states, reference) and the trainer provides exactly that.

Batches (docs/methods.md §2): the sampler yields one *global* batch per optimizer step (batch_size × processes ×
accumulation examples). It is cut into micro-batches and each process takes its slice, so one process
with batch 8 and two processes with batch 4 (or one with batch 4 and accumulation 2) see the same
examples. The DataLoader of :mod:`prefkd.training.loader` collates them (ahead, with workers). Loss sums are
divided by the number of units (response tokens, or sequences) of the whole global batch, counted before the first
backward.

One step reads the host once: the loss, the token count and whether the loss and the gradient norm are finite come
back together after the backward passes; every other metric stays on the device until a logging step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from prefkd.data.dataset import DistillDataset
from prefkd.data.sampler import GlobalBatchSampler
from prefkd.losses.base import DistillationLoss, LossOutput, ModelOutputs
from prefkd.models.bundle import ModelBundle
from prefkd.models.sharding import on_device
from prefkd.training.checkpoint import torch_optimizer
from prefkd.training.checkpoint_manager import CheckpointManager, higher_is_better
from prefkd.training.distill_module import DistillModule
from prefkd.training.engine_checks import describe_engine
from prefkd.training.fused_head import model_outputs, plan_fused_heads
from prefkd.training.loader import Collate, StepSampler, build_loader
from prefkd.training.nonfinite import NonFiniteGuard, NonFiniteLossError
from prefkd.training.on_policy import OnPolicySampler, OnPolicySettings, SampledStep
from prefkd.training.optim import build_optimizer, build_scheduler
from prefkd.training.preemption import PREEMPT_EXIT_CODE, Preempted, preemption_signals
from prefkd.training.replicas import check_replicas_agree
from prefkd.training.state import TrainState
from prefkd.training.teacher_source import CachedTeacher, LiveTeacher
from prefkd.training.tracking import Tracker, peak_memory_mb
from prefkd.utils.io import atomic_write
from prefkd.utils.labels import IGNORE_INDEX

__all__ = ["PREEMPT_EXIT_CODE", "NonFiniteLossError", "Preempted", "StepResult", "Trainer", "higher_is_better",
           "select_metric"]

log = logging.getLogger(__name__)


def select_metric(trainer_cfg) -> str:
    """``trainer.select_metric``; ``auto``: dev ROUGE-L when it is computed (docs/methods.md §2), else the dev loss."""
    metric = trainer_cfg.select_metric
    if metric == "auto":
        return "dev/rougeL" if trainer_cfg.eval.rouge else "dev/loss"
    return metric


def _zero3(engine) -> bool:
    """The prepared module's parameters are partitioned by DeepSpeed ZeRO stage 3, where fused heads are not verified
    (under FSDP2 they are: tests/test_sharded_checkpoint.py)."""
    return engine.deepspeed and engine.zero_stage == 3


def count_units(batch: dict, normalize_by: str) -> torch.Tensor:
    """Response tokens (labels != -100) or sequences of a micro-batch, as a 0-dim float64 tensor on the batch's
    device: the loss's normaliser."""
    device = batch["input_ids"].device
    if normalize_by == "sequences":
        return torch.as_tensor(batch.get("num_sequences", batch["input_ids"].shape[0]), dtype=torch.float64,
                               device=device)
    return batch["labels"].ne(IGNORE_INDEX).sum().to(torch.float64)


@dataclass
class StepResult:
    """One optimizer step: ``metrics`` (name → 0-dim tensor on the device, normalised over the global batch), the
    host values the loop needs every step, and whether the optimizer stepped."""

    metrics: dict[str, torch.Tensor]
    loss: float
    tokens: float
    grad_norm: float | None
    stepped: bool
    skipped: dict[str, float] | None = None  # the non-finite guard's metrics of a skipped step
    sampled: SampledStep | None = None  # an on-policy step: what sampling the student's responses cost


class Trainer:
    def __init__(self, cfg, *, accelerator, student: ModelBundle, teacher: ModelBundle | None,
                 loss: DistillationLoss, train_set: DistillDataset, dev_set: DistillDataset | None,
                 run_dir: Path, tracker: Tracker, teacher_cache=None):
        self.cfg, self.acc, self.loss, self.run_dir, self.tracker = cfg, accelerator, loss, Path(run_dir), tracker
        self.train_set, self.dev_set = train_set, dev_set
        self.tokenizer = student.tokenizer
        self.pad = student.tokenizer.pad_token_id
        self.teacher_pad = teacher.tokenizer.pad_token_id if teacher else None
        self.micro = cfg.batch_size
        self._build_sampler()
        model = on_device(teacher.model, accelerator.device) if teacher and teacher.model is not None else None
        student.model.to(accelerator.device)  # plan_fused_heads probes both heads on the device
        # trainer.fused_head: which models hand the loss hidden states and head instead of logits (one log line);
        # the reference (_build_reference) is the teacher, or the initial student: a copy or the adapter disabled
        reference = {"teacher": model, "initial": student.model}.get(loss.needs.reference)
        # a cache of hidden states hands the teacher's last hidden state and head too; a top-k cache, log-probs
        self.fused = plan_fused_heads(cfg.get("fused_head", True), loss, student.model,
                                      model if not teacher_cache or teacher_cache.store == "hidden" else None,
                                      reference=reference, sharded=_zero3(describe_engine(accelerator)))
        self._build_reference(student, teacher)  # a copy of the initial student is made whole, before any sharding
        module = DistillModule(student.model, loss, compile=cfg.compile,  # the loss's modules train with the student
                               fused_head=self.fused.student)
        module.to(accelerator.device)  # before the optimizer holds its parameters
        optimizer = build_optimizer(module.student, module.loss, cfg)
        check_replicas_agree(module, accelerator.device)  # FSDP and ZeRO shard what each process built
        # The scheduler is not handed to accelerate: its wrapper steps once per process, we step once per update.
        self.module, self.optimizer = accelerator.prepare(module, optimizer)
        self.student = student.model  # the student itself (its parameters are the prepared module's)
        # on the torch optimizer itself (under DeepSpeed the ZeRO optimizer's, whose parameter groups it steps)
        self.scheduler = build_scheduler(torch_optimizer(self.optimizer), cfg, self.total_steps)
        # the teacher's outputs: from the cache (prefkd.training.teacher_cache.TeacherCache) or the live model
        self.teacher = (CachedTeacher(teacher_cache, model, accelerator.device, fused=self.fused.teacher)
                        if teacher_cache else
                        LiveTeacher(model, fused=self.fused.teacher))
        self._build_loader()
        self.on_policy = self._build_on_policy()
        self.state = TrainState()
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", accelerator=accelerator, module=self.module,
                                             tokenizer=self.tokenizer, optimizer=self.optimizer,
                                             scheduler=self.scheduler, metric=select_metric(cfg),
                                             keep_best=cfg.keep_best)
        self.guard = NonFiniteGuard(accelerator, self.optimizer, cfg.max_nonfinite_in_a_row)
        self._window = self._empty_window()  # tokens, step and generation time since the last train log

    def _build_sampler(self) -> None:
        """The global batches (:class:`GlobalBatchSampler`) and the optimizer steps of the run."""
        cfg, world = self.cfg, self.acc.num_processes
        size = cfg.batch_size * world * cfg.gradient_accumulation_steps
        self.sampler = GlobalBatchSampler(self.train_set.lengths, global_batch_size=size, seed=cfg.seed, shuffle=True,
                                          group_by_length=cfg.group_by_length, drop_last=True)
        if len(self.sampler) == 0:
            raise ValueError(f"the training set has {len(self.train_set)} examples, fewer than one optimizer step's "
                             f"{size} (batch_size × processes × gradient_accumulation_steps).")
        self.total_steps = cfg.max_steps or cfg.max_epochs * len(self.sampler)

    def _build_loader(self) -> None:
        """The DataLoader of this process's micro-batches (:mod:`prefkd.training.loader`)."""
        cfg = self.cfg
        steps = StepSampler(self.sampler, self.micro, self.acc.process_index, self.acc.num_processes)
        self.micro_per_step = steps.micro_per_step
        self.collate = Collate(self.train_set, self.pad, self.teacher_pad, self.teacher.batch_fields, "train")
        self.loader = build_loader(self.train_set, steps, self.collate, num_workers=cfg.num_workers,
                                   prefetch_factor=cfg.prefetch_factor, pin_memory=cfg.pin_memory)

    def _build_on_policy(self) -> OnPolicySampler | None:
        """``trainer.on_policy`` (:mod:`prefkd.training.on_policy`); None when its fraction is 0 (off)."""
        settings = OnPolicySettings.from_config(self.cfg.get("on_policy"))
        if not settings.active:
            return None
        return OnPolicySampler(settings, seed=self.cfg.seed, dataset=self.train_set, collate=self.collate,
                               device=self.acc.device)

    def _sample(self, micro_batches: list[dict]) -> tuple[list[dict], SampledStep | None]:
        """An on-policy step (the coin of :meth:`OnPolicySampler.wants`): the micro-batches rebuilt from the
        student's own samples to their prompts, sampled in eval mode; else the micro-batches unchanged."""
        step = self.state.global_step
        if self.on_policy is None or not self.on_policy.wants(step):
            return micro_batches, None
        cost, rebuilt = SampledStep(), []
        self.student.eval()
        try:
            with self.acc.autocast():
                for k, batch in enumerate(micro_batches):
                    batch, stats = self.on_policy.sample_batch(self.student, batch, step=step,
                                                               process=self.acc.process_index, micro=k)
                    rebuilt.append(batch)
                    cost.add(stats)
        finally:
            self.module.train()
        return rebuilt, cost

    # ---------------------------------------------------------------- forward
    def _forward(self, batch: dict) -> LossOutput:
        """The frozen models' outputs the loss needs (no grad), then the prepared module: student forward and loss."""
        needs = self.loss.needs
        teacher = self.teacher(batch, needs.hidden_states) if needs.teacher else None
        reference = self._reference_forward(batch) if needs.reference else None
        return DistillModule.output(self.module(batch, teacher=teacher, reference=reference,
                                                step=self.state.global_step, total_steps=self.total_steps))

    # ---------------------------------------------------------------- reference model (preference losses)
    def _build_reference(self, student, teacher: ModelBundle | None) -> None:
        """Needs.reference: "initial" = the policy as it starts (a LoRA student: its base with the adapter disabled,
        no copy; else a frozen copy made now, before any checkpoint is restored); "teacher" = the teacher model,
        run on the student's rows (it must share the student's tokenizer)."""
        kind = self.loss.needs.reference
        self.reference, self.reference_disables_adapter = None, False
        if kind is None:
            return
        if kind == "teacher":
            if teacher is None:
                raise ValueError("the loss uses the teacher as reference but there is no teacher: pick one")
            if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
                raise ValueError(f"reference=teacher needs the student's tokenizer, but {teacher.name} has another; "
                                 f"use reference=initial, or kd_tisdpo (which compares parents across tokenizers)")
            self.reference = on_device(teacher.model, self.acc.device)
        elif kind == "initial":
            if hasattr(student.model, "disable_adapter"):  # peft: the base model is the initial policy
                self.reference_disables_adapter = True
            else:
                import copy

                self.reference = copy.deepcopy(student.model).eval().requires_grad_(False).to(self.acc.device)
        else:
            raise ValueError(f"Needs.reference={kind!r}: valid values are 'initial', 'teacher'")

    @torch.no_grad()
    def _reference_forward(self, batch: dict) -> ModelOutputs:
        """The reference's outputs on the student's rows: its logits, or (``self.fused.reference``) its last hidden
        state and head, projected per chunk inside the loss."""
        def forward(model) -> ModelOutputs:
            return model_outputs(model, batch["input_ids"], batch["attention_mask"], hidden=False,
                                 fused=self.fused.reference)

        if self.reference_disables_adapter:
            model = self.student
            was_training = model.training
            model.eval()
            with model.disable_adapter():
                out = forward(model)
            model.train(was_training)
            return out
        return forward(self.reference)

    def _batch(self, indices: list[int], dataset) -> dict:
        """A dev micro-batch of ``indices``, on the device (training batches come from :attr:`loader`)."""
        split = "train" if dataset is self.train_set else "dev"
        return self._to_device(Collate(dataset, self.pad, self.teacher_pad, self.teacher.batch_fields, split)(
            [(i, dataset[i]) for i in indices]))

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.acc.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a device collective; no host sync)."""
        return self.acc.reduce(values, reduction="sum") if self.acc.num_processes > 1 else values

    def _sum_metrics(self, sums: dict[str, torch.Tensor], out: LossOutput, units: torch.Tensor) -> None:
        """Add a micro-batch's sums, and its means weighted by its ``units``, to ``sums``."""
        weighted = {name: v.detach().to(torch.float64) * units for name, v in out.means.items()}
        for name, v in {"loss": out.loss.detach(), **out.metrics}.items():
            weighted[name] = v.detach().to(torch.float64)
        for name, v in weighted.items():
            sums[name] = sums[name] + v if name in sums else v

    def _reduce_metrics(self, sums: dict[str, torch.Tensor], units: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each process's metric sums → their sum over processes divided by the global units (one collective)."""
        names = sorted(sums)
        totals = self._all_reduce(torch.stack([sums[n] for n in names])) / units
        return dict(zip(names, totals.unbind()))

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """Forward and backward over this process's micro-batches of one global batch (from :attr:`loader`), then
        the optimizer step unless the loss or the gradient norm is not finite."""
        acc, world = self.acc, self.acc.num_processes
        micro_batches, sampled = self._sample(micro_batches)
        batches = [self._to_device(b) for b in micro_batches]
        batch_units = [count_units(b, self.loss.needs.normalize_by) for b in batches]
        local = torch.stack([sum(batch_units), sum(b["attention_mask"].sum().to(torch.float64) for b in batches)])
        units, tokens = self._all_reduce(local).unbind()
        units = units.clamp_min(1.0)
        sums: dict[str, torch.Tensor] = {}
        self.module.train()
        for k, batch in enumerate(batches):
            with self._micro_step(sync=k == len(batches) - 1), acc.autocast():
                out = self._forward(batch)
                acc.backward(out.loss * (world / units).to(out.loss.dtype))
            self._sum_metrics(sums, out, batch_units[k])
        metrics = self._reduce_metrics(sums, units)
        result = self._optimizer_step(metrics, tokens)
        result.sampled = sampled
        return result

    @contextlib.contextmanager
    def _micro_step(self, sync: bool):
        """One micro-batch's backward: the last of a step synchronises the gradients, the others only accumulate
        (DDP, FSDP: ``no_sync``). Under DeepSpeed ``accelerator.backward`` also steps the engine whenever Accelerate's
        ``sync_gradients`` is set (clipping, optimizer step, zeroing the gradients): it is set for the last only."""
        acc = self.acc
        if acc.distributed_type == DistributedType.DEEPSPEED:
            acc.sync_gradients = sync
            try:
                yield
            finally:
                acc.sync_gradients = True
        elif sync or acc.num_processes == 1:
            yield
        else:
            with acc.no_sync(self.module):
                yield

    def _optimizer_step(self, metrics: dict[str, torch.Tensor], tokens: torch.Tensor) -> StepResult:
        """Clip and step, or skip through the non-finite guard. Two host reads: the loss (with the token count),
        then the gradient norm. Both are global values (the loss is all-reduced, the gradients are synchronised), so
        every process takes the same branch.

        The norm is always measured (max_norm=inf clips nothing: the gradients are multiplied by exactly 1) so that
        a non-finite gradient under a finite loss is caught too. Under DeepSpeed the engine has already clipped (its
        own gradient_clipping, = trainer.max_grad_norm: prefkd.training.engine_checks) and stepped inside
        ``accelerator.backward``; clip_grad_norm_ returns its norm (or None) and ``optimizer.step`` is a no-op."""
        loss, token_count = torch.stack([metrics["loss"], tokens]).tolist()
        grad_norm = None
        if math.isfinite(loss):
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = self.acc.clip_grad_norm_(params, self.cfg.max_grad_norm or math.inf)
            if norm is not None:
                grad_norm = float(norm)
                metrics["grad_norm"] = torch.tensor(grad_norm, dtype=torch.float64, device=metrics["loss"].device)
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.loss.on_optimizer_step(self.state.global_step + 1)
            self.state.nonfinite_in_a_row = 0
            return StepResult(metrics, loss, token_count, grad_norm, stepped=True)
        skipped = self.guard.skip_step(self.state, math.isfinite(loss), loss, grad_norm)
        return StepResult(metrics, loss, token_count, grad_norm, stepped=False, skipped=skipped)


    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Dev loss (and the loss's metrics), normalised over the whole dev set like training."""
        if self.dev_set is None or len(self.dev_set) == 0:
            return {}
        self.module.eval()
        n = len(self.dev_set) if self.cfg.dev_limit is None else min(self.cfg.dev_limit, len(self.dev_set))
        mine = list(range(self.acc.process_index, n, self.acc.num_processes))
        sums: dict[str, torch.Tensor] = {}
        units = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        for start in range(0, len(mine), self.cfg.eval_batch_size):
            batch = self._batch(mine[start:start + self.cfg.eval_batch_size], self.dev_set)
            with self.acc.autocast():
                out = self._forward(batch)
            batch_units = count_units(batch, self.loss.needs.normalize_by)
            units = units + batch_units
            self._sum_metrics(sums, out, batch_units)
        dev = {}
        if sums:
            reduced = self._reduce_metrics(sums, self._all_reduce(units).clamp_min(1.0))
            dev = dict(zip((f"dev/{k}" for k in reduced), torch.stack(list(reduced.values())).tolist()))
        if self.cfg.eval.rouge:
            dev["dev/rougeL"] = self._dev_rouge()
        return dev

    def _dev_rouge(self) -> float:
        """Dev ROUGE-L of docs/methods.md §9 (sampled generations), on the main process, shared with the others."""
        from accelerate.utils import broadcast_object_list

        from prefkd.eval.dev_rouge import dev_rouge

        value = [None]
        if self.acc.is_main_process:
            e = self.cfg.eval
            records = self.dev_set.records[: e.rouge_limit] if e.rouge_limit else self.dev_set.records
            value[0] = dev_rouge(self.student, self.tokenizer, records,
                                 num_samples=e.rouge_samples, no_repeat_ngram_size=e.no_repeat_ngram_size,
                                 batch_size=self.cfg.eval_batch_size, max_new_tokens=e.max_new_tokens,
                                 seed=self.cfg.seed, progress=True)
        return broadcast_object_list(value)[0] if self.acc.num_processes > 1 else value[0]

    @property
    def select_metric(self) -> str:
        return select_metric(self.cfg)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train to ``total_steps`` (resuming per ``trainer.resume``); returns the run summary."""
        st = self.state = self.checkpoints.resume(self.cfg.resume, self.state)
        with preemption_signals() as received, self._progress_bar() as bar:
            self._evaluate_at_start()
            while st.global_step < self.total_steps:
                self.sampler.set_epoch(st.epoch, start=st.batches_in_epoch)  # resume inside the epoch exactly
                micro_batches = iter(self.loader)
                for _ in range(st.batches_in_epoch, len(self.sampler)):
                    step_batches = [next(micro_batches) for _ in range(self.micro_per_step)]
                    self._record(self._timed_step(step_batches), bar)
                    last = st.global_step >= self.total_steps
                    signum = self._agreed_signal(received)
                    stop = st.global_step == self.cfg.stop_at_step or signum != 0
                    end_of_epoch = self._count_batch(len(self.sampler))
                    self._evaluate_or_save(bar, due=end_of_epoch or last, save=stop)
                    if stop and not last:
                        return self._interrupt(signum)
                    if last or end_of_epoch:
                        break
        return self._finish()

    def _progress_bar(self):
        return tqdm(total=self.total_steps, initial=self.state.global_step, disable=not self.acc.is_main_process,
                    desc="train", dynamic_ncols=True)

    def _evaluate_at_start(self) -> None:
        st = self.state
        if st.global_step == 0 and self.cfg.eval_at_start and st.dev_loss_start is None:
            dev = self.evaluate()
            st.dev_loss_start = dev.get("dev/loss")
            self.checkpoints.after_eval(st, dev)
            self.tracker.log(dev, step=0)

    def _timed_step(self, micro_batches: list[dict]) -> tuple[StepResult, float]:
        t0 = time.perf_counter()
        result = self.train_step(micro_batches)
        return result, time.perf_counter() - t0

    def _record(self, timed: tuple[StepResult, float], bar) -> None:
        """The step into the state, the progress bar and the log; the non-finite guard's stop."""
        result, seconds = timed
        st = self.state
        st.global_step += 1
        st.tokens_seen += result.tokens
        st.train_seconds += seconds
        st.first_train_loss = st.first_train_loss if st.first_train_loss is not None else result.loss
        st.last_train_loss = result.loss
        self._window["tokens"] += result.tokens
        self._window["seconds"] += seconds
        if result.sampled is not None:
            self._count_sampled(result.sampled, seconds)
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / seconds:.0f}")
        if st.global_step % self.cfg.log_every == 0 or st.global_step == self.total_steps:
            self._log_train(result)
        elif result.skipped:  # every skipped step is logged, not only those on a log_every step
            record = {"train/loss": result.loss, **{f"train/{k}": v for k, v in result.skipped.items()}}
            if result.grad_norm is not None:
                record["train/grad_norm"] = result.grad_norm
            self.tracker.log(record | self._nonfinite_counts(), step=st.global_step)
        if self.guard.exceeded(st):
            bar.close()
            self._stop_nonfinite(result)

    def _count_sampled(self, sampled: SampledStep, seconds: float) -> None:
        """An on-policy step into the state (the run's totals) and the log window."""
        st = self.state
        st.sampled_steps += 1
        st.sampled_step_seconds += seconds
        st.generate_seconds += sampled.seconds
        st.generated_tokens += sampled.tokens
        st.fallback_rows += sampled.fallback_rows
        self._window["generate_s"] += sampled.seconds
        self._window["generated_tokens"] += sampled.tokens

    def _count_batch(self, batches_per_epoch: int) -> bool:
        """One more global batch of this epoch; True (and the next epoch begins) when it was the last one."""
        st = self.state
        st.batches_in_epoch += 1
        if st.batches_in_epoch < batches_per_epoch:
            return False
        st.epoch += 1
        st.batches_in_epoch = 0
        return True

    def _agreed_signal(self, received: list[int]) -> int:
        """The signal number every process should stop for (0 = none); agreed across processes."""
        local = received[0] if received else 0
        if self.acc.num_processes == 1:
            return local
        anyone = self._all_reduce(torch.tensor([float(local > 0)], device=self.acc.device)).item() > 0
        return (local or int(signal.SIGTERM)) if anyone else 0

    def _evaluate_or_save(self, bar, *, due: bool, save: bool) -> None:
        """Evaluate (and checkpoint) every ``eval_every`` steps and when ``due``; else save when ``save_every`` says
        so or when ``save`` (the run stops here)."""
        cfg, step = self.cfg, self.state.global_step
        if (cfg.eval_every and step % cfg.eval_every == 0) or due:
            dev = self.evaluate()
            self.tracker.log(dev, step=step)
            if dev:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in dev.items()))
            self.checkpoints.after_eval(self.state, dev)
        elif (cfg.save_every and step % cfg.save_every == 0) or save:
            self.checkpoints.save(f"step-{step}", self.state)

    def _interrupt(self, signum: int) -> dict:
        """Stopped before the end (``stop_at_step`` or a signal; the checkpoint is saved): the summary, or
        :class:`Preempted` for a signal."""
        log.info("stopped at step %d; resume with trainer.resume=auto", self.state.global_step)
        summary = self._finish(interrupted=True)
        if signum:
            raise Preempted(summary, signum)
        return summary

    # ---------------------------------------------------------------- logging and the end
    def _log_train(self, result: StepResult) -> None:
        names = sorted(result.metrics)
        values = torch.stack([result.metrics[n] for n in names]).tolist()
        record = {f"train/{n}": v for n, v in zip(names, values)}
        record.update({f"train/{k}": v for k, v in (result.skipped or {}).items()})
        record.update(self._nonfinite_counts())
        window = self._window
        record.update({"train/lr": self.scheduler.get_last_lr()[0],
                       "perf/tokens_per_s": window["tokens"] / max(window["seconds"], 1e-9),
                       "perf/step_time_s": window["seconds"] / max(self.cfg.log_every, 1),
                       "perf/peak_mem_mb": peak_memory_mb(self.acc.device), "train/epoch": self.state.epoch})
        if self.on_policy is not None:
            generate_s = window["generate_s"]
            record.update({"perf/generate_s": generate_s / max(self.cfg.log_every, 1),
                           "perf/generate_tok_s": window["generated_tokens"] / generate_s if generate_s else 0.0,
                           "train/sampled_steps": self.state.sampled_steps})
        self.tracker.log(record, step=self.state.global_step)
        self._window = self._empty_window()

    @staticmethod
    def _empty_window() -> dict[str, float]:
        return {"tokens": 0.0, "seconds": 0.0, "generate_s": 0.0, "generated_tokens": 0.0}

    def _nonfinite_counts(self) -> dict:
        return {"train/nonfinite_steps": self.state.nonfinite_steps,
                "train/nonfinite_in_a_row": self.state.nonfinite_in_a_row}

    def _stop_nonfinite(self, result: StepResult) -> None:
        """K skipped steps in a row: log, write the summary (finished: false, error), raise. No checkpoint."""
        message = self.guard.message(self.state, result.loss, result.grad_norm, self.checkpoints.last_good())
        log.error(message)
        summary = self._summary(interrupted=True) | {"stopped": "nonfinite", "error": message}
        self._write_summary(summary)
        raise NonFiniteLossError(message, summary)

    def _finish(self, interrupted: bool = False) -> dict:
        self.checkpoints.finish(self.state)
        summary = self._summary(interrupted)
        self._write_summary(summary)
        if self.acc.is_main_process:
            st, best = self.state, self.state.best or {}
            self.tracker.summary({f"best/{best.get('metric', 'dev').replace('/', '_')}": best.get("value"),
                                  "best/step": best.get("step"), "final/train_loss": st.last_train_loss,
                                  "final/dev_loss": summary["dev_loss_final"],
                                  "perf/tokens_per_s": summary["tokens_per_s"],
                                  "perf/peak_mem_mb": summary["peak_mem_mb"], "steps": st.global_step})
        return summary

    def _write_summary(self, summary: dict) -> None:
        if self.acc.is_main_process:
            atomic_write(self.run_dir / "train_summary.json", json.dumps(summary, indent=2))  # readers see a whole file

    def _summary(self, interrupted: bool = False) -> dict:
        st = self.state
        final = st.dev_history[-1] if st.dev_history else {}
        return {
            "run_dir": str(self.run_dir), "finished": not interrupted, "steps": st.global_step, "epochs": st.epoch,
            "tokens": st.tokens_seen, "wall_time_s": st.train_seconds,
            "tokens_per_s": st.tokens_seen / max(st.train_seconds, 1e-9),
            "first_train_loss": st.first_train_loss, "last_train_loss": st.last_train_loss,
            "dev_loss_start": st.dev_loss_start, "dev_loss_final": final.get("dev/loss"),
            "best": st.best, "nonfinite_steps": st.nonfinite_steps,
            "peak_mem_mb": peak_memory_mb(self.acc.device),
            "checkpoints": self.checkpoints.listing(),
            "fused_head": asdict(self.fused),  # which models handed the loss hidden states, not logits
        } | ({"on_policy": self._on_policy_summary()} if self.on_policy is not None else {})

    def _on_policy_summary(self) -> dict:
        """Sampled steps and their cost: generation time and speed, and the mean step time with and without
        sampling (``step_time_ratio``: sampled / dataset steps; None until the run has both)."""
        st = self.state
        dataset_steps = st.global_step - st.sampled_steps
        sampled_s = st.sampled_step_seconds / st.sampled_steps if st.sampled_steps else None
        dataset_s = (st.train_seconds - st.sampled_step_seconds) / dataset_steps if dataset_steps else None
        return {"fraction": self.on_policy.settings.fraction, "sampled_steps": st.sampled_steps,
                "dataset_steps": dataset_steps, "generate_s": st.generate_seconds,
                "generate_tok_s": st.generated_tokens / st.generate_seconds if st.generate_seconds else None,
                "fallback_rows": st.fallback_rows, "step_time_s_sampled": sampled_s, "step_time_s_dataset": dataset_s,
                "step_time_ratio": sampled_s / dataset_s if sampled_s and dataset_s else None}
