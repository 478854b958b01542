"""Fused output heads in training (issue 17): which models run without building their logits, and their forward.

A loss that declares ``fused_head`` (:class:`prefkd.losses.base.DistillationLoss`) can take a model's last hidden
state and output head instead of its B×T×V logits; the chunked engine then projects the logits chunk by chunk.
:func:`plan_fused_heads` decides once per run, from ``trainer.fused_head``, the loss's declaration and each model's
head (:func:`prefkd.models.heads.output_head`, checked on a probe input by
:func:`~prefkd.models.heads.check_output_head`), and says in one log line what it chose and why.
:func:`model_outputs` is the forward pass both sides of the loss use, fused or not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from prefkd.losses.base import DistillationLoss, ModelOutputs
from prefkd.models.heads import forward_hidden, head_problem, output_head

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedHeads:
    """Which models hand the loss their hidden states and head instead of logits."""

    student: bool = False
    teacher: bool = False
    reference: bool = False  # the preference losses' reference model (Needs.reference)


def plan_fused_heads(enabled: bool, loss: DistillationLoss, student: nn.Module, teacher: nn.Module | None = None,
                     *, reference: nn.Module | None = None, sharded: bool = False) -> FusedHeads:
    """The fused heads of a run, logged in one line. ``enabled``: ``trainer.fused_head``. ``teacher``: the live
    teacher model when the loss needs one (None otherwise, and with a teacher cache, which hands its own outputs).
    ``reference``: the model whose head the reference forward uses when the loss needs one (``Needs.reference``):
    the teacher, or the student itself for the initial policy (a frozen copy of it, or its base with the LoRA
    adapter disabled: the same head; it then shares the student's verdict, sharding included).
    ``sharded``: the student's parameters are partitioned by DeepSpeed ZeRO-3, where fused heads are not verified yet
    (under FSDP2 they are verified, with 2 processes on CPU: tests/test_sharded_checkpoint.py).
    Each model's head is probed once, however many roles it plays."""
    if not enabled:
        log.info("trainer.fused_head=false: the models' logits are built and handed to the loss")
        return FusedHeads()
    if not loss.fused_head:
        log.info("trainer.fused_head: the loss %s reads full logits (no fused head yet): the models' logits are "
                 "built", type(loss).__name__)
        return FusedHeads()
    problems = {"student": "its parameters are sharded by DeepSpeed ZeRO-3 (fused heads not verified there yet)"
                if sharded else head_problem(student)}
    if teacher is not None and loss.needs.teacher:
        problems["teacher"] = head_problem(teacher)
    if reference is not None and loss.needs.reference:
        roles = {"student": student, "teacher": teacher}
        probed = [role for role in problems if roles[role] is reference]  # the student's verdict: sharding too
        problems["reference"] = problems[probed[0]] if probed else head_problem(reference)
    fused = {role: problem is None for role, problem in problems.items()}
    said = "; ".join(f"{role}: " + ("projected per chunk inside the loss" if problem is None else
                                    f"logits built, because {problem}") for role, problem in problems.items())
    (log.info if all(fused.values()) else log.warning)("trainer.fused_head: %s", said)
    return FusedHeads(student=fused["student"], teacher=fused.get("teacher", False),
                      reference=fused.get("reference", False))


def model_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, hidden: bool,
                  fused: bool) -> ModelOutputs:
    """One model's forward pass as a loss reads it. ``fused``: the last hidden state (B×T×H) and the output head,
    read now (a sharding wrapper may swap the parameters between forwards), no logits built; otherwise the logits
    (B×T×V) and, with ``hidden``, the last hidden state."""
    if fused:
        head = output_head(model)
        if head is None:
            raise RuntimeError("fused output head: the model's head is no longer recognised; set "
                               "trainer.fused_head=false")
        return ModelOutputs(None, forward_hidden(model, input_ids, attention_mask), model, head)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden, use_cache=False)
    return ModelOutputs(out.logits, out.hidden_states[-1] if hidden else None, model)


def outputs_from_hidden(model: nn.Module, hidden: torch.Tensor, *, fused: bool) -> ModelOutputs:
    """A model's outputs rebuilt from its last hidden state (B×T×H), for measurements that start there: ``fused``,
    the hidden state and the head; otherwise the logits head(h) (B×T×V, with a graph when ``hidden`` or the head
    needs a gradient) beside the hidden state."""
    head = output_head(model)
    return ModelOutputs(None, hidden, model, head) if fused else ModelOutputs(head.project(hidden), hidden, model)
