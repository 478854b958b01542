"""Transport costs between a teacher cloud (points j ≤ m) and a student cloud (points i ≤ n) (docs/methods.md §8).

Every cost is a B×m×n tensor C[b, j, i] (teacher along dim 1, student along dim 2, as docs/methods.md §8 writes
C[j, i]), computed in fp32 or wider (bf16/fp16 inputs are upcast; fp64 stays fp64). Entries that
involve a padded point hold finite values that mean nothing: pass the point masks to :func:`sinkhorn`
and :func:`scale_cost` (``pair_mask(mask_x, mask_y)``), which ignore them.

- :func:`euclidean_cost`         C[j, i] = ‖x_j − y_i‖₂
- :func:`kl_cost`                C[j, i] = Σ_k q_j,k log(q_j,k / p_i,k)
- :func:`salience_cost`          C[j, i] = |s^t_j − s^s_i|
- :func:`normalized_edit_distance_matrix`  C[j, i] = Lev(t_j, s_i) / max(|t_j|, |s_i|) (data pipeline)
- :func:`context_euclidean_cost` C[j, i] = ‖c^t_j − c^s_i‖₂ / max over valid (j, i)
- :func:`context_cosine_cost`    C[j, i] = 1 − cos(c^t_j, c^s_i)

with :func:`context_vectors` c_i = mean of h_k over valid k ∈ [i − w, i + w], and :func:`scale_cost` to
bring costs to a comparable range before :func:`prefkd.ot.combine_costs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGP_FLOOR = -1e5  # log-probabilities are floored here (as in prefkd.losses.divergences): 0·log 0 = 0
WORD_MARKERS = "Ġ▁"  # byte-level BPE (GPT-2) and SentencePiece word-start markers


def _float(*ts: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def pair_mask(mask_x: torch.Tensor | None, mask_y: torch.Tensor | None) -> torch.Tensor | None:
    """B×m×n validity of the pairs (j, i) from the point masks B×m and B×n (None if both are None)."""
    if mask_x is None and mask_y is None:
        return None
    if mask_x is None:
        mask_x = torch.ones(mask_y.shape[0], 1, dtype=torch.bool, device=mask_y.device)
    if mask_y is None:
        mask_y = torch.ones(mask_x.shape[0], 1, dtype=torch.bool, device=mask_x.device)
    return mask_x.bool()[:, :, None] & mask_y.bool()[:, None, :]


def scale_cost(
    cost: torch.Tensor, mask: torch.Tensor | None = None, mode: str | None = "mean", per_example: bool = True
) -> torch.Tensor:
    """Ĉ = C / s with s the mean or the max of C over valid entries, detached (``mode=None``: C unchanged).

    cost: B×m×n; mask: B×m×n bool (None: all valid). ``per_example``: one s per problem (B), else one over
    the whole batch. A scale that is not > 0 (no valid entry, or all zero) is replaced by 1.
    """
    if mode is None:
        return cost
    if mode not in ("mean", "max"):
        raise ValueError(f"scale mode must be 'mean', 'max' or None, got {mode!r}")
    c = cost.detach()
    valid = torch.ones_like(c, dtype=torch.bool) if mask is None else mask.to(torch.bool).expand_as(c)
    dims = (-2, -1) if per_example else tuple(range(c.dim()))
    if mode == "mean":
        s = torch.where(valid, c, 0).sum(dims, keepdim=True) / valid.sum(dims, keepdim=True).clamp_min(1)
    else:
        s = torch.where(valid, c, torch.finfo(c.dtype).min).amax(dims, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return cost / s


def euclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C[b, j, i] = ‖x_bj − y_bi‖₂ for x B×m×d, y B×n×d.

    Computed as √(max(‖x‖² + ‖y‖² − 2 x·y, 0)) (one batched matmul, no B×m×n×d tensor) after centring both
    clouds on the mean of y (translation invariant; less cancellation). Coincident points give 0 up to
    √(rounding) of that formula, and the gradient is never NaN (0 where the squared distance is ≤ 0).
    """
    dtype = _float(x, y)
    x, y = x.to(dtype), y.to(dtype)
    centre = y.detach().mean(dim=1, keepdim=True)
    x, y = x - centre, y - centre
    sq = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * torch.bmm(x, y.transpose(1, 2))
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, 1.0).sqrt(), 0.0)


def kl_cost(q: torch.Tensor, p: torch.Tensor, log_input: bool = False) -> torch.Tensor:
    """C[b, j, i] = KL(q_bj ‖ p_bi) = Σ_k q_bj,k (log q_bj,k − log p_bi,k) for q B×m×k, p B×n×k.

    ``log_input=True``: q and p are log-probabilities (more stable; e.g. log_softmax outputs). Logs are
    floored at ``LOGP_FLOOR`` so that 0·log 0 = 0 and a zero p gives a large finite cost instead of inf.
    Computed as Σ_k q log q − q @ (log p)ᵀ (one batched matmul).
    """
    dtype = _float(q, p)
    if log_input:
        log_q, log_p = q.to(dtype).clamp_min(LOGP_FLOOR), p.to(dtype).clamp_min(LOGP_FLOOR)
        q = log_q.exp()
    else:
        q, p = q.to(dtype), p.to(dtype)
        log_q = torch.where(q > 0, q, 1.0).log().clamp_min(LOGP_FLOOR)
        log_p = torch.where(p > 0, p, 1.0).log().where(p > 0, LOGP_FLOOR).clamp_min(LOGP_FLOOR)
    neg_entropy = (q * log_q).sum(-1)  # B×m
    return neg_entropy[:, :, None] - torch.bmm(q, log_p.transpose(1, 2))


