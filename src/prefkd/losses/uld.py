"""ULD: universal logit distillation across vocabularies (docs/methods.md §5).

Positions. With M_s, M_t the response masks (``labels ≠ −100``; labels are pre-shifted, so ``labels[:, j]`` is
the target of ``logits[:, j]``), the k-th response position of each side is where the cumulative count of the
mask reaches k + 1 (k = 0, 1, ...). Student response position k is paired with teacher response position k for
k < min(n_resp_s, n_resp_t); later student response positions get CE only. :func:`response_alignment` builds the
pairing as an index (no copy of the teacher logits); the loss gathers the teacher rows per chunk. Fused output heads
(issue 17): either side may come as hidden states and head (``logit_source``); the teacher's hidden states are then
gathered at the paired positions (B×n×H_t) and projected per chunk (:class:`~prefkd.losses.chunked.PartnerRows`).

Per aligned pair, p = softmax(z/τ) on each side (fp32 at least), sorted descending over the whole vocabulary of
each model, the shorter one zero-padded:

    ULD_k = Σ_r |p_S^(r) − p_T^(r)|.

``top_k = K`` sorts only the K largest of each side (``torch.topk``) and adds the remaining masses as one bucket:
ULD_k^K = Σ_{r<K} |p_S^(r) − p_T^(r)| + |(1 − Σ_{r<K} p_S^(r)) − (1 − Σ_{r<K} p_T^(r))|, which equals the full sort
for K ≥ max(V_s, V_t) (the buckets are empty) and is a lower bound otherwise.

Mixing (``mix``), as sums that the trainer divides by the student response tokens of the global batch:

- ``dskd`` (DSKD's framework): (1 − kd_rate)·Σ_{M_s} CE + kd_rate·Σ_{aligned} ULD_k.
- ``paper`` (Boizard et al.): Σ_{M_s} CE + λ·Σ_b n_b·mean_{k aligned in b} ULD_k, n_b = student response tokens
  of sequence b. Multiplying each sequence's mean by n_b makes the trainer's division by Σ_b n_b give the
  token-weighted mean of the per-sequence means (the paper's batch mean of per-sequence means when every
  sequence has the same length). Implemented as the per-token weight n_b / a_b (a_b = aligned pairs of b).

Cost. The full sort dominates. Each side sorts its logits and takes exp(sorted − logsumexp) (the same values as
sorting the probabilities), the teacher's without a gradient a few rows at a time and in place, and the shorter side's
zero padding is never built; per chunk of n aligned tokens about four n×V_t fp32-sized tensors are alive (the
teacher's rows and sorted values, the student's sorted values and int64 sort indices, kept for backward).
``top_k`` sorts K columns instead of V.

Metrics (sums, normalised like the loss by the trainer): ``ce`` (Σ_{M_s} CE), ``uld`` (Σ_{aligned} ULD_k,
unweighted), ``aligned`` (number of aligned pairs; after the trainer's division, the aligned fraction).
"""

from __future__ import annotations

from typing import Literal

import torch

from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, Needs, require_teacher, response_mask
from prefkd.losses.chunked import PartnerRows, chunked_token_loss
from prefkd.losses.divergences import cross_entropy

MIXES = ("dskd", "paper")


def response_alignment(labels: torch.Tensor, teacher_labels: torch.Tensor) -> torch.Tensor:
    """B×n long: for each student position, the flat teacher row ``b·m + i`` (i = the teacher's sequence position
    of the same response rank), or −1 where the position is not a response position or has no partner.

    labels B×n, teacher_labels B×m (−100 = no target). Vectorised: ranks are ``cumsum(mask) − 1``.
    """
    mask_s, mask_t = response_mask(labels), response_mask(teacher_labels)
    b, m = teacher_labels.shape
    rank_s, rank_t = mask_s.long().cumsum(1) - 1, mask_t.long().cumsum(1) - 1
    n_t = mask_t.sum(1, keepdim=True)
    pos_t = torch.full((b, max(m, 1)), -1, dtype=torch.long, device=labels.device)  # rank k → teacher position
    rows, cols = mask_t.nonzero(as_tuple=True)
    pos_t[rows, rank_t[rows, cols]] = cols
    aligned = mask_s & (rank_s < n_t)
    partner = pos_t.gather(1, rank_s.clamp(0, max(m - 1, 0)))
    offset = torch.arange(b, device=labels.device).unsqueeze(1) * m
    return torch.where(aligned, partner + offset, torch.full_like(partner, -1))


SORT_ROWS = 4  # rows per sort call without a gradient: its int64 indices stay 4×V


