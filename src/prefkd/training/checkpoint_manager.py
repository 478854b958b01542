"""A run's ``checkpoints/`` folder: ``step-N`` saves, the ``best`` and ``last`` links, pruning and resume.

Every ``step-N`` is complete and atomic (:mod:`prefkd.training.checkpoint`). ``best`` is a hard-linked copy of the
step with the best ``trainer.select_metric`` so far, ``last`` of the final step. After each evaluation the
``keep_best`` best step checkpoints and the newest are kept; the others are renamed to a dot-folder first, so a kill
mid-delete leaves nothing that resume would pick up.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

from prefkd.training import checkpoint as ckpt
from prefkd.training.state import TrainState

log = logging.getLogger("prefkd.training.trainer")


def higher_is_better(metric: str) -> bool:
    """ROUGE, accuracies and exact match grow with quality; losses (everything else) shrink."""
    return any(k in metric for k in ("rouge", "acc", "match"))


class CheckpointManager:
    def __init__(self, directory: Path, *, accelerator, module, tokenizer, optimizer, scheduler, metric: str,
                 keep_best: int):
        self.dir, self.acc, self.metric, self.keep_best = Path(directory), accelerator, metric, keep_best
        self.parts = dict(module=module, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler)

    def score(self, value: float | None) -> float:
        """Lower is better: losses as they are, accuracies and ROUGE negated; no value is the worst."""
        if value is None:
            return math.inf
        return -value if higher_is_better(self.metric) else value

    def save(self, name: str, state: TrainState) -> Path:
        """Everything needed to resume, into ``checkpoints/<name>`` (collective: every process calls)."""
        return ckpt.save_checkpoint(self.dir / name, accelerator=self.acc, state=state.to_dict(), **self.parts)

    def after_eval(self, state: TrainState, dev: dict) -> None:
        """Record an evaluation; past step 0 save ``step-N``, move ``best`` when it improved, prune."""
        step, value = state.global_step, dev.get(self.metric)
        state.dev_history.append({"step": step, **dev})
        improved = value is not None and (state.best is None or self.score(value) < self.score(state.best["value"]))
        if improved:
            state.best = {"step": step, "metric": self.metric, "value": value}
        if step == 0:
            return
        path = self.save(f"step-{step}", state)
        if self.acc.is_main_process:
            if improved:
                ckpt.link_checkpoint(path, self.dir / "best")
            self.prune(state)
        self.acc.wait_for_everyone()

    def prune(self, state: TrainState) -> None:
        """Keep the ``keep_best`` best step checkpoints by the metric, and the newest."""
        scores = {h["step"]: self.score(h.get(self.metric)) for h in state.dev_history}
        steps = sorted(int(p.name[5:]) for p in self.dir.glob("step-*") if p.name[5:].isdigit())
        keep = set(sorted(steps, key=lambda s: scores.get(s, math.inf))[: self.keep_best]) | set(steps[-1:])
        for s in steps:
            if s not in keep:  # renamed first: a kill mid-delete leaves a dot-folder that resume ignores
                doomed = self.dir / f".deleting-step-{s}"
                (self.dir / f"step-{s}").rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    def resume(self, mode: str, state: TrainState) -> TrainState:
        """``trainer.resume``: ``never``, ``auto`` (the newest complete checkpoint, if any) or a checkpoint path."""
        mode = str(mode)
        path = None if mode == "never" else ckpt.find_latest(self.dir) if mode == "auto" else Path(mode)
        if path is None:
            return state
        saved = ckpt.load_checkpoint(path, accelerator=self.acc, module=self.parts["module"],
                                     optimizer=self.parts["optimizer"], scheduler=self.parts["scheduler"])
        state = TrainState.from_dict({**state.to_dict(), **saved})
        log.info("resumed from %s at step %d", path, state.global_step)
        self.relink_best(state)
        return state

    def relink_best(self, state: TrainState) -> None:
        """Make ``best`` the checkpoint the state names (a kill may have come between saving it and linking)."""
        if not state.best or not self.acc.is_main_process:
            return
        link, src = self.dir / "best", self.dir / f"step-{state.best['step']}"
        if ckpt.is_complete(link) and ckpt.read_state(link)["global_step"] == state.best["step"]:
            return
        if ckpt.is_complete(src):
            ckpt.link_checkpoint(src, link)
            log.info("re-linked best -> %s", src.name)

    def finish(self, state: TrainState) -> None:
        """``last``: a link to this step's checkpoint when there is one, else a new save."""
        step_dir = self.dir / f"step-{state.global_step}"
        if ckpt.is_complete(step_dir):
            if self.acc.is_main_process:
                ckpt.link_checkpoint(step_dir, self.dir / "last")
            self.acc.wait_for_everyone()
        else:
            self.save("last", state)

    def last_good(self) -> tuple[Path, int] | None:
        """The newest complete checkpoint saved right after a successful optimizer step (not inside a run of skipped
        steps), and its step; step-N preferred over its `last`/`best` twins."""
        found, found_step = None, -1
        for child in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
            if child.name.startswith(".") or not ckpt.is_complete(child):
                continue
            try:
                saved = ckpt.read_state(child)
            except (OSError, ValueError):
                continue
            step = saved.get("global_step", -1)
            if saved.get("nonfinite_in_a_row", 0) == 0 and (
                    step > found_step or (step == found_step and child.name.startswith("step-"))):
                found, found_step = child, step
        return (found, found_step) if found is not None else None

    def listing(self) -> dict[str, str]:
        """``{name: path}`` of the checkpoints present (the run summary's ``checkpoints``)."""
        children = sorted(self.dir.iterdir()) if self.dir.is_dir() else []
        return {p.name: str(p) for p in children if not p.name.startswith(".")}
