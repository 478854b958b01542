"""Vanilla KD (docs/methods.md §2–3): total = (1 − kd_rate)·CE + kd_rate·KD.

KD = Σ_{labels ≠ −100} D(p_T ‖ p_S) with the teacher's logits at the same positions as the student's,
D one of :data:`prefkd.losses.divergences.DIVERGENCES`. CE and KD share one chunked pass over the
student logits (one gradient buffer, see :mod:`prefkd.losses.chunked`).

Different tokenizers, chosen by ``cross_tokenizer``: with ``"mined"`` (the default), when :meth:`KDLoss.setup` sees
two different vocabularies (``get_vocab()``) it logs one line and delegates to
:class:`prefkd.losses.mined.MinEDLoss` with KDLoss's own divergence, temperatures and kd_rate (MinED's DTW alignment
and vocabulary map, docs/methods.md §6; its precompute hook becomes KDLoss's); with ``"error"`` it refuses them.
Same vocabulary, or no setup: unchanged, and the teacher must have read the student's tokens.
"""

from __future__ import annotations

import logging

import torch

from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, Needs, require_teacher, response_mask
from prefkd.losses.chunked import Logits, chunked_token_loss
from prefkd.losses.divergences import cross_entropy, divergence_fn
from prefkd.losses.mined import MinEDLoss

log = logging.getLogger(__name__)
CROSS_TOKENIZER_NOTICE = ("teacher and student tokenizers differ: kd aligns them with MinED's DTW and vocabulary "
                          "map (docs/methods.md §6)")
CROSS_TOKENIZER_LOSSES = ("uld", "minedit", "dskd_cma", "mcw_kd")


class KDLoss(DistillationLoss):
    """KD. Sums over student response tokens; metrics "ce" and "kd" are sums too (plus "aligned" across
    tokenizers, see the module docstring)."""

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
        cross_tokenizer: str = "mined",
        beta: float = 0.5,
    ):
        super().__init__()
        if cross_tokenizer not in ("mined", "error"):
            raise ValueError(f"loss.cross_tokenizer={cross_tokenizer!r}: valid values are 'mined' (align the two "
                             f"tokenizers with MinED) and 'error' (refuse different tokenizers)")
        self.cross_tokenizer_mode = cross_tokenizer
        self.divergence = divergence
        self.kd_rate = kd_rate
        self.chunk_size = chunk_size
        self._options = dict(divergence=divergence, kd_rate=kd_rate, temperature=temperature,
                             teacher_temperature=teacher_temperature, skew_lambda=skew_lambda,
                             adaptive_alpha=adaptive_alpha, chunk_size=chunk_size, beta=beta)
        self.cross_tokenizer: MinEDLoss | None = None  # set by setup() for two different vocabularies
        # raises ValueError listing the valid names for an unknown divergence
        self._divergence = divergence_fn(divergence, temperature, teacher_temperature, skew_lambda,
                                         adaptive_alpha, beta)

    # both sides through logit_source (hidden states and head, projected per chunk), with the same vocabulary and
    # across tokenizers (MinED's, which projects the aligned teacher rows per chunk)
    fused_head = True

    def setup(self, student_tokenizer, teacher_tokenizer) -> None:
        """Different vocabularies: MinED alignment (one info line), or an error with ``cross_tokenizer="error"``;
        same vocabulary: nothing."""
        self.cross_tokenizer, self.precompute, self.precompute_version = None, None, type(self).precompute_version
        if teacher_tokenizer is None or student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab():
            return
        if self.cross_tokenizer_mode == "error":
            raise ValueError(f"loss=kd with loss.cross_tokenizer=error: the teacher's and the student's tokenizers "
                             f"differ; set loss.cross_tokenizer=mined (MinED alignment) or use a cross-tokenizer "
                             f"loss: {', '.join(CROSS_TOKENIZER_LOSSES)}")
        log.info(CROSS_TOKENIZER_NOTICE)
        self.cross_tokenizer = MinEDLoss(**self._options)
        self.cross_tokenizer.setup(student_tokenizer, teacher_tokenizer)
        self.precompute = self.cross_tokenizer.precompute
        self.precompute_version = self.cross_tokenizer.precompute_version

    def forward(self, inputs: LossInputs) -> LossOutput:
        batch, student = inputs.batch, inputs.student
        require_teacher(inputs, "kd")
        if self.cross_tokenizer is not None:
            return self.cross_tokenizer(inputs)
        student_logits, teacher_logits = student.logit_source, inputs.teacher.logit_source
        _check_same_tokens(batch, student_logits, teacher_logits)
        labels = batch["labels"]
        rate = self.kd_rate

        def per_token(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
            ce, kd = cross_entropy(s, y), self._divergence(s, t)
            return (1 - rate) * ce + rate * kd, {"ce": ce, "kd": kd}

        loss, metrics = chunked_token_loss(per_token, student_logits, response_mask(labels), teacher_logits, labels,
                                           chunk_size=self.chunk_size, terms=("ce", "kd"))
        return LossOutput(loss=loss, metrics=metrics)


def _check_same_tokens(batch: dict, student_logits: Logits, teacher_logits: Logits) -> None:
    """The teacher must have read exactly the student's tokens, so positions match one to one."""
    ids = batch["input_ids"]
    teacher_ids = batch.get("teacher_input_ids", ids)
    if teacher_ids.shape != ids.shape or not torch.equal(teacher_ids.to(ids.device), ids):
        raise ValueError(
            "loss=kd needs the same tokenizer for teacher and student: teacher_input_ids must equal "
            f"input_ids (shapes {tuple(teacher_ids.shape)} vs {tuple(ids.shape)}). For different "
            f"tokenizers call KDLoss.setup(student_tokenizer, teacher_tokenizer) first (kd then aligns them "
            f"with MinED) or use a cross-tokenizer loss: {', '.join(CROSS_TOKENIZER_LOSSES)}"
        )
    if teacher_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"loss=kd: teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} must cover the same B×T positions"
        )
