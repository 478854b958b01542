"""The pure maths of preference distillation (SPEC §10): log-probabilities, parent sums, weights, losses.

Nothing here knows about models or the trainer; the ``DistillationLoss`` modules build on these functions.
Shapes: B sequences (one response each), T positions, V vocabulary, P parents. ``labels`` are already
shifted (``labels[:, t]`` is the target of ``logits[:, t]``) and −100 where no loss is taken (prompt,
padding), as everywhere in prefkd.

**Log-probabilities** (memory-bounded). For logits z (B×T×V) and labels y:

    token_logps[b, t]    = log softmax(z[b, t])[y[b, t]]      (0 where y = −100)
    sequence_logps[b]    = Σ_{t: y ≠ −100} w[b, t] · token_logps[b, t]
    token_kl[b, t]       = KL(π_θ(·|t) ‖ π_ref(·|t)) = Σ_v p_θ (log p_θ − log p_ref)   (0 where y = −100)

They never materialise a B×T×V softmax or an autograd graph over the logits: the forward walks the
label positions in chunks of ``chunk_size`` rows under no_grad (each chunk upcast to fp32; fp64 stays
fp64), and the backward walks them again, recomputes each chunk and writes its gradient

    ∂L/∂z[b, t] = g[b, t] · (onehot(y[b, t]) − softmax(z[b, t]))
    (g = ∂L/∂token_logps[b, t]; for sequence_logps g = ∂L/∂s_b · w[b, t])

into ONE zero-initialised buffer shaped like the logits (logits dtype), which is the gradient handed back.
Nothing logits-sized is kept between forward and backward except the logits themselves (and, for the KL,
the reference logits). Backward may run once per forward, like :mod:`prefkd.losses.chunked`.

**Parents** (:func:`parent_sums`): ℓ_p = Σ_{t: index[t] = p} token_logps[t], a differentiable scatter-add
(:func:`prefkd.align.parent_tokens.parent_logprobs`) over the parent index map of
:func:`prefkd.align.parent_tokens.parent_index_map` (−1 for positions in no parent; any negative index,
−100 included, is ignored).

**Weights** (:func:`parent_weights`, :func:`transform_weights`): w_p = k·exp(μ·clamp(ℓ⁺_p − ℓ⁻_p, L, U)),
then one of TIS-DPO's per-response transforms. Weights are data: every loss reads them detached.

**Losses** (one value per pair, shape B; the trainer sums and normalises by the number of pairs):

    h          = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]   (dpo_margin)
    dpo        = −(1−ε)·log σ(βh) − ε·log σ(−βh)                                   (ε: cDPO label smoothing)
    ipo        = (h − 1/(2β))²
    tisdpo     = −log σ(β·(h_w − α·(KL_w − KL_l))),  h_w: token-weighted sums Σ_t w_t(log π_θ − log π_ref)
    kd_tisdpo  = −log σ(β·(M_w − M_l)),  M = Σ_p w_p (ℓ^S_p − ℓ^T_p)     (teacher = reference, β 0.5)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from prefkd.align.parent_tokens import parent_logprobs
from prefkd.losses.chunked import _compute_dtype
from prefkd.losses.divergences import reverse_kl

IGNORE_INDEX = -100

RowTermsFn = Callable[..., torch.Tensor]  # (rows n×V, *other rows) -> n×K


# ------------------------------------------------------------------------------------- per-row terms
def _label_logp(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(rows)[labels]: n×V, n -> n (no n×V log-softmax kept: gather minus logsumexp)."""
    return rows.gather(-1, labels.long()[:, None]).squeeze(-1) - torch.logsumexp(rows, dim=-1)


