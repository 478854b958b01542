"""Vanilla KD with one tokenizer (SPEC §2–3): total = (1 − kd_rate)·CE + kd_rate·KD.

KD = Σ_{labels ≠ −100} D(p_T ‖ p_S) with the teacher's logits at the same positions as the student's,
D one of :data:`prefkd.losses.divergences.DIVERGENCES`. CE and KD share one chunked pass over the
student logits (one gradient buffer, see :mod:`prefkd.losses.chunked`).
"""

from __future__ import annotations

import torch

from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, Needs, response_mask
from prefkd.losses.chunked import chunked_token_loss
from prefkd.losses.divergences import cross_entropy, divergence_fn

CROSS_TOKENIZER_LOSSES = ("uld", "minedit", "dskd_cma", "mcw_kd")


class KDLoss(DistillationLoss):
    """Same-vocabulary KD. Sums over student response tokens; metrics "ce" and "kd" are sums too."""

    needs = Needs(teacher=True)

    def __init__(
        self,
        divergence: str = "forward_kl",
        kd_rate: float = 0.5,
        temperature: float = 1.0,
        teacher_temperature: float = 1.0,
        skew_lambda: float = 0.1,
        adaptive_alpha: float = 0.5,
        chunk_size: int = 1024,
    ):
        super().__init__()
        self.divergence = divergence
        self.kd_rate = kd_rate
        self.chunk_size = chunk_size
        # raises ValueError listing the valid names for an unknown divergence
        self._divergence = divergence_fn(divergence, temperature, teacher_temperature, skew_lambda, adaptive_alpha)

    def forward(self, inputs: LossInputs) -> LossOutput:
        batch, student = inputs.batch, inputs.student
        if inputs.teacher is None:
            raise ValueError("loss=kd needs the teacher's forward pass (Needs.teacher)")
        _check_same_tokens(batch, student.logits, inputs.teacher.logits)
        labels = batch["labels"]
        sums = {"ce": 0.0, "kd": 0.0}
        rate = self.kd_rate

        def per_token(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            ce, kd = cross_entropy(s, y), self._divergence(s, t)
            sums["ce"] = sums["ce"] + ce.detach().sum()
            sums["kd"] = sums["kd"] + kd.detach().sum()
            return (1 - rate) * ce + rate * kd

        loss = chunked_token_loss(
            per_token, student.logits, response_mask(labels), inputs.teacher.logits, labels,
            chunk_size=self.chunk_size,
        )
        metrics = {k: torch.as_tensor(v, dtype=loss.dtype, device=loss.device) for k, v in sums.items()}
        return LossOutput(loss=loss, metrics=metrics)


def _check_same_tokens(batch: dict, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """The teacher must have read exactly the student's tokens, so positions match one to one."""
    ids = batch["input_ids"]
    teacher_ids = batch.get("teacher_input_ids", ids)
    if teacher_ids.shape != ids.shape or not torch.equal(teacher_ids.to(ids.device), ids):
        raise ValueError(
            "loss=kd needs the same tokenizer for teacher and student: teacher_input_ids must equal "
            f"input_ids (shapes {tuple(teacher_ids.shape)} vs {tuple(ids.shape)}). For different "
            f"tokenizers use a cross-tokenizer loss: {', '.join(CROSS_TOKENIZER_LOSSES)}"
        )
    if teacher_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"loss=kd: teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} must cover the same B×T positions"
        )
