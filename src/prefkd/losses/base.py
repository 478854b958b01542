"""The loss interface every method implements.

A loss is an ``nn.Module`` built from ``config/loss/*.yaml`` by Hydra's ``_target_``. It says what it
needs through :class:`Needs`; the trainer runs exactly those forward passes and hands the results over
in a :class:`LossInputs`. Its own parameters (projectors, salience heads, learned cost weights) are the
"trainable modules": they train inside the same prepared module as the student
(:class:`prefkd.training.distill_module.DistillModule`, so DDP/FSDP synchronise them), in their own optimizer group
with ``projector_lr``, and every checkpoint saves them.

Normalisation (docs/methods.md §2): ``forward`` returns the **sum** of its per-token terms over the micro-batch.
The trainer divides by the number of student response tokens in the *global* batch (all micro-batches of
one optimizer step, all ranks), so one process with batch 8 and two processes with batch 4 agree.
A loss that is per sequence (DPO) sets ``Needs.normalize_by = "sequences"``.

Fused output heads (issue 17): a loss that sets ``fused_head = True`` may receive, instead of a model's logits, its
last hidden state and an :class:`~prefkd.models.heads.OutputHead` (``ModelOutputs.head``, ``logits`` None); it reads
either through :attr:`ModelOutputs.logit_source` and hands that to the chunked engine, which projects per chunk.
The trainer fuses only for such losses, with ``trainer.fused_head`` on and a head the adapter recognises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from prefkd.losses.chunked import HiddenRows, Logits
from prefkd.models.heads import OutputHead
from prefkd.utils.labels import IGNORE_INDEX


@dataclass(frozen=True)
class Needs:
    """What a loss asks the trainer for."""

    teacher: bool = False  # teacher forward pass (eval mode, no_grad)
    hidden_states: bool = False  # last hidden states of the student (and of the teacher when it runs)
    reference: str | None = None  # "initial" (the starting policy) | "teacher": a reference forward on the student rows
    normalize_by: Literal["tokens", "sequences"] = "tokens"
    pairs: bool = False  # trains on preference pairs (a dataset with `kind: preference`), 2B rows per batch


@dataclass
class ModelOutputs:
    """One model's forward pass over a batch.

    logits: B×T×V (the model's dtype; losses upcast per chunk), or None when the trainer fused the head (then
    ``hidden`` and ``head`` are set). hidden: B×T×d last hidden state or None.
    model: the (unwrapped) model, for its embedding tables and output head (used detached).
    head: the model's output head when its logits were not built (a loss with ``fused_head``), else None.
    """

    logits: torch.Tensor | None
    hidden: torch.Tensor | None = None
    model: nn.Module | None = None
    head: OutputHead | None = None

    @property
    def logit_source(self) -> Logits:
        """The logits (B×T×V), or the hidden states and head that give them (:class:`HiddenRows`), for the chunked
        engine."""
        if self.logits is not None:
            return self.logits
        if self.hidden is None or self.head is None:
            raise ValueError("ModelOutputs has no logits and no hidden states with an output head")
        return HiddenRows(self.hidden, self.head)

    def rows(self, index: slice | torch.Tensor) -> ModelOutputs:
        """The same outputs for the batch rows ``index`` (a slice or an index over B, e.g. ``slice(None, b)``): the
        logits and the hidden states it has, sliced; the model and the head as they are."""
        return ModelOutputs(None if self.logits is None else self.logits[index],
                            None if self.hidden is None else self.hidden[index], self.model, self.head)


@dataclass
class LossInputs:
    """Everything a loss may read. ``batch`` is the collated dict of the data pipeline:

    input_ids, attention_mask, labels: B×n student tensors; labels are already shifted
    (``labels[:, i]`` is the target of ``logits[:, i]``) and -100 where no loss is taken.
    teacher_input_ids, teacher_attention_mask, teacher_labels: B×m, the same for the teacher.
    Any field a precompute hook added (alignments) is there too, padded.
    """

    batch: dict[str, torch.Tensor]
    student: ModelOutputs
    teacher: ModelOutputs | None = None
    reference: ModelOutputs | None = None
    step: int = 0  # optimizer step, for schedules inside a loss
    total_steps: int | None = None  # optimizer steps of the whole run (None outside training)


@dataclass
class LossOutput:
    """loss: scalar, the micro-batch **sum** (see module docstring). metrics: scalars to log, each also a
    micro-batch sum over the same unit, so the trainer can normalise them like the loss. means: scalars to log that
    are already per-micro-batch values, not sums (term weights, solver iterations, a schedule's position): the trainer
    logs their mean over micro-batches weighted by each one's units (tokens or sequences), like the loss."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    means: dict[str, torch.Tensor] = field(default_factory=dict)


PrecomputeHook = Callable[..., dict[str, Any]]


class DistillationLoss(nn.Module):
    """Base class. Subclasses set ``needs`` and implement ``forward``.

    ``precompute`` (optional) is the per-example hook of the data pipeline: it gets the example's
    strings and both sides' token ids and returns extra fields (lists or tensors, padded by the collator)
    which arrive in ``LossInputs.batch``. Its result is cached on disk, keyed by the data, the
    tokenizers and ``precompute_version``.
    """

    needs: Needs = Needs()
    fused_head: bool = False  # True: forward reads logits only through ModelOutputs.logit_source (may be HiddenRows)
    precompute: PrecomputeHook | None = None
    precompute_version: str = "1"

    def setup(self, student_tokenizer, teacher_tokenizer) -> None:
        """Called once with both tokenizers (teacher None without a teacher) before the data is built:
        the place to build vocabulary maps or pick a precompute hook. Default: nothing."""

    def build(self, student_model: nn.Module, teacher_model: nn.Module | None) -> None:
        """Called once with both models before the optimizer exists: the place to create projectors whose
        sizes depend on the models (hidden sizes, vocabularies). Default: nothing."""

    def forward(self, inputs: LossInputs) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_modules(self) -> list[nn.Module]:
        """The loss's own trainable modules (projectors). Default: every child module with parameters."""
        return [m for m in self.children() if any(p.requires_grad for p in m.parameters())]

    def on_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step (adaptive weights update here)."""


def require_teacher(inputs: LossInputs, loss_name: str, *, check_labels: bool = False) -> ModelOutputs:
    """The teacher's outputs, or a clear error when the trainer did not provide them. ``check_labels``:
    the teacher logits must cover the B×m positions of ``batch["teacher_labels"]``."""
    teacher = inputs.teacher
    if teacher is None:
        raise ValueError(f"loss={loss_name} needs the teacher's forward pass (Needs.teacher)")
    if check_labels:
        t_labels = inputs.batch["teacher_labels"]
        if teacher.logit_source.shape[:2] != t_labels.shape:
            raise ValueError(f"loss={loss_name}: teacher logits {tuple(teacher.logit_source.shape)} do not match "
                             f"teacher_labels {tuple(t_labels.shape)}")
    return teacher


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """B×T bool: positions that carry a target."""
    return labels.ne(IGNORE_INDEX)
