"""Preference losses as trainer modules (docs/methods.md §10): ``dpo`` (cDPO by label smoothing), ``ipo``, ``tisdpo``,
``kd_tisdpo`` and ``tisdpo_kdalign``. The maths is in :mod:`prefkd.losses.preference`.

Batches come from :func:`prefkd.data.preference_dataset.collate_pairs`: 2B rows, the B chosen responses first,
then the B rejected ones (one forward per model); ``parent_index`` / ``teacher_parent_index`` map label positions
to parents, ``parent_weight`` holds the per-parent weights (1 without a weight file), ``num_sequences`` = B.
Every loss returns the SUM over its B pairs and asks the trainer to divide by the number of pairs of the global
batch (``Needs.normalize_by="sequences"``); metrics are pair sums too (docs/methods.md §10's rewards/*, logps/*).

Reference (``reference``, a loss argument): ``initial`` (the policy at the start of training: the base model with
the LoRA adapter disabled, or a frozen copy for full fine-tuning), ``teacher`` (the teacher model, which must
share the student's tokenizer) or, for dpo/ipo, ``precomputed`` (the pairs' ``reference_*_logps`` fields, written by
``python -m prefkd.reference_logps``: no reference model in memory). The trainer runs it on the student's rows and hands
its logits in ``LossInputs.reference``. ``kd_tisdpo`` always uses the teacher (its own tokenizer, compared per parent).

Fused output heads (issue 17): dpo, ipo, tisdpo and kd_tisdpo read every model's logits through
:attr:`~prefkd.losses.base.ModelOutputs.logit_source` (``fused_head``): the policy's, the reference's and the
teacher's may each be hidden states and a head, projected per chunk by :mod:`prefkd.losses.logps`.
"""

from __future__ import annotations

import torch

from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, Needs, require_teacher, response_mask
from prefkd.losses.logps import (
    parent_mask,
    parent_sums,
    sequence_logps,
    token_logps,
    token_logps_and_kl,
    tokens_from_parents,
    weighted_sums,
)
from prefkd.losses.preference import dpo_loss, dpo_margin, ipo_loss, kd_tisdpo_loss, preference_metrics, tisdpo_loss

