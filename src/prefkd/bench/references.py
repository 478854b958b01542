"""Eager references of the cross-tokenizer losses for ``python -m prefkd.bench --peers``: docs/methods.md §4–§8
written as plain PyTorch on full logits (no chunks, no fused heads), the way one would write them first.

Each reference takes the loss object (for its settings and its own trainable modules: projectors, cost weights), the
collated batch and both sides' :class:`~prefkd.losses.base.ModelOutputs` with **full** logits (B×n×V_s with a graph,
B×m×V_t detached) and hidden states, and returns the loss's value: the sum over the batch that the loss returns (the
trainer divides it). :func:`reference_for` picks the reference of a loss, or says why there is none (a setting the
reference does not write out). The OT plans come from :func:`prefkd.ot.sinkhorn` (the same solver as the losses: the
references check the full-vocabulary work, not the solver), with the envelope gradient (plan held fixed).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from prefkd.align.vocab_map import map_to_tensor
from prefkd.losses.base import ModelOutputs
from prefkd.losses.projectors import cross_model_attention
from prefkd.ot import (
    context_cosine_cost,
    context_euclidean_cost,
    context_vectors,
    euclidean_cost,
    kl_cost,
    pair_mask,
    salience_cost,
    scale_cost,
    sinkhorn,
)
from prefkd.utils.labels import IGNORE_INDEX

Reference = Callable[..., torch.Tensor]  # (loss, batch, student: ModelOutputs, teacher: ModelOutputs) -> scalar


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row, Σ_v p (log p − log q) with 0·log 0 = 0; log p is a target (read detached)."""
    log_p = log_p.detach()
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ CE over the rows, fp32: N×V, N."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def _ranked_pairs(labels: torch.Tensor, t_labels: torch.Tensor):
    """ULD's pairing (docs/methods.md §5): the k-th response position of each side, k < min(n_s, n_t), per example.
    Returns (b, j, i) long tensors (example, student position, teacher position) of the pairs, grouped by example."""
    bs, js, is_ = [], [], []
    for b in range(labels.shape[0]):
        sp = labels[b].ne(IGNORE_INDEX).nonzero().squeeze(1)
        tp = t_labels[b].ne(IGNORE_INDEX).nonzero().squeeze(1)
        a = min(sp.numel(), tp.numel())
        bs.append(torch.full((a,), b, dtype=torch.long, device=labels.device))
        js.append(sp[:a])
        is_.append(tp[:a])
    return torch.cat(bs), torch.cat(js), torch.cat(is_)


def _sorted_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """softmax(z/τ) sorted descending (the first ``top_k`` when given): N×V -> N×V (or N×K), fp32."""
    p = torch.softmax(logits.float() / temperature, -1)
    return p.sort(-1, descending=True).values if top_k is None else p.topk(min(top_k, p.shape[-1]), -1).values


def _pad_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(a.shape[-1], b.shape[-1])
    return F.pad(a, (0, width - a.shape[-1])), F.pad(b, (0, width - b.shape[-1]))


def uld(loss, batch: dict, student: ModelOutputs, teacher: ModelOutputs) -> torch.Tensor:
    """ULD (§5): ULD_k = Σ_r |p_S^(r) − p_T^(r)|, both sorted over the whole vocabulary (or the top K plus the
    remaining-mass bucket), the shorter zero-padded; ``dskd`` or ``paper`` mix."""
    labels, t_labels = batch["labels"], batch["teacher_labels"]
    mask = labels.ne(IGNORE_INDEX)
    ce = _ce(student.logits[mask], labels[mask])
    b, j, i = _ranked_pairs(labels, t_labels)
    ps = _sorted_probs(student.logits[b, j], loss.temperature, loss.top_k)
    pt = _sorted_probs(teacher.logits[b, i].detach(), loss.temperature, loss.top_k)
    rest = None if loss.top_k is None else ((1 - ps.sum(-1)).clamp_min(0) - (1 - pt.sum(-1)).clamp_min(0)).abs()
    ps, pt = _pad_pair(ps, pt)
    per_pair = (ps - pt).abs().sum(-1) + (0 if rest is None else rest)
    if loss.mix == "dskd":
        return (1 - loss.kd_rate) * ce + loss.kd_rate * per_pair.sum()
    n_b, a_b = mask.sum(1).float(), torch.bincount(b, minlength=labels.shape[0]).float()
    return ce + loss.uld_weight * (n_b[b] / a_b[b] * per_pair).sum()


