"""Multi-Level OT (Cui et al., AAAI 2025; docs/methods.md §7): token- and sequence-level OT on sorted top-k
probabilities.

Positions. As in ULD (:func:`prefkd.losses.uld.response_alignment`): student response position k is paired with
teacher response position k for k < min(n_resp_s, n_resp_t); later student response positions get CE only.

Per aligned pair i of example b, on each side: z = logits / std(logits) (per token, over the vocabulary, torch's
default unbiased std, clamped at 1e-6), p = softmax(z / T), sorted descending, the top ``top_k`` (K = 50) kept;
when a vocabulary has fewer than K entries, the shorter vector is zero-padded to the longer width. Then

    HAD_i = Σ_k |p_S,k − p_T,k|                                             (token level)
    SL_i  = −Σ_k softmax(p_T)_k · log softmax(p_S)_k                        (token level, on the K-vectors)
    SD_b  = ⟨P*, C⟩,  C_ij = Σ_k |x_S,i,k − x_T,j,k|,  x = softmax(p / sd_temperature)   (sequence level)

with P* the entropic OT plan (ε = ``eps``) between the a_b student and a_b teacher points of example b under
uniform marginals 1/a_b (a_b = aligned pairs of b). All examples are solved in one batched, masked
:func:`prefkd.ot.sinkhorn` call: points are packed B×A×K (A = max a_b) and the padded slots are masked out, so
they get zero mass and no gradient. Gradient: the envelope one (``grad="envelope"``): P* is held fixed and only
C carries a gradient.

Normalisation (docs/methods.md §2 and §7). The method's loss is per example, CE + λ·(mean_i HAD + sl_weight·mean_i SL +
sd_weight·SD_b). The trainer divides the returned sum by the student response tokens of the global batch, so, as
ULD's ``mix: paper``, each sequence's value is multiplied by its student response-token count n_b:

    loss = Σ_{M_s} CE + λ·Σ_b n_b·(mean_{i∈b} HAD_i + sl_weight·mean_{i∈b} SL_i + sd_weight·SD_b),

i.e. HAD and SL carry the per-token weight n_b / a_b and SD_b the weight n_b. After the trainer's division this is
the token-weighted mean of the per-sequence losses (the plain batch mean when all sequences have equal length).

Memory. Only the K largest probabilities per position are needed. CE and the student's top-K probabilities come
from one :func:`prefkd.losses.chunked.chunked_rows_loss` call with :class:`~prefkd.losses.chunked.RowFeatures`: it
walks the positions in chunks of ``chunk_size``, writes CE's gradient into one buffer shaped like the student logits
(the only B×T×V tensor the loss allocates) and keeps the N×K top-K values and indices; backward recomputes each
chunk's p with autograd (the same indices, so ties resolve the same way) and adds its gradient into that buffer. The
teacher's top-K is taken per chunk of the aligned rows (:func:`~prefkd.losses.chunked.map_rows`, no copy of the
teacher logits). Alive after forward: the buffer, the N×K values of both sides, the N×K int64 indices, and the small
HAD/SL/Sinkhorn graph (B×A×A). Fused output heads (issue 17): both sides are read through ``logit_source``; with
hidden states and heads, the student's rows are projected per chunk, CE and the top-K in one pass (forward without a
graph, then backward recomputes each chunk once for both gradients), the buffer is B×T×H plus the head's V×H, and the
teacher's aligned rows are projected per chunk (their top-K taken in place): no B×T×V tensor.

Metrics (sums on the scale of the loss, normalised by the trainer like it): ``ce`` (Σ_{M_s} CE), ``had``
(Σ_b n_b·mean_b HAD), ``sl`` (Σ_b n_b·mean_b SL), ``sd`` (Σ_b n_b·SD_b), so loss = ce + λ·(had + sl_weight·sl +
sd_weight·sd); ``aligned`` (number of aligned pairs).
"""

from __future__ import annotations

import torch

from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, Needs, require_teacher, response_mask
from prefkd.losses.chunked import Logits, RowFeatures, chunked_rows_loss, map_rows
from prefkd.losses.divergences import cross_entropy
from prefkd.losses.uld import response_alignment
from prefkd.ot import sinkhorn

STD_FLOOR = 1e-6  # per-token std clamp (a constant row would divide by zero)


def row_std(z: torch.Tensor) -> torch.Tensor:
    """N×1 unbiased standard deviation of each row of z (N×V): sqrt(Σ_v (z_v − mean z)² / (V − 1)). Written out
    because ``torch.std`` over the last dimension runs about 14 times slower on a CPU (one thread, 32×50,257)."""
    centered = z - z.mean(-1, keepdim=True)
    return torch.linalg.vector_norm(centered, dim=-1, keepdim=True) / max(z.shape[-1] - 1, 1) ** 0.5


def std_normalized_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax((z / std(z)) / T) per row; z N×V in the compute dtype (std over the vocabulary, unbiased). Without a
    gradient (the teacher) the scaling runs in place on one copy."""
    z = logits / row_std(logits).clamp_min(STD_FLOOR)
    z = z / temperature if z.requires_grad and torch.is_grad_enabled() else z.div_(temperature)
    return torch.softmax(z, dim=-1)


def _topk_rows(source: Logits, index: torch.Tensor, k: int, temperature: float, chunk_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Top-k values (N×k, descending) of the std-normalised probabilities of the logit rows at flat rows ``index``
    (N) of ``source`` (B×T×V logits or :class:`HiddenRows`), chunked (``chunk_size`` rows), no grad
    (:func:`map_rows`)."""
    k = min(k, source.shape[-1])
    return map_rows(source, index, lambda r: std_normalized_probs(r.to(dtype), temperature).topk(k, dim=-1).values,
                    chunk_size)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


