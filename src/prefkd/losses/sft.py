"""SFT: cross-entropy on the response tokens, no teacher."""

from __future__ import annotations

from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, Needs
from prefkd.losses.divergences import cross_entropy_sum


class SFTLoss(DistillationLoss):
    """loss = Σ_{labels ≠ −100} −log p_S(y_t) (a micro-batch sum; the trainer normalises per token)."""

    needs = Needs()
    fused_head = True  # reads the student's logits through logit_source: hidden states and head, projected per chunk

    def __init__(self, chunk_size: int = 1024):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, inputs: LossInputs) -> LossOutput:
        ce = cross_entropy_sum(inputs.student.logit_source, inputs.batch["labels"], chunk_size=self.chunk_size)
        return LossOutput(loss=ce, metrics={"ce": ce.detach()})