def sorted_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """softmax(z/τ) per row sorted descending (N×V), or its ``top_k`` largest (N×K): exp(sort(z/τ) − logsumexp(z/τ)).
    The softmax keeps the order, so sorting the logits first gives the same values with one V-wide tensor fewer.
    Without a gradient (the teacher) the full sort runs :data:`SORT_ROWS` rows at a time, so its int64 indices (twice
    the size of the values) never exist for all N rows, and the exp runs in place."""
    z = logits if temperature == 1 else logits / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    grad = z.requires_grad and torch.is_grad_enabled()
    if top_k is not None:
        top = z.topk(min(top_k, z.shape[-1]), dim=-1).values
    elif grad:
        top = z.sort(-1, descending=True).values
    else:
        top = torch.empty_like(z)
        order = torch.empty(min(SORT_ROWS, z.shape[0]), z.shape[-1], dtype=torch.long, device=z.device)
        for start in range(0, z.shape[0], SORT_ROWS):
            rows = slice(start, start + SORT_ROWS)
            torch.sort(z[rows], dim=-1, descending=True, out=(top[rows], order[:top[rows].shape[0]]))
    return (top - lse).exp() if grad else top.sub_(lse).exp_()


def uld_distance(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
    """ULD per row: N×V_s, N×V_t → N (fp32 at least). Full sort (``top_k`` None) or the top-k variant with the
    remaining-mass bucket (see the module docstring). The teacher side is detached. The shorter sorted vector's
    zero padding is not built: past the common width w, Σ_r |p^(r) − 0| is the longer side's tail sum."""
    dtype = torch.promote_types(torch.promote_types(s_logits.dtype, torch.float32), t_logits.dtype)
    sorted_s = sorted_probs(s_logits.to(dtype), temperature, top_k)
    with torch.no_grad():
        sorted_t = sorted_probs(t_logits.detach().to(dtype), temperature, top_k)
    w = min(sorted_s.shape[-1], sorted_t.shape[-1])
    value = (sorted_s[:, :w] - sorted_t[:, :w]).abs().sum(-1) + sorted_s[:, w:].abs().sum(-1) + \
        sorted_t[:, w:].sum(-1)
    if top_k is None:
        return value
    rest = ((1 - sorted_s.sum(-1)).clamp_min(0) - (1 - sorted_t.sum(-1)).clamp_min(0)).abs()
    return value + rest


class ULDLoss(DistillationLoss):
    """ULD (docs/methods.md §5) for any two vocabularies; sums over the student's response tokens (see the module
    docstring).

    kd_rate: weight of ULD in ``mix: dskd`` (CE gets 1 − kd_rate). uld_weight: λ of ``mix: paper`` (CE weight 1).
    temperature: τ on both sides. top_k: None = full sort, else the top-k variant. chunk_size: response tokens per
    chunk of fp32 work.
    """

    needs = Needs(teacher=True)
    fused_head = True  # both sides through logit_source; the paired teacher rows are projected per chunk

    def __init__(self, mix: Literal["dskd", "paper"] = "dskd", kd_rate: float = 0.5, uld_weight: float = 1.5,
                 temperature: float = 1.0, top_k: int | None = None, chunk_size: int = 256):
        super().__init__()
        if mix not in MIXES:
            raise ValueError(f"mix={mix!r}: valid values are {', '.join(MIXES)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive number of sorted probabilities or None, got {top_k}")
        self.mix, self.kd_rate, self.uld_weight = mix, kd_rate, uld_weight
        self.temperature, self.top_k, self.chunk_size = temperature, top_k, chunk_size

    def forward(self, inputs: LossInputs) -> LossOutput:
        batch, student = inputs.batch, inputs.student
        teacher = require_teacher(inputs, "uld", check_labels=True)
        labels, t_labels = batch["labels"], batch["teacher_labels"]
        mask = response_mask(labels)
        partner = response_alignment(labels, t_labels.to(labels.device))
        aligned = partner.ge(0)
        if self.mix == "dskd":
            ce_coef, kd_coef = 1.0 - self.kd_rate, self.kd_rate
            weight = aligned.to(torch.float32)
        else:  # paper: per-sequence mean × n_b, i.e. weight n_b / a_b on each aligned pair
            ce_coef, kd_coef = 1.0, self.uld_weight
            ratio = mask.sum(1, keepdim=True) / aligned.sum(1, keepdim=True).clamp_min(1)
            weight = aligned * ratio.to(torch.float32)
        partners = PartnerRows(teacher.logit_source, partner)  # teacher rows, gathered (or projected) per chunk
        tau, top_k = self.temperature, self.top_k

        def per_token(s: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, *projected: torch.Tensor):
            ce = cross_entropy(s, y)
            sel = idx.ge(0)
            if bool(sel.all()):  # every row has a partner (the usual case): no copies of the rows
                uld = uld_distance(s, partners.rows(idx, sel, projected), tau, top_k)
            else:
                uld = torch.zeros_like(ce)
                if sel.any():
                    uld = uld.masked_scatter(sel, uld_distance(s[sel], partners.rows(idx, sel, projected), tau,
                                                               top_k))
            return ce_coef * ce + kd_coef * w.to(ce.dtype) * uld, {"ce": ce, "uld": uld}

        loss, metrics = chunked_token_loss(per_token, student.logit_source, mask, labels, partner, weight,
                                           *partners.others(), chunk_size=self.chunk_size, terms=("ce", "uld"))
        metrics["aligned"] = aligned.sum().to(loss.dtype)
        return LossOutput(loss=loss, metrics=metrics)
