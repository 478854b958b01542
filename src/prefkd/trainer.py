"""The one training loop. It never looks at which loss it runs: the loss says what it needs (teacher,
hidden states, reference) and the trainer provides exactly that.

Batches (SPEC §2): the sampler yields one *global* batch per optimizer step (batch_size × processes ×
accumulation examples). It is cut into micro-batches and each process takes its slice, so one process
with batch 8 and two processes with batch 4 (or one with batch 4 and accumulation 2) see the same
examples. Loss sums are divided by the number of units (response tokens, or sequences) of the whole
global batch, counted before the first backward.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prefkd import checkpoint as ckpt
from prefkd.data.dataset import DistillDataset, collate
from prefkd.data.sampler import GlobalBatchSampler, shard
from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, ModelOutputs
from prefkd.models.bundle import ModelBundle
from prefkd.optim import build_optimizer, build_scheduler
from prefkd.tracking import Tracker, peak_memory_mb

log = logging.getLogger(__name__)

PREEMPT_EXIT_CODE = 75  # SIGTERM / SIGUSR1: the step finished, a checkpoint was saved, requeue and resume


class NonFiniteLossError(RuntimeError):
    """Raised after ``trainer.max_nonfinite_in_a_row`` optimizer steps in a row were skipped for a non-finite
    loss or gradient norm. The message names the step, the last good checkpoint and the likely causes;
    ``summary`` is the stopped run's summary (also in train_summary.json). Nothing is saved from that state."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class Preempted(Exception):
    """Raised after a SIGTERM/SIGUSR1 was honoured; ``summary`` is the interrupted run's summary."""

    def __init__(self, summary: dict, signum: int):
        super().__init__(f"stopped by signal {signum} at step {summary['steps']}; checkpoint saved")
        self.summary, self.signum = summary, signum


@contextlib.contextmanager
def preemption_signals():
    """While training, SIGTERM and SIGUSR1 only set a flag; the loop saves and stops after the step."""
    received: list[int] = []
    handled = [signal.SIGTERM, signal.SIGUSR1]
    try:
        previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in handled}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def select_metric(trainer_cfg) -> str:
    """``trainer.select_metric``; ``auto``: dev ROUGE-L when it is computed (SPEC §2), else the dev loss."""
    metric = trainer_cfg.select_metric
    if metric == "auto":
        return "dev/rougeL" if trainer_cfg.eval.rouge else "dev/loss"
    return metric


def higher_is_better(metric: str) -> bool:
    """ROUGE, accuracies and exact match grow with quality; losses (everything else) shrink."""
    return any(k in metric for k in ("rouge", "acc", "match"))


def count_units(batch: dict, normalize_by: str) -> int:
    """Response tokens (labels != -100) or sequences of a micro-batch: the loss's normaliser."""
    if normalize_by == "sequences":
        return int(batch.get("num_sequences", batch["input_ids"].shape[0]))
    return int(batch["labels"].ne(-100).sum())