def minedit(loss, batch: dict, student: ModelOutputs, teacher: ModelOutputs) -> torch.Tensor:
    """MinED (§6), ``merge: lowest``: at an aligned position j (teacher position i) the target is the teacher's
    logits gathered at s2t (one teacher id per student id, the lowest), −inf where unmapped; elsewhere one-hot on
    the gold token. (1 − kd_rate)·Σ CE + kd_rate·Σ KL(softmax(z̃/τ) ‖ softmax(z^s/τ))."""
    labels = batch["labels"]
    mask = labels.ne(IGNORE_INDEX)
    z_s = student.logits[mask].float()
    y = labels[mask]
    v_s, v_t = z_s.shape[-1], teacher.logits.shape[-1]
    s2t = map_to_tensor(loss.aligner.s2t, v_s).to(z_s.device)
    s2t[s2t >= v_t] = -1
    index = batch["mined_teacher_index"].to(labels.device)[mask]
    b = mask.nonzero()[:, 0]
    aligned = index.ge(0)
    z_t = teacher.logits.detach()[b, index.clamp_min(0)].float()  # one teacher row per student row
    target = z_t[:, s2t.clamp_min(0)].masked_fill(s2t.lt(0), -math.inf)
    target[~aligned] = -math.inf
    onehot = ~aligned | ~torch.isfinite(target).any(-1)
    target[onehot] = -math.inf
    target[onehot, y[onehot]] = 0.0
    tau = loss._divergence.keywords["temperature"]
    kd = _kl(torch.log_softmax(target / tau, -1), torch.log_softmax(z_s / tau, -1))
    return (1 - loss.kd_rate) * F.cross_entropy(z_s, y, reduction="sum") + loss.kd_rate * kd.sum()


def _std_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.float()
    return torch.softmax(z / z.std(-1, keepdim=True).clamp_min(1e-6) / temperature, -1)


def multilevel_ot(loss, batch: dict, student: ModelOutputs, teacher: ModelOutputs) -> torch.Tensor:
    """Multi-Level OT (§7): per ULD pair, p = top K of softmax((z/std z)/T) on each side; HAD, SL per pair, SD per
    example (Sinkhorn between the pairs' softmax(p/2) clouds, L1 cost); Σ CE + λ·Σ_b n_b·(mean HAD + w_sl·mean SL +
    w_sd·SD_b)."""
    labels, t_labels = batch["labels"], batch["teacher_labels"]
    mask = labels.ne(IGNORE_INDEX)
    ce = _ce(student.logits[mask], labels[mask])
    b, j, i = _ranked_pairs(labels, t_labels)
    if b.numel() == 0:
        return ce
    k = loss.top_k
    ps = _std_probs(student.logits[b, j], loss.temperature).topk(min(k, student.logits.shape[-1]), -1).values
    pt = _std_probs(teacher.logits[b, i].detach(), loss.temperature).topk(min(k, teacher.logits.shape[-1]), -1).values
    ps, pt = _pad_pair(ps, pt)
    bsz = labels.shape[0]
    n_b, a_b = mask.sum(1).float(), torch.bincount(b, minlength=bsz)
    w = n_b[b] / a_b[b].clamp_min(1).float()
    had = (w * (ps - pt).abs().sum(-1)).sum()
    sl = (w * -(torch.softmax(pt, -1) * torch.log_softmax(ps, -1)).sum(-1)).sum()
    span = int(a_b.max())
    slot = torch.cat([torch.arange(int(a), device=b.device) for a in a_b])
    x_s = ps.new_zeros(bsz, span, ps.shape[-1]).index_put((b, slot), torch.softmax(ps / loss.sd_temperature, -1))
    x_t = pt.new_zeros(bsz, span, pt.shape[-1]).index_put((b, slot), torch.softmax(pt / loss.sd_temperature, -1))
    valid = torch.arange(span, device=b.device)[None, :] < a_b[:, None]
    cost = (x_s[:, :, None, :] - x_t[:, None, :, :]).abs().sum(-1)  # B×A×A, C_ij = Σ_k |x_S,i,k − x_T,j,k|
    plan = sinkhorn(cost.detach(), loss.eps, mask_x=valid, mask_y=valid, max_iter=loss.max_iter, tol=loss.tol).plan
    sd = (n_b * (plan * torch.where(pair_mask(valid, valid), cost, 0.0)).sum((1, 2))).sum()
    return ce + loss.lambda_ * (had + loss.sl_weight * sl + loss.sd_weight * sd)