class MultiLevelOTLoss(DistillationLoss):
    """Multi-Level OT (docs/methods.md §7) for any two vocabularies; sums over student response tokens (module
    docstring).

    lambda_: λ, weight of the KD terms (CE weight 1). sl_weight, sd_weight: weights of L_SL and L_SD inside λ(·).
    top_k: K sorted probabilities kept per position. temperature: T of p = softmax(z/T) (z std-normalised).
    sd_temperature: temperature of the softmax over the K-vectors that makes the L_SD point clouds.
    eps, max_iter, tol: Sinkhorn's ε, iteration cap and marginal-error tolerance. chunk_size: positions per chunk
    of full-vocabulary work.
    """

    needs = Needs(teacher=True)
    fused_head = True  # both sides through logit_source: the student's rows and the teacher's top-k projected per chunk

    def __init__(self, lambda_: float = 1.5, sl_weight: float = 0.1, sd_weight: float = 0.1, top_k: int = 50,
                 temperature: float = 1.0, sd_temperature: float = 2.0, eps: float = 0.1, max_iter: int = 1000,
                 tol: float = 1e-6, chunk_size: int = 1024):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if temperature <= 0 or sd_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {temperature}, {sd_temperature}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.lambda_, self.sl_weight, self.sd_weight = lambda_, sl_weight, sd_weight
        self.top_k, self.temperature, self.sd_temperature = top_k, temperature, sd_temperature
        self.eps, self.max_iter, self.tol, self.chunk_size = eps, max_iter, tol, chunk_size

    def forward(self, inputs: LossInputs) -> LossOutput:
        batch, student = inputs.batch, inputs.student
        teacher = require_teacher(inputs, "multilevel_ot", check_labels=True)
        labels, t_labels = batch["labels"], batch["teacher_labels"]
        s_logits, t_logits = student.logit_source, teacher.logit_source
        mask = response_mask(labels)
        partner = response_alignment(labels, t_labels.to(labels.device))
        aligned = partner.ge(0)
        bsz, n = labels.shape
        rows, cols = aligned.nonzero(as_tuple=True)  # token order: grouped by example
        s_index = rows * n + cols
        dtype = torch.promote_types(torch.promote_types(s_logits.dtype, torch.float32), t_logits.dtype)
        k, temperature = min(self.top_k, s_logits.shape[-1]), self.temperature
        top = RowFeatures(s_index, select=lambda r: std_normalized_probs(r.to(dtype), temperature).topk(k, -1).indices,
                          value=lambda r, idx: std_normalized_probs(r.to(dtype), temperature).gather(1, idx))
        ce, p_s = chunked_rows_loss(cross_entropy, (s_logits,), mask, labels, chunk_size=self.chunk_size, features=top)
        zero = ce.new_zeros(())
        had = sl = sd = zero
        if rows.numel() > 0:
            p_t = _topk_rows(t_logits, partner[rows, cols], self.top_k, self.temperature, self.chunk_size, dtype)
            width = max(p_s.shape[-1], p_t.shape[-1])
            p_s, p_t = _pad(p_s, width), _pad(p_t, width)

            n_b = mask.sum(1).to(dtype)  # student response tokens per example
            a_b = aligned.sum(1)
            w_tok = (n_b / a_b.clamp_min(1).to(dtype))[rows]  # n_b / a_b per aligned pair
            had_i = (p_s - p_t).abs().sum(-1)
            sl_i = -(torch.softmax(p_t, -1) * torch.log_softmax(p_s, -1)).sum(-1)
            had, sl = (w_tok * had_i).sum(), (w_tok * sl_i).sum()

            # L_SD: pack each example's aligned points into B×A×K slots, padded slots masked out of the transport
            slot = aligned.long().cumsum(1)[rows, cols] - 1
            span = int(a_b.max())
            x_s = p_s.new_zeros(bsz, span, width).index_put((rows, slot), torch.softmax(p_s / self.sd_temperature, -1))
            x_t = p_t.new_zeros(bsz, span, width).index_put((rows, slot), torch.softmax(p_t / self.sd_temperature, -1))
            valid = torch.arange(span, device=a_b.device)[None, :] < a_b[:, None]
            cost = torch.cdist(x_s, x_t, p=1)  # B×A×A, C_ij = Σ_k |x_S,i,k − x_T,j,k|
            res = sinkhorn(cost, self.eps, mask_x=valid, mask_y=valid, max_iter=self.max_iter, tol=self.tol)
            sd = (n_b * res.cost).sum()
            had, sl, sd = had.to(ce.dtype), sl.to(ce.dtype), sd.to(ce.dtype)

        loss = ce + self.lambda_ * (had + self.sl_weight * sl + self.sd_weight * sd)
        metrics = {"ce": ce.detach(), "had": had.detach(), "sl": sl.detach(), "sd": sd.detach(),
                   "aligned": aligned.sum().to(loss.dtype)}
        return LossOutput(loss=loss, metrics=metrics)