def _logp_terms(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _label_logp(rows, labels)[:, None]


def _kl_terms(rows: torch.Tensor, ref_rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return reverse_kl(rows, ref_rows).to(rows.dtype)[:, None]


def _logp_ref_kl_terms(rows: torch.Tensor, ref_rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    ref = ref_rows.to(_compute_dtype(ref_rows.dtype))
    return torch.stack([_label_logp(rows, labels), _label_logp(ref, labels).to(rows.dtype),
                        reverse_kl(rows, ref_rows).to(rows.dtype)], dim=-1)


# ------------------------------------------------------------------------------ the chunked machinery
def _terms_loop(fn: RowTermsFn, k: int, logits: torch.Tensor, mask: torch.Tensor,
                others: tuple[torch.Tensor, ...], chunk_size: int) -> torch.Tensor:
    """B×T×K values of ``fn`` at the masked positions (0 elsewhere), chunked, no graph."""
    dtype = _compute_dtype(logits.dtype)
    out = torch.zeros(*mask.shape, k, dtype=dtype, device=logits.device)
    rows, cols = mask.nonzero(as_tuple=True)
    for start in range(0, rows.numel(), chunk_size):
        r, c = rows[start:start + chunk_size], cols[start:start + chunk_size]
        out[r, c] = fn(logits[r, c].to(dtype), *[o[r, c] for o in others]).to(dtype)
    return out


class _ChunkedTokenTerms(torch.autograd.Function):
    """Forward: per-token terms B×T×K, chunked under no_grad. Backward: per chunk, recompute the rows with
    a graph and write their vector-Jacobian product with the incoming B×T×K gradient into one buffer."""

    @staticmethod
    def forward(ctx, logits, fn, k, mask, chunk_size, *others):
        out = _terms_loop(fn, k, logits, mask, others, chunk_size)
        ctx.fn, ctx.chunk_size, ctx.n_others, ctx.consumed = fn, chunk_size, len(others), False
        ctx.save_for_backward(logits, mask, *others)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.consumed:
            raise RuntimeError("preference log-probs: backward can run only once per forward (the gradient is "
                               "recomputed into one buffer); recompute the log-probs instead of retain_graph=True")
        ctx.consumed = True
        logits, mask, *others = ctx.saved_tensors
        dtype = _compute_dtype(logits.dtype)
        buffer = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        rows, cols = mask.nonzero(as_tuple=True)
        for start in range(0, rows.numel(), ctx.chunk_size):
            r, c = rows[start:start + ctx.chunk_size], cols[start:start + ctx.chunk_size]
            with torch.enable_grad():
                leaf = logits[r, c].to(dtype).detach().requires_grad_(True)
                values = ctx.fn(leaf, *[o[r, c] for o in others])
                if not values.requires_grad:
                    continue
                (grad,) = torch.autograd.grad(values, leaf, grad_out[r, c].to(values.dtype), allow_unused=True)
            if grad is not None:
                buffer[r, c] = grad.to(buffer.dtype)
        return (buffer, None, None, None, None) + (None,) * ctx.n_others


def _check_bt(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int, name: str = "logits") -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must be B×T×V, got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be B×T = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")


def _token_terms(fn: RowTermsFn, k: int, logits: torch.Tensor, labels: torch.Tensor,
                 others: tuple[torch.Tensor, ...], chunk_size: int) -> torch.Tensor:
    mask = labels.detach().ne(IGNORE_INDEX)
    others = tuple(o.detach() for o in others) + (labels.detach().long(),)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedTokenTerms.apply(logits, fn, k, mask, chunk_size, *others)
    with torch.no_grad():
        return _terms_loop(fn, k, logits.detach(), mask, others, chunk_size)


# -------------------------------------------------------------------------------------- public: log-probs
def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Per-token log-probs: log softmax(logits[b, t])[labels[b, t]], 0 where labels = −100.

    logits: B×T×V, any float dtype (fp32 compute per chunk; fp64 stays fp64). labels: B×T, already shifted.
    Returns B×T (fp32, or fp64 for fp64 logits). Chunked; under no_grad (or for logits that need no
    gradient: references, weight models) it is a plain chunked computation. When the logits require a
    gradient it is differentiable, memory-bounded (see the module docstring): use it for the student's
    per-token log-probs that :func:`parent_sums` turns into parent log-probs. Backward may run once.
    """
    _check_bt(logits, labels, chunk_size)
    return _token_terms(_logp_terms, 1, logits, labels, (), chunk_size)[..., 0]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                   chunk_size: int = 1024) -> torch.Tensor:
    """s_b = Σ_{t: labels ≠ −100} w[b, t] · log softmax(logits[b, t])[labels[b, t]].

    logits: B×T×V (any float dtype); labels: B×T (already shifted); weights: optional B×T, read detached
    (values at ignored positions never enter, even NaN). Returns B (fp32, or fp64 for fp64 logits).
    Gradient: ∂s_b/∂logits[b, t] = w[b, t]·(onehot(labels[b, t]) − softmax(logits[b, t])), written chunk by
    chunk into one logits-shaped buffer (logits dtype) during backward. Backward may run once per forward.
    """
    _check_bt(logits, labels, chunk_size)
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights must be B×T = {tuple(labels.shape)}, got {tuple(weights.shape)}")
    return weighted_sums(token_logps(logits, labels, chunk_size), weights, labels.ne(IGNORE_INDEX))


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
             chunk_size: int = 1024) -> torch.Tensor:
    """Per-position KL(π_θ ‖ π_ref) = Σ_v p_θ (log p_θ − log p_ref) at the label positions, 0 elsewhere.

    policy_logits: B×T×V (gets the gradient, memory-bounded); ref_logits: B×T×V_ref at the same positions
    (read detached, kept for the backward's recomputation). The convention of
    :func:`prefkd.losses.divergences.reverse_kl` (this is its value with s = policy, t = reference): fp32 at
    least, reference log-probs floored at LOGP_FLOOR, 0·log 0 = 0, vocabularies cut to the shared prefix.
    Returns B×T. Use :func:`token_logps_and_kl` when the policy log-probs are needed too (one buffer).
    """
    _check_bt(policy_logits, labels, chunk_size, "policy_logits")
    _check_bt(ref_logits, labels, chunk_size, "ref_logits")
    return _token_terms(_kl_terms, 1, policy_logits, labels, (ref_logits,), chunk_size)[..., 0]


def token_logps_and_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                       chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy token log-probs, reference token log-probs, token KL(π_θ ‖ π_ref)), each B×T, 0 at ignored
    positions, from ONE chunked pass over both logits and ONE gradient buffer (what TIS-DPO with its
    token-level KL term needs). The reference log-probs are detached; the other two are differentiable in
    ``policy_logits``. Conventions as :func:`token_logps` and :func:`token_kl`."""
    _check_bt(policy_logits, labels, chunk_size, "policy_logits")
    _check_bt(ref_logits, labels, chunk_size, "ref_logits")
    out = _token_terms(_logp_ref_kl_terms, 3, policy_logits, labels, (ref_logits,), chunk_size)
    return out[..., 0], out[..., 1].detach(), out[..., 2]


def sequence_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """KL_b = Σ_{t: labels ≠ −100} w[b, t] · KL(π_θ(·|t) ‖ π_ref(·|t)) (:func:`token_kl`). Returns B."""
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights must be B×T = {tuple(labels.shape)}, got {tuple(weights.shape)}")
    return weighted_sums(token_kl(policy_logits, ref_logits, labels, chunk_size), weights,
                         labels.ne(IGNORE_INDEX))


def weighted_sums(values: torch.Tensor, weights: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k mask[b, k] · w[b, k] · values[b, k] over the last dim: B×K -> B.

    weights: optional B×K (default 1), read detached. mask: optional B×K bool (default all); entries outside
    it never enter, not even NaN/inf in ``values`` or ``weights``, and get a zero gradient.
    """
    if weights is not None:
        if weights.shape != values.shape:
            raise ValueError(f"weights {tuple(weights.shape)} and values {tuple(values.shape)} differ")
        weights = weights.detach().to(values.dtype)
    if mask is not None:
        if mask.shape != values.shape:
            raise ValueError(f"mask {tuple(mask.shape)} and values {tuple(values.shape)} differ")
        mask = mask.bool()
        if weights is not None:
            weights = torch.where(mask, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
    terms = values if weights is None else values * weights
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return terms.sum(-1)


# ----------------------------------------------------------------------------------------- public: parents
def parent_sums(token_values: torch.Tensor, parent_index: torch.Tensor, num_parents: int) -> torch.Tensor:
    """out[b, p] = Σ_{t: parent_index[b, t] = p} token_values[b, t]: B×T, B×T -> B×P (P = num_parents).

    With token log-probs this is ℓ_p = Σ_{t ∈ p} log π(y_t | x, y_<t) (SPEC §10). ``parent_index`` is the
    stacked :func:`prefkd.align.parent_tokens.parent_index_map` of each row: −1 (any negative value, −100
    included) for positions in no parent, whose values never enter (even NaN). Differentiable in
    ``token_values`` (a scatter-add: each token gets its parent's gradient); a parent without tokens gets 0.
    Raises for indices ≥ num_parents. Wraps :func:`prefkd.align.parent_tokens.parent_logprobs`.
    """
    if num_parents < 0:
        raise ValueError(f"num_parents must be >= 0, got {num_parents}")
    if token_values.shape != parent_index.shape:
        raise ValueError(f"token_values {tuple(token_values.shape)} and parent_index "
                         f"{tuple(parent_index.shape)} differ")
    index = parent_index.long()
    if index.numel() and bool((index >= num_parents).any()):
        raise ValueError(f"parent_index holds {int(index.max())}, but num_parents = {num_parents}")
    return parent_logprobs(token_values, index, num_parents)


def parent_mask(parent_index: torch.Tensor, num_parents: int) -> torch.Tensor:
    """B×P bool: parent p of row b owns at least one position of ``parent_index`` (B×T, negatives = none).
    The mask of real (non-padding) parents for :func:`kd_tisdpo_loss`."""
    index = parent_index.long()
    bins = torch.where(index >= 0, index, num_parents)
    counts = torch.zeros(*index.shape[:-1], num_parents + 1, dtype=torch.long, device=index.device)
    counts.scatter_add_(-1, bins, torch.ones_like(bins))
    return counts[..., :num_parents] > 0


def tokens_from_parents(parent_values: torch.Tensor, parent_index: torch.Tensor) -> torch.Tensor:
    """out[b, t] = parent_values[b, parent_index[b, t]], 0 where parent_index < 0: B×P, B×T -> B×T.

    Spreads parent weights over their tokens: Σ_p w_p ℓ_p = Σ_t w_{p(t)} log π(y_t), so
    ``sequence_logps(logits, labels, tokens_from_parents(w, index))`` gives the weighted parent sum directly.
    """
    index = parent_index.long()
    if parent_values.shape[-1] == 0:
        return torch.zeros(index.shape, dtype=parent_values.dtype, device=parent_values.device)
    gathered = parent_values.gather(-1, index.clamp_min(0))
    return torch.where(index >= 0, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))


# ------------------------------------------------------------------------------------------ public: losses
def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def dpo_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)], each input B (sequence
    log-probs, or weighted sums of them) -> B."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(h: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO / cDPO per pair: −(1−ε)·log σ(βh) − ε·log σ(−βh), ε = ``label_smoothing`` ∈ [0, 1]
    (log σ by ``logsigmoid``: stable for any h). h: B (:func:`dpo_margin`) -> B."""
    _check_beta(beta)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    loss = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
    if label_smoothing:
        loss = loss - label_smoothing * F.logsigmoid(-beta * h)
    return loss


def ipo_loss(h: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """IPO per pair: (h − 1/(2β))². h: B -> B. (h as given: sums, or per-token means if the caller wants
    IPO's length-normalised variant.)"""
    _check_beta(beta)
    return (h - 1.0 / (2.0 * beta)) ** 2


def tisdpo_margin(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, weights_chosen: torch.Tensor | None,
                  policy_rejected: torch.Tensor, ref_rejected: torch.Tensor, weights_rejected: torch.Tensor | None,
                  mask_chosen: torch.Tensor | None = None, mask_rejected: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Token-weighted h = Σ_t w^w_t (log π_θ − log π_ref)(y_w,t) − Σ_t w^l_t (log π_θ − log π_ref)(y_l,t).

    policy_*, ref_*: B×T per-token log-probs (:func:`token_logps`, :func:`token_logps_and_kl`); weights_*:
    B×T or None (all 1), read detached; mask_*: B×T bool (labels ≠ −100) or None (all). Returns B.
    """
    return (weighted_sums(policy_chosen - ref_chosen, weights_chosen, mask_chosen)
            - weighted_sums(policy_rejected - ref_rejected, weights_rejected, mask_rejected))


def tisdpo_loss(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, weights_chosen: torch.Tensor | None,
                policy_rejected: torch.Tensor, ref_rejected: torch.Tensor, weights_rejected: torch.Tensor | None,
                *, mask_chosen: torch.Tensor | None = None, mask_rejected: torch.Tensor | None = None,
                kl_chosen: torch.Tensor | None = None, kl_rejected: torch.Tensor | None = None,
                beta: float = 0.1, alpha: float = 0.5) -> torch.Tensor:
    """TIS-DPO per pair (one tokenizer): L = −log σ(β·z), with

        h    = Σ_t w^w_t (log π_θ − log π_ref)(y_w,t) − Σ_t w^l_t (log π_θ − log π_ref)(y_l,t)  (tisdpo_margin)
        z    = h                         without the token-level KL term (kl_* None)
        z    = h − α·(KL_w − KL_l)       with it, KL_y = Σ_t w^y_t · KL(π_θ(·|x, y_<t) ‖ π_ref(·|x, y_<t))

    The KL term follows SPEC §10 ("logits = h − α(KL_w − KL_l)", β 0.1, α 0.5) and TIS-DPO's public code
    (``tisdpo_loss`` with ``token_level=True`` and ``_get_batch_logps_tisdpo``): the per-position KL is
    **KL(π_θ ‖ π_ref)** = Σ_v π_θ (log π_θ − log π_ref), it is weighted by the same token weights as the
    log-ratios, summed over the response, nothing in it is detached, and β multiplies the whole logit
    (loss = −logsigmoid(β·z)). (TDPO, which TIS-DPO's code derives from, uses KL(π_ref ‖ π_θ) with the
    opposite sign, z = h − α(KL_l − KL_w.detach()); that is not what TIS-DPO or the SPEC use.)

    policy_*, ref_*: B×T per-token log-probs; weights_*: B×T or None (all 1), read detached; mask_*: B×T
    bool or None (all); kl_*: B×T per-token KL (:func:`token_kl` / :func:`token_logps_and_kl`), both or
    neither. With all weights 1 and no KL term (or α = 0) this is :func:`dpo_loss` of the plain sums.
    Returns B.
    """
    _check_beta(beta)
    if (kl_chosen is None) != (kl_rejected is None):
        raise ValueError("give both kl_chosen and kl_rejected, or neither")
    z = tisdpo_margin(policy_chosen, ref_chosen, weights_chosen, policy_rejected, ref_rejected, weights_rejected,
                      mask_chosen, mask_rejected)
    if kl_chosen is not None:
        kl_w = weighted_sums(kl_chosen, weights_chosen, mask_chosen)
        kl_l = weighted_sums(kl_rejected, weights_rejected, mask_rejected)
        z = z - alpha * (kl_w - kl_l)
    return -F.logsigmoid(beta * z)


def kd_tisdpo_margin(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """M = Σ_p w_p (ℓ^S_p − ℓ^T_p): student and teacher parent log-probs B×P (:func:`parent_sums`), weights
    B×P or None (all 1, read detached), mask B×P bool (real parents, :func:`parent_mask`) or None. -> B."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} parent log-probs "
                         f"differ: both sides must describe the same parents")
    return weighted_sums(student - teacher, weights, mask)


def kd_tisdpo_loss(student_chosen: torch.Tensor, teacher_chosen: torch.Tensor, weights_chosen: torch.Tensor | None,
                   student_rejected: torch.Tensor, teacher_rejected: torch.Tensor,
                   weights_rejected: torch.Tensor | None, *, beta: float = 0.5,
                   mask_chosen: torch.Tensor | None = None, mask_rejected: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """PrefKD per pair (teacher as reference, any tokenizers): L = −log σ(β·(M_w − M_l)),
    M = Σ_p w_p (ℓ^S_p − ℓ^T_p) over the parents of the chosen / rejected response (:func:`kd_tisdpo_margin`).

    student_*, teacher_*: B×P parent log-probs (the student's differentiable); weights_*: B×P parent weights
    or None (all 1); mask_*: B×P bool of real parents or None. β 0.5 (SPEC). With identical tokenizers (one
    parent per token) and all weights 1 it equals :func:`dpo_loss` with the teacher as reference. Returns B.
    """
    _check_beta(beta)
    m_w = kd_tisdpo_margin(student_chosen, teacher_chosen, weights_chosen, mask_chosen)
    m_l = kd_tisdpo_margin(student_rejected, teacher_rejected, weights_rejected, mask_rejected)
    return -F.logsigmoid(beta * (m_w - m_l))


@torch.no_grad()
def preference_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                       ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The SPEC §10 metrics of a micro-batch, as detached 0-dim tensors holding **sums over the B pairs**
    (the trainer adds them over micro-batches and ranks and divides by the number of pairs):

        rewards/chosen     Σ_b r_w,  r_w = β (log π_θ(y_w) − log π_ref(y_w))
        rewards/rejected   Σ_b r_l,  r_l = β (log π_θ(y_l) − log π_ref(y_l))
        rewards/accuracies Σ_b [r_w > r_l]       (a tie counts as wrong, as in DPO)
        rewards/margins    Σ_b (r_w − r_l)
        logps/chosen       Σ_b log π_θ(y_w)
        logps/rejected     Σ_b log π_θ(y_l)

    Inputs are B sequence log-probs as the loss uses them: plain sums for dpo/ipo, token-weighted sums for
    tisdpo, Σ_p w_p ℓ^S_p and Σ_p w_p ℓ^T_p for kd_tisdpo (so its rewards are β·M_w and β·M_l).
    """
    r_w = beta * (policy_chosen - ref_chosen)
    r_l = beta * (policy_rejected - ref_rejected)
    return {
        "rewards/chosen": r_w.sum(),
        "rewards/rejected": r_l.sum(),
        "rewards/accuracies": (r_w > r_l).to(r_w.dtype).sum(),
        "rewards/margins": (r_w - r_l).sum(),
        "logps/chosen": policy_chosen.sum(),
        "logps/rejected": policy_rejected.sum(),
    }


# ----------------------------------------------------------------------------------------- public: weights
def parent_weights(lp_pos: torch.Tensor, lp_neg: torch.Tensor, chosen: bool, k: float = 1.0,
                   lower: float = -0.5, upper: float = 1.5) -> torch.Tensor:
    """w_p = k·exp(μ·clamp(ℓ⁺_p − ℓ⁻_p, L, U)), μ = +1 on the chosen response, −1 on the rejected one.

    lp_pos, lp_neg: parent (or token) log-probs under π⁺ (DPO-trained) and π⁻ (trained on the reversed
    data), any equal shapes. The clamp is applied before the sign: on a rejected response the weights lie in
    [k·e^{−U}, k·e^{−L}]. Defaults k = 1, L = −0.5, U = 1.5 (SPEC §10). Returns the same shape.
    """
    if lower > upper:
        raise ValueError(f"lower must be <= upper, got {lower} > {upper}")
    lp_pos, lp_neg = torch.as_tensor(lp_pos), torch.as_tensor(lp_neg)
    if lp_pos.shape != lp_neg.shape:
        raise ValueError(f"lp_pos {tuple(lp_pos.shape)} and lp_neg {tuple(lp_neg.shape)} differ")
    mu = 1.0 if chosen else -1.0
    return k * torch.exp(mu * (lp_pos - lp_neg).clamp(lower, upper))


def _float_like(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.is_floating_point() else torch.get_default_dtype()


def _origin(w: torch.Tensor) -> torch.Tensor:
    return w.to(_float_like(w)).clone()


def _binary(w: torch.Tensor, *, q: float) -> torch.Tensor:
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"binary: q is a percentage in [0, 100], got {q}")
    w, n = w.to(_float_like(w)), w.numel()
    k = math.floor(q * n / 100.0 + 1e-9)
    out = torch.zeros(n, dtype=_float_like(w), device=w.device)
    if k == 0:
        return out
    kth = torch.topk(w, k).values[-1]
    return (w >= kth).to(out.dtype)


def _threshold(w: torch.Tensor, *, lo: float, hi: float) -> torch.Tensor:
    if lo > hi:
        raise ValueError(f"threshold: lo must be <= hi, got {lo} > {hi}")
    return w.to(_float_like(w)).clamp(lo, hi)


def _threshold_and_scale(w: torch.Tensor, *, lo: float, hi: float, s_min: float, s_max: float) -> torch.Tensor:
    if not lo < hi:
        raise ValueError(f"threshold_and_scale: lo must be < hi, got {lo}, {hi}")
    clipped = w.to(_float_like(w)).clamp(lo, hi)
    return s_min + (clipped - lo) / (hi - lo) * (s_max - s_min)


def _random(w: torch.Tensor, *, a: float, b: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if a > b:
        raise ValueError(f"random: a must be <= b, got {a} > {b}")
    u = torch.rand(w.shape, generator=generator, dtype=_float_like(w), device=w.device)
    return a + (b - a) * u


def _rank_based(w: torch.Tensor, *, s_min: float, s_max: float) -> torch.Tensor:
    n, dtype = w.numel(), _float_like(w)
    if n <= 1:
        return torch.ones(n, dtype=dtype, device=w.device)
    sorted_w, order = torch.sort(w, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_w, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0) - 1
    mean_rank = (ends - (counts - 1) / 2.0).to(dtype)  # average of the ordinal ranks of each tie group
    ranks = torch.empty(n, dtype=dtype, device=w.device)
    ranks[order] = mean_rank[inverse]
    return s_min + ranks / (n - 1) * (s_max - s_min)


TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {
    "origin": _origin,
    "binary": _binary,
    "threshold": _threshold,
    "threshold_and_scale": _threshold_and_scale,
    "random": _random,
    "rank_based": _rank_based,
}


def transform_weights(w: torch.Tensor, kind: str, **params) -> torch.Tensor:
    """One response's weights (1-D, n values) through a TIS-DPO transform (SPEC §10). Returns n floats
    (the input's float dtype, else the default dtype); no gradient is meant to flow.

    - ``origin``: unchanged (a copy).
    - ``binary(q)``: the top q % → 1, the rest → 0. k = ⌊q·n/100⌋ elements are asked for (rounded down, so
      a q giving less than one element marks none: all 0); an element gets 1 iff its value is ≥ the k-th
      largest value, so **ties at the cut are all kept** (more than k ones possible; order never matters).
    - ``threshold(lo, hi)``: clip to [lo, hi].
    - ``threshold_and_scale(lo, hi, s_min, s_max)``: clip to [lo, hi] (lo < hi), then map [lo, hi] linearly
      onto [s_min, s_max]: s_min + (clip(w) − lo)/(hi − lo)·(s_max − s_min).
    - ``random(a, b, generator=None)``: fresh U(a, b) values (the input only gives n, dtype and device);
      pass a ``torch.Generator`` (on that device) for reproducibility.
    - ``rank_based(s_min, s_max)``: ascending ranks r ∈ [0, n−1] mapped to s_min + r/(n−1)·(s_max − s_min)
      (the largest weight gets s_max); **ties share the average of their ranks** (scipy's "average"), so
      equal weights stay equal (all equal: all (s_min+s_max)/2). A single element → 1; empty → empty.

    TIS-DPO's public transform code was not available to check, so these follow the SPEC's words.
    """
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown weight transform {kind!r}; valid kinds: {', '.join(TRANSFORMS)}")
    w = torch.as_tensor(w).detach()
    if w.dim() != 1:
        raise ValueError(f"transform_weights takes one response's weights (1-D), got shape {tuple(w.shape)}")
    return TRANSFORMS[kind](w, **params)