def _dual_space(dual, batch: dict, student: ModelOutputs, teacher: ModelOutputs, ce_weight: float | None):
    """DSKD-CMA (§4) on full logits: z^{t→s} = h̃ W_sᵀ (B×n×V_s) and z^{s→t} = h̃' W_tᵀ (B×m×V_t) built whole;
    w_ce·Σ CE + kd_rate·(Σ CE(z^{t→s}) + Σ acc·KL(p^{t→s} ‖ p_S) + Σ_{M_t} KL(p_T ‖ p^{s→t}))."""
    labels, t_labels = batch["labels"], batch["teacher_labels"]
    m_s, m_t = labels.ne(IGNORE_INDEX), t_labels.ne(IGNORE_INDEX)
    t2s, s2t = cross_model_attention(dual.projectors, student_model=student.model, teacher_model=teacher.model,
                                     batch=batch, student_hidden=student.hidden, teacher_hidden=teacher.hidden)
    w_s = student.model.get_output_embeddings().weight.detach()
    w_t = teacher.model.get_output_embeddings().weight.detach()
    z_t2s = (t2s @ w_s.t().float())[m_s]  # the whole B×n×V_s product, then its response rows
    z_s2t = (s2t @ w_t.t().float())[m_t]
    y = labels[m_s]
    z_s = student.logits[m_s].float()
    tau, tau_t = dual.temperature, dual._divergence.keywords.get("teacher_temperature", 1.0)
    acc = z_t2s.detach().argmax(-1).eq(y).float()
    kd_stu = (acc * _kl(torch.log_softmax(z_t2s / (tau * tau_t), -1), torch.log_softmax(z_s / tau, -1))).sum()
    z_t = teacher.logits.detach()[m_t].float()
    kd_tea = _kl(torch.log_softmax(z_t / tau, -1), torch.log_softmax(z_s2t / tau, -1)).sum() if dual.teacher_space \
        else 0.0
    w_ce = 1 - dual.kd_rate if ce_weight is None else ce_weight
    return w_ce * _ce(z_s, y) + dual.kd_rate * (_ce(z_t2s, y) + kd_stu + kd_tea)


def dskd_cma(loss, batch: dict, student: ModelOutputs, teacher: ModelOutputs) -> torch.Tensor:
    """DSKD-CMA (§4), eager (:func:`_dual_space`)."""
    return _dual_space(loss, batch, student, teacher, None)


def _points(mask: torch.Tensor):
    """(rows, cols, slot, valid B×P) of the points of a B×T mask, packed per example in order."""
    rows, cols = mask.nonzero(as_tuple=True)
    slot = mask.long().cumsum(1)[rows, cols] - 1
    counts = mask.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    return rows, cols, slot, torch.arange(width, device=mask.device)[None, :] < counts[:, None]


def _pack(values: torch.Tensor, rows, slot, valid) -> torch.Tensor:
    return values.new_zeros(*valid.shape, *values.shape[1:]).index_put((rows, slot), values)


def _transport(term, costs: list[torch.Tensor], valid_t, valid_s, n_b, eps, max_iter, tol) -> torch.Tensor:
    """λ·Σ_b n_b·⟨P*(C), C⟩, C = Σ_k α_k Ĉ_k (each cost over its mean on the example's valid pairs, detached)."""
    pairs = pair_mask(valid_t, valid_s)
    alpha = term.weights()
    cost = sum(a * scale_cost(c, pairs, term.cost_scale) for a, c in zip(alpha, costs))
    plan = sinkhorn(cost.detach(), eps, mask_x=valid_t, mask_y=valid_s, max_iter=max_iter, tol=tol).plan
    return term.weight * (n_b * (plan * torch.where(pairs, cost, 0.0)).sum((1, 2))).sum()


