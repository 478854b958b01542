"""What a training run knows about itself between steps: saved as ``trainer_state/state.json`` in every checkpoint
and restored on resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    global_step: int = 0                      # optimizer steps taken
    epoch: int = 0                            # epochs finished
    batches_in_epoch: int = 0                 # global batches of the current epoch already trained on
    tokens_seen: float = 0.0                  # non-padding tokens of all processes
    train_seconds: float = 0.0                # time spent in training steps (not evaluation or saving)
    first_train_loss: float | None = None
    last_train_loss: float | None = None
    dev_history: list[dict] = field(default_factory=list)  # {"step": N, "dev/<metric>": value, ...} per evaluation
    best: dict | None = None                  # {"step", "metric", "value"} of the best evaluation so far
    dev_loss_start: float | None = None       # dev loss before training (trainer.eval_at_start)
    nonfinite_steps: int = 0                  # optimizer steps skipped for a non-finite loss or gradient norm
    nonfinite_in_a_row: int = 0               # ... in a row, up to now
    sampled_steps: int = 0                    # on-policy steps (trained on the student's samples)
    sampled_step_seconds: float = 0.0         # ... their time, sampling included
    generate_seconds: float = 0.0             # time spent sampling
    generated_tokens: int = 0                 # response tokens sampled (this process)
    fallback_rows: int = 0                    # sampled rows that kept their dataset response (on_policy.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        """A state from ``state.json``; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})