def salience_cost(s_t: torch.Tensor, s_s: torch.Tensor) -> torch.Tensor:
    """C[b, j, i] = |s_t[b, j] − s_s[b, i]| for salience scores s_t B×m, s_s B×n (e.g. σ(wᵀh + b))."""
    dtype = _float(s_t, s_s)
    return (s_t.to(dtype)[:, :, None] - s_s.to(dtype)[:, None, :]).abs()


def strip_markers(token: str, markers: str | tuple[str, ...] = WORD_MARKERS) -> str:
    """``token`` without word-start markers: every occurrence of each marker is removed (``"ĠĠ"`` → ``""``),
    as :func:`prefkd.align.strip_marker` does. ``markers``: marker characters (default GPT-2 ``Ġ`` and
    SentencePiece ``▁``), or a tuple of marker strings, e.g. ``(word_start_marker(tokenizer),)``."""
    for marker in markers:
        if marker:
            token = token.replace(marker, "")
    return token


def normalized_edit_distance_matrix(
    teacher_tokens: list[str],
    student_tokens: list[str],
    teacher_markers: str | tuple[str, ...] = WORD_MARKERS,
    student_markers: str | tuple[str, ...] = WORD_MARKERS,
) -> torch.Tensor:
    """m×n fp32 matrix D[j, i] = Lev(t_j, s_i) / max(|t_j|, |s_i|) (0 for two empty strings), after
    :func:`strip_markers` on both sides.

    The full matrix (not only a DTW path), computed once per example by the data pipeline with
    ``rapidfuzz.process.cdist`` (needs ``rapidfuzz``, the ``align`` extra); pad it into B×m×n for the batch.
    """
    import numpy as np
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    t = [strip_markers(x, teacher_markers) for x in teacher_tokens]
    s = [strip_markers(x, student_markers) for x in student_tokens]
    if not t or not s:
        return torch.zeros(len(t), len(s), dtype=torch.float32)
    d = process.cdist(t, s, scorer=Levenshtein.normalized_distance, dtype=np.float32, workers=1)
    return torch.from_numpy(d)


def context_vectors(h: torch.Tensor, mask: torch.Tensor | None = None, window: int = 4) -> torch.Tensor:
    """c[b, i] = mean of h[b, k] over valid k ∈ [i − w, i + w] (clipped to the sequence), h B×T×d → B×T×d.

    Window sums from one cumulative sum (in fp64, to avoid cancellation): S[i] = cs[i + w + 1] − cs[i − w].
    Padded positions (mask False) do not contribute and get c = 0.
    """
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    bsz, length, _ = h.shape
    dtype = _float(h)
    m = torch.ones(bsz, length, dtype=torch.bool, device=h.device) if mask is None else mask.to(torch.bool)
    w = m[:, :, None].to(torch.float64)
    z = torch.zeros(bsz, 1, 1, dtype=torch.float64, device=h.device)
    cs = torch.cat([z.expand(-1, -1, h.shape[2]), (h.to(torch.float64) * w).cumsum(1)], dim=1)  # B×(T+1)×d
    cn = torch.cat([z, w.cumsum(1)], dim=1)  # B×(T+1)×1
    pos = torch.arange(length, device=h.device)
    hi = (pos + window + 1).clamp(max=length)
    lo = (pos - window).clamp(min=0)
    total = cs[:, hi] - cs[:, lo]
    count = cn[:, hi] - cn[:, lo]
    c = (total / count.clamp_min(1)).to(dtype)
    return torch.where(m[:, :, None], c, 0.0)


def context_euclidean_cost(
    c_t: torch.Tensor, c_s: torch.Tensor, mask_t: torch.Tensor | None = None, mask_s: torch.Tensor | None = None
) -> torch.Tensor:
    """C[b, j, i] = ‖c_t[b, j] − c_s[b, i]‖₂ / max over valid (j, i) of problem b (detached), in [0, 1].

    c_t B×m×d, c_s B×n×d context vectors (:func:`context_vectors`); masks B×m, B×n.
    """
    return scale_cost(euclidean_cost(c_t, c_s), pair_mask(mask_t, mask_s), mode="max")


def context_cosine_cost(c_t: torch.Tensor, c_s: torch.Tensor) -> torch.Tensor:
    """C[b, j, i] = 1 − cos(c_t[b, j], c_s[b, i]) ∈ [0, 2]; a zero vector has cosine 0 with everything."""
    dtype = _float(c_t, c_s)
    nt = F.normalize(c_t.to(dtype), dim=-1, eps=1e-12)
    ns = F.normalize(c_s.to(dtype), dim=-1, eps=1e-12)
    return 1.0 - torch.bmm(nt, ns.transpose(1, 2))