def mcw_kd(loss, batch: dict, student: ModelOutputs, teacher: ModelOutputs) -> torch.Tensor:
    """MCW-KD (§8): DSKD-CMA with w_ce (eager), plus the logits branch (top-k of the full logits at the points,
    softmax(·/τ_ot); euclidean, KL and salience costs) and the hidden branch (P_ot h^t and h^s; lexical, context
    euclidean / cosine or euclidean costs), each one Sinkhorn plan over its weighted scaled costs."""
    total = _dual_space(loss.dual_space, batch, student, teacher, loss.ce_weight)
    labels, t_labels = batch["labels"], batch["teacher_labels"]
    if loss.include_prompt:
        m_s, m_t = batch["attention_mask"].bool(), batch["teacher_attention_mask"].bool()
    else:
        m_s, m_t = labels.ne(IGNORE_INDEX), t_labels.ne(IGNORE_INDEX)
    s_rows, s_cols, s_slot, valid_s = _points(m_s)
    t_rows, t_cols, t_slot, valid_t = _points(m_t)
    n_b = labels.ne(IGNORE_INDEX).sum(1).float()
    ot = dict(eps=loss.transport.eps, max_iter=loss.transport.max_iter, tol=loss.transport.tol)
    x_t = loss.ot_projectors["hidden"](_pack(teacher.hidden.detach()[t_rows, t_cols].float(), t_rows, t_slot, valid_t))
    x_s = _pack(student.hidden[s_rows, s_cols].float(), s_rows, s_slot, valid_s)
    if loss.ot_logits.active:
        k = min(loss.top_k, student.logits.shape[-1], teacher.logits.shape[-1])
        top_s = _pack(student.logits.float().topk(k, -1).values[s_rows, s_cols], s_rows, s_slot, valid_s)
        top_t = _pack(teacher.logits.detach().float().topk(k, -1).values[t_rows, t_cols], t_rows, t_slot, valid_t)
        log_q, log_p = (torch.log_softmax(x / loss.ot_temperature, -1) for x in (top_t, top_s))
        sal = loss.ot_projectors["salience"]
        make = {"euclidean": lambda: euclidean_cost(log_q.exp(), log_p.exp()),
                "kl": lambda: kl_cost(log_q, log_p, log_input=True),
                "salience": lambda: salience_cost(torch.sigmoid(sal(x_t)).squeeze(-1),
                                                  torch.sigmoid(sal(x_s)).squeeze(-1))}
        total = total + _transport(loss.ot_logits, [make[c]() for c in loss.ot_logits.costs], valid_t, valid_s,
                                   n_b, **ot)
    if loss.ot_hidden.active:
        c_t, c_s = context_vectors(x_t, valid_t, loss.window), context_vectors(x_s, valid_s, loss.window)
        make = {"lexical": lambda: batch["lex_cost"].to(x_s.device, torch.float32),
                "context_euclidean": lambda: context_euclidean_cost(c_t, c_s, valid_t, valid_s),
                "context_cosine": lambda: context_cosine_cost(c_t, c_s),
                "euclidean": lambda: euclidean_cost(x_t, x_s)}
        total = total + _transport(loss.ot_hidden, [make[c]() for c in loss.ot_hidden.costs], valid_t, valid_s,
                                   n_b, **ot)
    return total


REFERENCES: dict[str, Reference] = {"uld": uld, "minedit": minedit, "multilevel_ot": multilevel_ot,
                                    "dskd_cma": dskd_cma, "mcw_kd": mcw_kd}


def reference_for(name: str, loss) -> tuple[Reference | None, str]:
    """(the eager reference of the loss config ``name``, '') or (None, why not): the references write out the
    defaults' branches (forward KL, MinED's ``merge: lowest``, MCW-KD's Sinkhorn without interpolation)."""
    if name not in REFERENCES:
        return None, f"no eager reference of {name} (references: {', '.join(REFERENCES)})"
    if name == "minedit" and (loss.merge != "lowest" or loss.top_k is not None or loss.divergence != "forward_kl"):
        return None, "the reference writes MinED with merge=lowest, top_k=null and forward_kl only"
    if name == "mcw_kd":
        if type(loss.transport).__name__ != "SinkhornTransport" or loss.interpolate:
            return None, "the reference writes MCW-KD with the Sinkhorn transport and no interpolation only"
        if loss.dual_space.divergence != "forward_kl" or loss.dual_space.pretrain_projectors:
            return None, "the reference writes DSKD-CMA with forward_kl (no projector pre-training) only"
    if name == "dskd_cma" and (loss.divergence != "forward_kl" or loss.pretrain_projectors):
        return None, "the reference writes DSKD-CMA with forward_kl (no projector pre-training) only"
    return REFERENCES[name], ""
