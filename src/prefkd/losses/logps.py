"""Log-probabilities, per-token KL and parent sums for the preference losses (docs/methods.md §10), memory-bounded.

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
the reference logits). Backward may run once per forward (:func:`prefkd.losses.chunked.chunked_row_terms`).

**Fused output heads** (issue 17): the policy's and the reference's logits may each be given as
:class:`~prefkd.losses.chunked.HiddenRows` (B×T×H hidden states and the model's output head); each chunk's rows
are then projected from the hidden states, no B×T×V tensor exists at all, and the policy's gradient lands in a
B×T×H buffer for the hidden states and a V×H fp32 one for the head's weight (and V for its bias).

**Parents** (:func:`parent_sums`): ℓ_p = Σ_{t: index[t] = p} token_logps[t], a differentiable scatter-add
(:func:`prefkd.align.parent_tokens.parent_logprobs`) over the parent index map of
:func:`prefkd.align.parent_tokens.parent_index_map` (−1 for positions in no parent; any negative index,
−100 included, is ignored).
"""

from __future__ import annotations

import torch

from prefkd.align.parent_tokens import parent_logprobs
from prefkd.losses.chunked import Logits, RowTermsFn, _compute_dtype, chunked_row_terms
from prefkd.losses.divergences import reverse_kl
from prefkd.utils.labels import IGNORE_INDEX


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


def _check_bt(logits: Logits, labels: torch.Tensor, chunk_size: int, name: str = "logits") -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shape = logits.shape  # a HiddenRows's is that of the logits it stands for
    if len(shape) != 3:
        raise ValueError(f"{name} must be B×T×V, got shape {tuple(shape)}")
    if labels.shape != shape[:2]:
        raise ValueError(f"labels must be B×T = {tuple(shape[:2])}, got {tuple(labels.shape)}")


def _token_terms(fn: RowTermsFn, k: int, logits: Logits, labels: torch.Tensor,
                 others: tuple[Logits, ...], chunk_size: int) -> torch.Tensor:
    return chunked_row_terms(fn, k, logits, labels.ne(IGNORE_INDEX), *others, labels.detach().long(),
                             chunk_size=chunk_size)


# -------------------------------------------------------------------------------------- public: log-probs
def token_logps(logits: Logits, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Per-token log-probs: log softmax(logits[b, t])[labels[b, t]], 0 where labels = −100.

    logits: B×T×V, any float dtype (fp32 compute per chunk; fp64 stays fp64), or their
    :class:`~prefkd.losses.chunked.HiddenRows`. labels: B×T, already shifted.
    Returns B×T (fp32, or fp64 for fp64 logits). Chunked; under no_grad (or for logits that need no
    gradient: references, weight models) it is a plain chunked computation. When the logits require a
    gradient it is differentiable, memory-bounded (see the module docstring): use it for the student's
    per-token log-probs that :func:`parent_sums` turns into parent log-probs. Backward may run once.
    """
    _check_bt(logits, labels, chunk_size)
    return _token_terms(_logp_terms, 1, logits, labels, (), chunk_size)[..., 0]


def sequence_logps(logits: Logits, labels: torch.Tensor, weights: torch.Tensor | None = None,
                   chunk_size: int = 1024) -> torch.Tensor:
    """s_b = Σ_{t: labels ≠ −100} w[b, t] · log softmax(logits[b, t])[labels[b, t]].

    logits: B×T×V (any float dtype) or their HiddenRows; labels: B×T (already shifted); weights: optional B×T,
    read detached (values at ignored positions never enter, even NaN). Returns B (fp32, or fp64 for fp64 logits).
    Gradient: ∂s_b/∂logits[b, t] = w[b, t]·(onehot(labels[b, t]) − softmax(logits[b, t])), written chunk by
    chunk into one logits-shaped buffer (logits dtype) during backward. Backward may run once per forward.
    """
    _check_bt(logits, labels, chunk_size)
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights must be B×T = {tuple(labels.shape)}, got {tuple(weights.shape)}")
    return weighted_sums(token_logps(logits, labels, chunk_size), weights, labels.ne(IGNORE_INDEX))


def token_kl(policy_logits: Logits, ref_logits: Logits, labels: torch.Tensor,
             chunk_size: int = 1024) -> torch.Tensor:
    """Per-position KL(π_θ ‖ π_ref) = Σ_v p_θ (log p_θ − log p_ref) at the label positions, 0 elsewhere.

    policy_logits: B×T×V (gets the gradient, memory-bounded); ref_logits: B×T×V_ref at the same positions
    (read detached, kept for the backward's recomputation); either may be HiddenRows. The convention of
    :func:`prefkd.losses.divergences.reverse_kl` (this is its value with s = policy, t = reference): fp32 at
    least, reference log-probs floored at LOGP_FLOOR, 0·log 0 = 0, vocabularies cut to the shared prefix.
    Returns B×T. Use :func:`token_logps_and_kl` when the policy log-probs are needed too (one buffer).
    """
    _check_bt(policy_logits, labels, chunk_size, "policy_logits")
    _check_bt(ref_logits, labels, chunk_size, "ref_logits")
    return _token_terms(_kl_terms, 1, policy_logits, labels, (ref_logits,), chunk_size)[..., 0]


def token_logps_and_kl(policy_logits: Logits, ref_logits: Logits, labels: torch.Tensor,
                       chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy token log-probs, reference token log-probs, token KL(π_θ ‖ π_ref)), each B×T, 0 at ignored
    positions, from ONE chunked pass over both logits and ONE gradient buffer (what TIS-DPO with its
    token-level KL term needs). The reference log-probs are detached; the other two are differentiable in
    ``policy_logits``. Conventions as :func:`token_logps` and :func:`token_kl`."""
    _check_bt(policy_logits, labels, chunk_size, "policy_logits")
    _check_bt(ref_logits, labels, chunk_size, "ref_logits")
    out = _token_terms(_logp_ref_kl_terms, 3, policy_logits, labels, (ref_logits,), chunk_size)
    return out[..., 0], out[..., 1].detach(), out[..., 2]


def sequence_kl(policy_logits: Logits, ref_logits: Logits, labels: torch.Tensor,
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

    With token log-probs this is ℓ_p = Σ_{t ∈ p} log π(y_t | x, y_<t) (docs/methods.md §10). ``parent_index`` is the
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