class Trainer:
    def __init__(self, cfg, *, accelerator, student: ModelBundle, teacher: ModelBundle | None,
                 loss: DistillationLoss, train_set: DistillDataset, dev_set: DistillDataset | None,
                 run_dir: Path, tracker: Tracker, teacher_cache=None):
        self.cfg, self.acc, self.loss, self.run_dir, self.tracker = cfg, accelerator, loss, Path(run_dir), tracker
        self.train_set, self.dev_set = train_set, dev_set
        self.tokenizer = student.tokenizer
        self.pad = student.tokenizer.pad_token_id
        self.teacher_pad = teacher.tokenizer.pad_token_id if teacher else None
        self.ckpt_dir = self.run_dir / "checkpoints"
        world, accum = accelerator.num_processes, cfg.gradient_accumulation_steps
        self.micro = cfg.batch_size
        self.sampler = GlobalBatchSampler(train_set.lengths, global_batch_size=cfg.batch_size * world * accum,
                                          seed=cfg.seed, shuffle=True, group_by_length=cfg.group_by_length,
                                          drop_last=True)
        if len(self.sampler) == 0:
            raise ValueError(f"the training set has {len(train_set)} examples, fewer than one optimizer step's "
                             f"{cfg.batch_size * world * accum} (batch_size × processes × gradient_accumulation_steps).")
        self.total_steps = cfg.max_steps or cfg.max_epochs * len(self.sampler)

        self.loss.to(accelerator.device)
        model = student.model
        if cfg.compile:
            model = torch.compile(model)
        optimizer = build_optimizer(model, loss, cfg)
        # The scheduler is not handed to accelerate: its wrapper steps once per process, we step once per update.
        self.student, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = build_scheduler(self.optimizer.optimizer, cfg, self.total_steps)
        self.teacher = teacher.model.to(accelerator.device) if teacher and teacher.model is not None else None
        self.teacher_cache = teacher_cache  # prefkd.teacher_cache.TeacherCache: teacher log-probs from disk
        self._build_reference(student, teacher)
        self.state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens_seen": 0, "train_seconds": 0.0,
                      "first_train_loss": None, "last_train_loss": None, "dev_history": [], "best": None,
                      "dev_loss_start": None, "nonfinite_steps": 0, "nonfinite_in_a_row": 0}

    # ---------------------------------------------------------------- forward
    def _forward(self, batch: dict) -> LossOutput:
        needs = self.loss.needs
        out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=needs.hidden_states, use_cache=False)
        student = ModelOutputs(out.logits, out.hidden_states[-1] if needs.hidden_states else None,
                               self.acc.unwrap_model(self.student))
        teacher = None
        if needs.teacher and self.teacher_cache is not None:
            logits = self.teacher_cache.logits(batch["cache_split"], batch["example_index"].tolist(),
                                               batch["teacher_input_ids"].shape[1], self.acc.device)
            teacher = ModelOutputs(logits)
        elif needs.teacher:
            with torch.no_grad():
                t = self.teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                                 output_hidden_states=needs.hidden_states, use_cache=False)
            teacher = ModelOutputs(t.logits, t.hidden_states[-1] if needs.hidden_states else None, self.teacher)
        reference = self._reference_forward(batch) if needs.reference else None
        return self.loss(LossInputs(batch=batch, student=student, teacher=teacher, reference=reference,
                                    step=self.state["global_step"], total_steps=self.total_steps))

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
            self.reference = teacher.model.to(self.acc.device)
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
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        if self.reference_disables_adapter:
            model = self.acc.unwrap_model(self.student)
            was_training = model.training
            model.eval()
            with model.disable_adapter():
                logits = model(**kwargs).logits
            model.train(was_training)
            return ModelOutputs(logits)
        return ModelOutputs(self.reference(**kwargs).logits, model=self.reference)

    def _batch(self, indices: list[int], dataset) -> dict:
        make = getattr(dataset, "collate", collate)  # a dataset may bring its own (preference pairs: 2B rows)
        batch = make([dataset[i] for i in indices], self.pad, self.teacher_pad)
        batch["example_index"] = torch.tensor(indices)  # the examples' positions in their dataset (teacher cache)
        batch["cache_split"] = "train" if dataset is self.train_set else "dev"
        return {k: v.to(self.acc.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(t, reduction="sum").tolist() if self.acc.num_processes > 1 else t.tolist()

    # ---------------------------------------------------------------- one optimizer step
    def _train_step(self, global_batch: list[int]) -> dict:
        acc, world, rank = self.acc, self.acc.num_processes, self.acc.process_index
        per_micro = self.micro * world
        micro_batches = [shard(global_batch[k:k + per_micro], rank, world)
                         for k in range(0, len(global_batch), per_micro)]
        batches = [self._batch(idx, self.train_set) for idx in micro_batches]
        n_local = sum(count_units(b, self.loss.needs.normalize_by) for b in batches)
        tokens_local = sum(int(b["attention_mask"].sum()) for b in batches)
        n_global, tokens_global = self._reduce([n_local, tokens_local])
        n_global = max(n_global, 1.0)
        sums: dict[str, float] = {}
        self.student.train()
        self.loss.train()
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1
            ctx = contextlib.nullcontext() if sync or world == 1 else acc.no_sync(self.student)
            with ctx, acc.autocast():
                out = self._forward(batch)
                acc.backward(out.loss * (world / n_global))
            for name, v in {"loss": out.loss, **out.metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach())
        names = sorted(sums)
        metrics = dict(zip(names, (v / n_global for v in self._reduce([sums[n] for n in names]))))
        self._sync_loss_grads()
        loss_ok, grad_ok = math.isfinite(metrics["loss"]), True
        if loss_ok:
            # The norm is always measured (max_norm=inf clips nothing: the gradients are multiplied by exactly 1)
            # so that a non-finite gradient under a finite loss is caught too. None: DeepSpeed clips internally.
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = acc.clip_grad_norm_(params, self.cfg.max_grad_norm or math.inf)
            if norm is not None:
                metrics["grad_norm"] = float(norm)
                grad_ok = math.isfinite(metrics["grad_norm"])
        if world > 1:  # every rank must take the same branch (one raising while the others wait would hang)
            bad_loss, bad_grad = self._reduce([float(not loss_ok), float(not grad_ok)])
            loss_ok, grad_ok = bad_loss == 0, bad_grad == 0
        if loss_ok and grad_ok:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.loss.on_optimizer_step(self.state["global_step"] + 1)
            self.state["nonfinite_in_a_row"] = 0
        else:
            self._skip_step(loss_ok, metrics)
        metrics["tokens"] = tokens_global
        return metrics

    def _skip_step(self, loss_ok: bool, metrics: dict) -> None:
        """A non-finite loss or gradient norm: no optimizer, scheduler or loss-module update; gradients dropped.

        fp16 loss scaling: an overflow of the *scaled* gradients is routine there. With the gradients dropped,
        ``optimizer.step()`` moves no parameter but lets the GradScaler see the inf/nan that ``unscale_`` (in
        clip_grad_norm_) recorded, lower its scale and reset for the next step. Such overflows count as skipped
        steps, and towards ``max_nonfinite_in_a_row`` only once the scale is down to 1 (before that the scaler
        is still searching for a scale that fits)."""
        scaler = getattr(self.acc, "scaler", None)
        scaled = loss_ok and scaler is not None and scaler.is_enabled()  # loss_ok: unscale_ ran
        recoverable = scaled and scaler.get_scale() > 1.0
        self.optimizer.zero_grad(set_to_none=True)
        if scaled:
            self.optimizer.step()  # no gradients: no update; the scaler backs off and resets its per-step state
        st = self.state
        st["nonfinite_steps"] += 1
        if not recoverable:
            st["nonfinite_in_a_row"] += 1
        what = "loss" if not loss_ok else "gradient norm"
        log.warning("non-finite %s at step %d (loss %s, gradient norm %s): optimizer step skipped (%d in a row)%s",
                    what, st["global_step"] + 1, metrics["loss"], metrics.get("grad_norm", "not computed"),
                    st["nonfinite_in_a_row"], "; the fp16 loss scaler lowers its scale" if recoverable else "")
        metrics.update({"skipped": 1.0, "nonfinite_loss": float(not loss_ok), "nonfinite_grad": float(loss_ok)})

    def _sync_loss_grads(self) -> None:
        """The loss's own modules are not wrapped in DDP: average their gradients across processes."""
        if self.acc.num_processes == 1:
            return
        for p in self.loss.parameters():
            if p.grad is not None:
                p.grad.copy_(self.acc.reduce(p.grad, reduction="mean"))

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Dev loss (and the loss's metrics), normalised over the whole dev set like training."""
        if self.dev_set is None or len(self.dev_set) == 0:
            return {}
        self.student.eval()
        self.loss.eval()
        n = len(self.dev_set) if self.cfg.dev_limit is None else min(self.cfg.dev_limit, len(self.dev_set))
        mine = list(range(self.acc.process_index, n, self.acc.num_processes))
        sums: dict[str, float] = {"units": 0.0}
        for start in range(0, len(mine), self.cfg.eval_batch_size):
            batch = self._batch(mine[start:start + self.cfg.eval_batch_size], self.dev_set)
            with self.acc.autocast():
                out = self._forward(batch)
            sums["units"] += count_units(batch, self.loss.needs.normalize_by)
            for name, v in {"loss": out.loss, **out.metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(v)
        names = sorted(sums)
        totals = dict(zip(names, self._reduce([sums[k] for k in names])))
        units = max(totals.pop("units"), 1.0)
        dev = {f"dev/{k}": v / units for k, v in totals.items()}
        if self.cfg.eval.rouge:
            dev["dev/rougeL"] = self._dev_rouge()
        return dev

    def _dev_rouge(self) -> float:
        """Dev ROUGE-L of SPEC §9 (sampled generations), on the main process, shared with the others."""
        from accelerate.utils import broadcast_object_list

        from prefkd.eval.dev_rouge import dev_rouge

        value = [None]
        if self.acc.is_main_process:
            e = self.cfg.eval
            records = self.dev_set.records[: e.rouge_limit] if e.rouge_limit else self.dev_set.records
            value[0] = dev_rouge(self.acc.unwrap_model(self.student), self.tokenizer, records,
                                 num_samples=e.rouge_samples, no_repeat_ngram_size=e.no_repeat_ngram_size,
                                 batch_size=self.cfg.eval_batch_size, max_new_tokens=e.max_new_tokens,
                                 seed=self.cfg.seed, progress=True)
        return broadcast_object_list(value)[0] if self.acc.num_processes > 1 else value[0]

    @property
    def select_metric(self) -> str:
        return select_metric(self.cfg)

    def _score(self, value: float | None) -> float:
        """Lower is better: losses as they are, accuracies and ROUGE negated."""
        if value is None:
            return math.inf
        return -value if higher_is_better(self.select_metric) else value

    # ---------------------------------------------------------------- checkpoints
    def _save(self, name: str) -> Path:
        return ckpt.save_checkpoint(self.ckpt_dir / name, accelerator=self.acc, model=self.student,
                                    tokenizer=self.tokenizer, loss_module=self.loss, optimizer=self.optimizer,
                                    scheduler=self.scheduler, state=self.state)

    def _after_eval(self, dev: dict) -> None:
        """Save step-N, update `best` by select_metric, keep the `keep_best` best step checkpoints + newest."""
        step = self.state["global_step"]
        metric = self.select_metric
        value = dev.get(metric)
        self.state["dev_history"].append({"step": step, **dev})
        improved = value is not None and (self.state["best"] is None or
                                          self._score(value) < self._score(self.state["best"]["value"]))
        if improved:
            self.state["best"] = {"step": step, "metric": metric, "value": value}
        if step == 0:
            return
        path = self._save(f"step-{step}")
        if self.acc.is_main_process:
            if improved:
                ckpt.link_checkpoint(path, self.ckpt_dir / "best")
            self._prune()
        self.acc.wait_for_everyone()

    def _prune(self) -> None:
        scores = {h["step"]: self._score(h.get(self.select_metric)) for h in self.state["dev_history"]}
        steps = sorted(int(p.name[5:]) for p in self.ckpt_dir.glob("step-*") if p.name[5:].isdigit())
        keep = set(sorted(steps, key=lambda s: scores.get(s, math.inf))[: self.cfg.keep_best]) | set(steps[-1:])
        for s in steps:
            if s not in keep:  # renamed first: a kill mid-delete leaves a dot-folder that resume ignores
                doomed = self.ckpt_dir / f".deleting-step-{s}"
                (self.ckpt_dir / f"step-{s}").rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    def _resume(self) -> None:
        mode = str(self.cfg.resume)
        path = None if mode == "never" else ckpt.find_latest(self.ckpt_dir) if mode == "auto" else Path(mode)
        if path is None:
            return
        self.state.update(ckpt.load_checkpoint(path, accelerator=self.acc, model=self.student, loss_module=self.loss,
                                               optimizer=self.optimizer, scheduler=self.scheduler))
        log.info("resumed from %s at step %d", path, self.state["global_step"])
        self._relink_best()

    def _relink_best(self) -> None:
        """After a resume: make `best` the checkpoint the state names (a kill may have come between saving it and
        linking `best`)."""
        best = self.state.get("best")
        if not best or not self.acc.is_main_process:
            return
        link, src = self.ckpt_dir / "best", self.ckpt_dir / f"step-{best['step']}"
        if ckpt.is_complete(link) and json.loads((link / ckpt.STATE_DIR / "state.json").read_text())[
                "global_step"] == best["step"]:
            return
        if ckpt.is_complete(src):
            ckpt.link_checkpoint(src, link)
            log.info("re-linked best -> %s", src.name)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        with preemption_signals() as received:
            return self._fit(received)

    def _signalled(self, received: list[int]) -> int:
        """The signal number every process should stop for (0 = none); agreed across processes."""
        local = received[0] if received else 0
        if self.acc.num_processes == 1:
            return local
        anyone = self._reduce([float(local > 0)])[0] > 0
        return (local or int(signal.SIGTERM)) if anyone else 0

    def _fit(self, received: list[int]) -> dict:
        cfg, acc, st = self.cfg, self.acc, self.state
        self._resume()
        if st["global_step"] == 0 and cfg.eval_at_start and st["dev_loss_start"] is None:
            dev = self.evaluate()
            st["dev_loss_start"] = dev.get("dev/loss")
            self._after_eval(dev)
            self.tracker.log(dev, step=0)
        bar = tqdm(total=self.total_steps, initial=st["global_step"], disable=not acc.is_main_process,
                   desc="train", dynamic_ncols=True)
        window = {"tokens": 0.0, "seconds": 0.0}
        while st["global_step"] < self.total_steps:
            self.sampler.set_epoch(st["epoch"])
            batches = list(self.sampler)
            for global_batch in batches[st["batches_in_epoch"]:]:
                t0 = time.perf_counter()
                m = self._train_step(global_batch)
                seconds = time.perf_counter() - t0
                st["global_step"] += 1
                st["batches_in_epoch"] += 1
                st["tokens_seen"] += m["tokens"]
                st["train_seconds"] += seconds
                st["first_train_loss"] = st["first_train_loss"] if st["first_train_loss"] is not None else m["loss"]
                st["last_train_loss"] = m["loss"]
                window["tokens"] += m["tokens"]
                window["seconds"] += seconds
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens'] / seconds:.0f}")
                if st["global_step"] % cfg.log_every == 0 or st["global_step"] == self.total_steps:
                    self._log_train(m, window)
                    window = {"tokens": 0.0, "seconds": 0.0}
                elif m.get("skipped"):  # every skipped step is logged, not only those on a log_every step
                    self.tracker.log({f"train/{k}": m[k] for k in ("loss", "skipped", "nonfinite_loss",
                                                                   "nonfinite_grad", "grad_norm") if k in m}
                                     | self._nonfinite_counts(), step=st["global_step"])
                limit = cfg.max_nonfinite_in_a_row
                if limit and st["nonfinite_in_a_row"] >= limit:
                    bar.close()
                    self._stop_nonfinite(m, limit)  # raises NonFiniteLossError; nothing saved from this state
                last = st["global_step"] >= self.total_steps
                signum = self._signalled(received)
                stop = st["global_step"] == self.cfg.stop_at_step or signum != 0
                end_of_epoch = st["batches_in_epoch"] == len(batches)
                if end_of_epoch:
                    st["epoch"] += 1
                    st["batches_in_epoch"] = 0
                if (cfg.eval_every and st["global_step"] % cfg.eval_every == 0) or end_of_epoch or last:
                    dev = self.evaluate()
                    self.tracker.log(dev, step=st["global_step"])
                    if dev:
                        bar.write(f"step {st['global_step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in dev.items()))
                    self._after_eval(dev)
                elif (cfg.save_every and st["global_step"] % cfg.save_every == 0) or stop:
                    self._save(f"step-{st['global_step']}")
                if stop and not last:
                    bar.close()
                    log.info("stopped at step %d; resume with trainer.resume=auto", st["global_step"])
                    summary = self._finish(interrupted=True)
                    if signum:
                        raise Preempted(summary, signum)
                    return summary
                if last or end_of_epoch:
                    break
        bar.close()
        return self._finish()

    def _log_train(self, m: dict, window: dict) -> None:
        lr = self.scheduler.get_last_lr()[0]
        rate = window["tokens"] / max(window["seconds"], 1e-9)
        record = {f"train/{k}": v for k, v in m.items() if k != "tokens"}
        record.update(self._nonfinite_counts())
        record.update({"train/lr": lr, "perf/tokens_per_s": rate,
                       "perf/step_time_s": window["seconds"] / max(self.cfg.log_every, 1),
                       "perf/peak_mem_mb": peak_memory_mb(self.acc.device), "train/epoch": self.state["epoch"]})
        self.tracker.log(record, step=self.state["global_step"])

    def _nonfinite_counts(self) -> dict:
        return {"train/nonfinite_steps": self.state["nonfinite_steps"],
                "train/nonfinite_in_a_row": self.state["nonfinite_in_a_row"]}

    def _last_good_checkpoint(self) -> Path | None:
        """The newest complete checkpoint saved right after a successful optimizer step (not inside a run of
        skipped steps); step-N preferred over its `last`/`best` twins."""
        found, found_step = None, -1
        for child in sorted(self.ckpt_dir.iterdir()) if self.ckpt_dir.is_dir() else []:
            if child.name.startswith(".") or not ckpt.is_complete(child):
                continue
            try:
                saved = json.loads((child / ckpt.STATE_DIR / "state.json").read_text())
            except (OSError, ValueError):
                continue
            step = saved.get("global_step", -1)
            if saved.get("nonfinite_in_a_row", 0) == 0 and (
                    step > found_step or (step == found_step and child.name.startswith("step-"))):
                found, found_step = child, step
        return found

    def _stop_nonfinite(self, m: dict, limit: int) -> None:
        """K skipped steps in a row: log, write the summary (finished: false, error), raise. No checkpoint."""
        st = self.state
        step, k = st["global_step"], st["nonfinite_in_a_row"]
        good = self._last_good_checkpoint()
        if good is not None:
            good_step = json.loads((good / ckpt.STATE_DIR / "state.json").read_text())["global_step"]
            where = (f"the last good checkpoint is {good} (step {good_step}); to go on from there after a fix, "
                     f"rerun with trainer.resume={good}")
        else:
            where = "no checkpoint was saved yet (none before the first skipped step)"
        norm = m.get("grad_norm")
        message = (
            f"training stopped at step {step}: {k} optimizer steps in a row (steps {step - k + 1}..{step}) had a "
            f"non-finite loss or gradient norm and were skipped (last: loss {m['loss']}, gradient norm "
            f"{'not computed' if norm is None else norm}; trainer.max_nonfinite_in_a_row={limit}). Nothing was "
            f"saved from this state; {where}. Likely causes: an fp16 overflow (try trainer.precision=bf16 or "
            f"trainer.precision=no), a learning rate too high (lower trainer.lr or add warm-up), or bad data "
            f"(look at the examples of these steps). trainer.max_nonfinite_in_a_row=0 keeps skipping instead.")
        log.error(message)
        summary = self._summary(interrupted=True)
        summary.update({"stopped": "nonfinite", "error": message})
        if self.acc.is_main_process:
            (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        raise NonFiniteLossError(message, summary)

    def _finish(self, interrupted: bool = False) -> dict:
        st = self.state
        step_dir = self.ckpt_dir / f"step-{st['global_step']}"
        if ckpt.is_complete(step_dir):
            if self.acc.is_main_process:
                ckpt.link_checkpoint(step_dir, self.ckpt_dir / "last")
            self.acc.wait_for_everyone()
        else:
            self._save("last")
        summary = self._summary(interrupted)
        if self.acc.is_main_process:
            (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
            best = st["best"] or {}
            self.tracker.summary({f"best/{best.get('metric', 'dev').replace('/', '_')}": best.get("value"),
                                  "best/step": best.get("step"), "final/train_loss": st["last_train_loss"],
                                  "final/dev_loss": summary["dev_loss_final"], "perf/tokens_per_s": summary["tokens_per_s"],
                                  "perf/peak_mem_mb": summary["peak_mem_mb"], "steps": st["global_step"]})
        return summary

    def _summary(self, interrupted: bool = False) -> dict:
        st = self.state
        final = st["dev_history"][-1] if st["dev_history"] else {}
        checkpoints = sorted(self.ckpt_dir.iterdir()) if self.ckpt_dir.is_dir() else []
        summary = {
            "run_dir": str(self.run_dir), "finished": not interrupted, "steps": st["global_step"], "epochs": st["epoch"],
            "tokens": st["tokens_seen"], "wall_time_s": st["train_seconds"],
            "tokens_per_s": st["tokens_seen"] / max(st["train_seconds"], 1e-9),
            "first_train_loss": st["first_train_loss"], "last_train_loss": st["last_train_loss"],
            "dev_loss_start": st["dev_loss_start"], "dev_loss_final": final.get("dev/loss"),
            "best": st["best"], "nonfinite_steps": st["nonfinite_steps"],
            "peak_mem_mb": peak_memory_mb(self.acc.device),
            "checkpoints": {p.name: str(p) for p in checkpoints if not p.name.startswith(".")},
        }
        return summary
