"""The one module Accelerate prepares: the student and the loss's own modules (projectors, cost weights) together.

Because both live inside the prepared module, DDP (and FSDP) synchronise the loss's gradients with the student's in
the same backward pass; nothing is all-reduced by hand. The teacher and the reference model stay outside: they are
frozen, run under ``no_grad`` and are handed in with their outputs.

The forward is the student's forward pass followed by the loss:

    (batch, teacher outputs, reference outputs) -> student(input_ids) -> loss(LossInputs) -> (loss, metrics, means)

With ``fused_head`` the student builds no logits: the loss gets its last hidden state and output head
(:func:`prefkd.training.fused_head.model_outputs`).

It returns a plain tuple, not a :class:`LossOutput`, so that DDP finds the loss tensor in its output (DDP walks
tuples and dicts, not dataclasses); :meth:`DistillModule.output` turns it back into a :class:`LossOutput`.

Checkpoints keep their layout (``model.safetensors`` for the student, ``projectors.safetensors`` for the loss): the
state dict of this module is split by :func:`part` into the student's and the loss's, with their own keys.
"""

from __future__ import annotations

import torch
from torch import nn

from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, ModelOutputs
from prefkd.training.fused_head import model_outputs


class DistillModule(nn.Module):
    """``student`` (a causal LM) and ``loss`` (a :class:`DistillationLoss`) as one ``nn.Module``.

    ``compile``: compile the student's forward in place (``nn.Module.compile``), which keeps its state-dict keys.
    ``fused_head``: hand the loss the student's hidden states and head, not its logits (the run's
    :class:`~prefkd.training.fused_head.FusedHeads`).
    Loss parameters that train by their own inner steps, not by the outer backward (those not among
    ``loss.trainable_modules()``, e.g. the semi-dual's potentials), are hidden from DDP: it must not hook them.
    """

    def __init__(self, student: nn.Module, loss: DistillationLoss, *, compile: bool = False, fused_head: bool = False):
        super().__init__()
        self.student, self.loss, self.fused_head = student, loss, fused_head
        # the student's repeated blocks (LlamaDecoderLayer, ...): Accelerate's FSDP wraps each as its own unit only
        # when the prepared module names them (else the whole student is one unit, gathered whole in each forward)
        self._no_split_modules = getattr(student, "_no_split_modules", None)
        if compile:
            self.student.compile()
        outer = {id(p) for m in loss.trainable_modules() for p in m.parameters()}
        ignored = [f"loss.{name}" for name, p in loss.named_parameters() if p.requires_grad and id(p) not in outer]
        if ignored:
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)

    def forward(self, batch: dict, teacher: ModelOutputs | None = None, reference: ModelOutputs | None = None,
                step: int = 0, total_steps: int | None = None) -> tuple[torch.Tensor, dict, dict]:
        """(loss, metrics, means) of :class:`LossOutput` for one micro-batch (the student runs here, with grad)."""
        student = model_outputs(self.student, batch["input_ids"], batch["attention_mask"],
                                hidden=self.loss.needs.hidden_states, fused=self.fused_head)
        result = self.loss(LossInputs(batch=batch, student=student, teacher=teacher, reference=reference, step=step,
                                      total_steps=total_steps))
        return result.loss, result.metrics, result.means

    @staticmethod
    def output(values: tuple[torch.Tensor, dict, dict]) -> LossOutput:
        """The :class:`LossOutput` of :meth:`forward`'s tuple."""
        loss, metrics, means = values
        return LossOutput(loss=loss, metrics=metrics, means=means)


def part(state: dict, name: str) -> dict:
    """The entries of a :class:`DistillModule` state dict under ``name`` (``student`` or ``loss``), with their own
    keys (the prefix ``name.`` removed)."""
    prefix = f"{name}."
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
