"""The non-finite guard: an optimizer step whose loss or gradient norm is inf/NaN is skipped, and
``trainer.max_nonfinite_in_a_row`` skipped steps in a row stop the run with an error that says what to do."""

from __future__ import annotations

import logging
from pathlib import Path

from prefkd.training.state import TrainState

log = logging.getLogger("prefkd.training.trainer")


class NonFiniteLossError(RuntimeError):
    """Raised after ``trainer.max_nonfinite_in_a_row`` optimizer steps in a row were skipped for a non-finite
    loss or gradient norm. The message names the step, the last good checkpoint and the likely causes;
    ``summary`` is the stopped run's summary (also in train_summary.json). Nothing is saved from that state."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class NonFiniteGuard:
    def __init__(self, accelerator, optimizer, limit: int):
        self.acc, self.optimizer, self.limit = accelerator, optimizer, limit

    def skip_step(self, state: TrainState, loss_ok: bool, loss: float, grad_norm: float | None) -> dict[str, float]:
        """A non-finite loss or gradient norm: no optimizer, scheduler or loss-module update; gradients dropped.
        Returns the step's extra metrics (``skipped``, ``nonfinite_loss``, ``nonfinite_grad``).

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
        state.nonfinite_steps += 1
        if not recoverable:
            state.nonfinite_in_a_row += 1
        what = "loss" if not loss_ok else "gradient norm"
        log.warning("non-finite %s at step %d (loss %s, gradient norm %s): optimizer step skipped (%d in a row)%s",
                    what, state.global_step + 1, loss, "not computed" if grad_norm is None else grad_norm,
                    state.nonfinite_in_a_row, "; the fp16 loss scaler lowers its scale" if recoverable else "")
        return {"skipped": 1.0, "nonfinite_loss": float(not loss_ok), "nonfinite_grad": float(loss_ok)}

    def exceeded(self, state: TrainState) -> bool:
        return bool(self.limit) and state.nonfinite_in_a_row >= self.limit

    def message(self, state: TrainState, loss: float, grad_norm: float | None, last_good: tuple[Path, int] | None
                ) -> str:
        """Why the run stops, where to go on from (``last_good``: the last good checkpoint and its step) and what
        usually causes it."""
        step, k = state.global_step, state.nonfinite_in_a_row
        if last_good is not None:
            where = (f"the last good checkpoint is {last_good[0]} (step {last_good[1]}); to go on from there after a "
                     f"fix, rerun with trainer.resume={last_good[0]}")
        else:
            where = "no checkpoint was saved yet (none before the first skipped step)"
        return (
            f"training stopped at step {step}: {k} optimizer steps in a row (steps {step - k + 1}..{step}) had a "
            f"non-finite loss or gradient norm and were skipped (last: loss {loss}, gradient norm "
            f"{'not computed' if grad_norm is None else grad_norm}; trainer.max_nonfinite_in_a_row={self.limit}). "
            f"Nothing was saved from this state; {where}. Likely causes: an fp16 overflow (try trainer.precision=bf16 "
            f"or trainer.precision=no), a learning rate too high (lower trainer.lr or add warm-up), or bad data "
            f"(look at the examples of these steps). trainer.max_nonfinite_in_a_row=0 keeps skipping instead.")