REFERENCES = ("initial", "teacher", "precomputed")


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rows, rejected rows) of a 2B-row tensor."""
    if x.shape[0] % 2:
        raise ValueError(f"a preference batch has 2B rows (chosen then rejected), got {x.shape[0]}: build it "
                         f"with prefkd.data.preference_dataset.collate_pairs (dataset=hh or a preference dataset)")
    b = x.shape[0] // 2
    return x[:b], x[b:]


def _reference(inputs: LossInputs, name: str):
    if inputs.reference is None:
        raise ValueError(f"loss={name} needs the reference model's forward pass (Needs.reference)")
    return inputs.reference


def _check_reference(reference: str) -> str:
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r}: valid values are {', '.join(REFERENCES)}")
    return reference


def _metrics(metrics: dict, loss: torch.Tensor) -> dict:
    return {k: v.detach().to(loss.dtype) for k, v in metrics.items()}


class DPOLoss(DistillationLoss):
    """DPO (``loss_type=dpo``; cDPO with ``label_smoothing`` ε > 0) or IPO (``loss_type=ipo``) per pair:
    −(1−ε)·log σ(βh) − ε·log σ(−βh), or (h − 1/(2β))², h the DPO margin of the sequence log-probs."""

    name = "dpo"
    fused_head = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "dpo",
                 reference: str = "initial", chunk_size: int = 1024):
        super().__init__()
        if loss_type not in ("dpo", "ipo"):
            raise ValueError(f"loss_type={loss_type!r}: valid values are dpo, ipo")
        self.beta, self.label_smoothing, self.loss_type, self.chunk_size = beta, label_smoothing, loss_type, chunk_size
        reference = _check_reference(reference)
        self.needs = Needs(reference=None if reference == "precomputed" else reference, normalize_by="sequences",
                           pairs=True)

    def forward(self, inputs: LossInputs) -> LossOutput:
        labels = inputs.batch["labels"]
        pi = sequence_logps(inputs.student.logit_source, labels, chunk_size=self.chunk_size)
        if self.needs.reference is None:  # reference=precomputed
            if "reference_logps" not in inputs.batch:
                raise ValueError(f"loss={self.name} reference=precomputed: the pairs carry no reference_chosen_logps/"
                                 f"reference_rejected_logps; compute them with `python -m prefkd.reference_logps`")
            ref_lp = inputs.batch["reference_logps"].to(pi.device, pi.dtype)
        else:
            with torch.no_grad():
                ref_lp = sequence_logps(_reference(inputs, self.name).logit_source.detach(), labels,
                                        chunk_size=self.chunk_size)
        (pi_w, pi_l), (ref_w, ref_l) = _halves(pi), _halves(ref_lp)
        h = dpo_margin(pi_w, pi_l, ref_w, ref_l)
        per_pair = dpo_loss(h, self.beta, self.label_smoothing) if self.loss_type == "dpo" else ipo_loss(h, self.beta)
        loss = per_pair.sum()
        return LossOutput(loss, _metrics(preference_metrics(pi_w, pi_l, ref_w, ref_l, self.beta), loss))


class TISDPOLoss(DistillationLoss):
    """TIS-DPO (one tokenizer): token-weighted DPO margin, weights = the pair's per-token ``parent_weight``
    (one parent per token with one tokenizer), optional token-level KL term α·(KL_w − KL_l) (``kl_alpha`` > 0)."""

    name = "tisdpo"
    fused_head = True

    def __init__(self, beta: float = 0.1, kl_alpha: float = 0.5, token_kl: bool = True,
                 reference: str = "initial", chunk_size: int = 1024):
        super().__init__()
        self.beta, self.kl_alpha, self.token_kl, self.chunk_size = beta, kl_alpha, bool(token_kl), chunk_size
        if _check_reference(reference) == "precomputed":
            raise ValueError("loss=tisdpo weighs per-token log-ratios: it needs the reference model (reference="
                             "initial or teacher), not precomputed sequence log-probs")
        self.needs = Needs(reference=reference, normalize_by="sequences", pairs=True)

    def forward(self, inputs: LossInputs) -> LossOutput:
        batch = inputs.batch
        labels, mask = batch["labels"], response_mask(batch["labels"])
        policy, ref = inputs.student.logit_source, _reference(inputs, self.name).logit_source.detach()
        weights = tokens_from_parents(batch["parent_weight"], batch["parent_index"])
        if self.token_kl:
            pi, ref_lp, kl = token_logps_and_kl(policy, ref, labels, self.chunk_size)
        else:
            pi, kl = token_logps(policy, labels, self.chunk_size), None
            with torch.no_grad():
                ref_lp = token_logps(ref, labels, self.chunk_size)
        (pi_w, pi_l), (ref_w, ref_l), (w_w, w_l), (m_w, m_l) = (_halves(pi), _halves(ref_lp), _halves(weights),
                                                                _halves(mask))
        kl_w, kl_l = _halves(kl) if kl is not None else (None, None)
        per_pair = tisdpo_loss(pi_w, ref_w, w_w, pi_l, ref_l, w_l, mask_chosen=m_w, mask_rejected=m_l,
                               kl_chosen=kl_w, kl_rejected=kl_l, beta=self.beta, alpha=self.kl_alpha)
        loss = per_pair.sum()
        sums = [weighted_sums(v, w, m).detach() for v, w, m in ((pi_w, w_w, m_w), (pi_l, w_l, m_l),
                                                                (ref_w, w_w, m_w), (ref_l, w_l, m_l))]
        return LossOutput(loss, _metrics(preference_metrics(*sums, self.beta), loss))


class KDTISDPOLoss(DistillationLoss):
    """KD_tisdpo (PrefKD): DPO at parent level with the teacher as reference, any two tokenizers:
    L = −log σ(β(M_w − M_l)), M = Σ_p w_p (ℓ^S_p − ℓ^T_p) (docs/methods.md §10)."""

    name = "kd_tisdpo"
    needs = Needs(teacher=True, normalize_by="sequences", pairs=True)
    fused_head = True

    def __init__(self, beta: float = 0.5, chunk_size: int = 1024):
        super().__init__()
        self.beta, self.chunk_size = beta, chunk_size

    def parent_terms(self, inputs: LossInputs):
        """(student B2×P, teacher B2×P parent log-probs, weights B2×P, mask B2×P) for the 2B rows."""
        batch = inputs.batch
        teacher = require_teacher(inputs, self.name)
        if "teacher_parent_index" not in batch:
            raise ValueError(f"loss={self.name} needs parents of both tokenizers: build the data with a teacher "
                             f"tokenizer (dataset=hh with a teacher in the config)")
        weights = batch["parent_weight"]
        n_par = weights.shape[1]
        s_tok = token_logps(inputs.student.logit_source, batch["labels"], self.chunk_size)
        with torch.no_grad():
            t_tok = token_logps(teacher.logit_source.detach(), batch["teacher_labels"], self.chunk_size)
        s_par = parent_sums(s_tok, batch["parent_index"], n_par)
        t_par = parent_sums(t_tok.to(s_par.dtype), batch["teacher_parent_index"], n_par)
        return s_par, t_par, weights, parent_mask(batch["parent_index"], n_par)

    def pair_loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        s_par, t_par, weights, mask = self.parent_terms(inputs)
        (s_w, s_l), (t_w, t_l), (w_w, w_l), (m_w, m_l) = (_halves(s_par), _halves(t_par), _halves(weights),
                                                          _halves(mask))
        loss = kd_tisdpo_loss(s_w, t_w, w_w, s_l, t_l, w_l, beta=self.beta, mask_chosen=m_w, mask_rejected=m_l).sum()
        sums = [weighted_sums(v, w, m).detach() for v, w, m in ((s_w, w_w, m_w), (s_l, w_l, m_l), (t_w, w_w, m_w),
                                                                (t_l, w_l, m_l))]
        return loss, _metrics(preference_metrics(*sums, self.beta), loss)

    def forward(self, inputs: LossInputs) -> LossOutput:
        loss, metrics = self.pair_loss(inputs)
        return LossOutput(loss, metrics)


class TISDPOKDAlignLoss(KDTISDPOLoss):
    """KD_tisdpo + α·DSKD-CMA on the chosen sequences (docs/methods.md §10, ``tisdpo_kdalign``).

    The DSKD-CMA term (docs/methods.md §4: (1 − kd_rate)·CE + kd_rate·KD, labels pre-shifted as everywhere) is a sum
    over the chosen responses' tokens; it is put on a per-token scale per micro-batch and counted once per pair:
    α · B · L_CMA / N_w (N_w = chosen response tokens of the micro-batch), so after the trainer's division by the
    pairs it is α × the per-token DSKD-CMA loss (exactly, when micro-batches have equal token counts).
    """

    name = "tisdpo_kdalign"
    needs = Needs(teacher=True, hidden_states=True, normalize_by="sequences", pairs=True)
    fused_head = True  # its DPO part (logps) and its DSKD-CMA part both read logit_source

    def __init__(self, beta: float = 0.5, alpha: float = 0.5, kd_rate: float = 0.5, divergence: str = "forward_kl",
                 temperature: float = 1.0, chunk_size: int = 1024):
        super().__init__(beta, chunk_size)
        from prefkd.losses.dskd import DSKDCMALoss

        self.alpha = alpha
        self.cma = DSKDCMALoss(divergence=divergence, kd_rate=kd_rate, temperature=temperature, chunk_size=chunk_size)

    def build(self, student_model, teacher_model) -> None:
        self.cma.build(student_model, teacher_model)

    def forward(self, inputs: LossInputs) -> LossOutput:
        loss, metrics = self.pair_loss(inputs)
        b = inputs.batch["labels"].shape[0] // 2
        keys = ("input_ids", "attention_mask", "labels", "teacher_input_ids", "teacher_attention_mask",
                "teacher_labels")
        chosen = LossInputs(
            batch={k: inputs.batch[k][:b] for k in keys},
            student=inputs.student.rows(slice(None, b)), teacher=inputs.teacher.rows(slice(None, b)))
        out = self.cma(chosen)
        scale = b / response_mask(chosen.batch["labels"]).sum().clamp_min(1)
        loss = loss + self.alpha * scale * out.loss
        metrics.update({f"cma/{k}": (v * scale).to(loss.dtype) for k, v in out.metrics.items()})
        return LossOutput(loss, metrics)
