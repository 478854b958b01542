"""Same-vocabulary divergences (docs/methods.md §3) as per-token functions of logits, and their chunked sums.

Every divergence takes ``s_logits`` (N×V_s) and ``t_logits`` (N×V_t) and returns N values (fp32, or
fp64 for fp64 inputs), with

    p_S = softmax(z^s / τ),   p_T = softmax(z^t / (τ·τ_t))

(τ = ``temperature``; τ_t = ``teacher_temperature``, 1 except where a method says otherwise, docs/methods.md §4).
No τ² factor. Values are the true divergences (the teacher-entropy term is kept). When V_s ≠ V_t
(padding rows, as in Qwen) both sides are cut to the shared prefix min(V_s, V_t) before the softmax.

Conventions: 0·log 0 = 0. Teacher log-probabilities are floored at ``LOGP_FLOOR`` (−1e5), so a −inf
teacher logit behaves like a −1e5 one (docs/methods.md §6's convention for masked ids): the forward direction is
unchanged, the reverse direction gets a large finite penalty on student mass there instead of +inf, and
nothing turns NaN.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial

import torch

from prefkd.losses.chunked import Logits, chunked_token_loss
from prefkd.utils.labels import IGNORE_INDEX

LOGP_FLOOR = -1e5

PerTokenDivergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _float(x: torch.Tensor, other: torch.Tensor | None = None) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, torch.float32)
    return dtype if other is None else torch.promote_types(dtype, other.dtype)


def log_probs(
    s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0, teacher_temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_S, log p_T), each N×min(V_s, V_t), fp32 at least: log_softmax(z^s/τ), log_softmax(z^t/(τ·τ_t)).

    The teacher side is detached and floored at ``LOGP_FLOOR``.
    """
    if temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {temperature}, {teacher_temperature}")
    v = min(s_logits.shape[-1], t_logits.shape[-1])
    dtype = _float(s_logits, t_logits)
    log_s = torch.log_softmax(s_logits[..., :v].to(dtype) / temperature, dim=-1)
    t = t_logits.detach()[..., :v].to(dtype)
    log_t = torch.log_softmax(t / (temperature * teacher_temperature), dim=-1).clamp_min_(LOGP_FLOOR)
    return log_s, log_t


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p (log p − log q) over the last dim, with 0·log 0 = 0 (NaN-free values and grads). A detached
    p (the teacher's, floored at LOGP_FLOOR, so p·log p is finite) takes the form Σ p log p − Σ p log q, which keeps
    fewer V-wide tensors alive."""
    p = log_p.exp()
    keep = p > 0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    if not log_p.requires_grad:
        with torch.no_grad():
            entropy = torch.linalg.vecdot(p, log_p)
        return entropy - torch.linalg.vecdot(p, torch.where(keep, log_q, zero))
    return (p * (torch.where(keep, log_p, zero) - torch.where(keep, log_q, zero))).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, a: float) -> torch.Tensor:
    """log(a·p_a + (1−a)·p_b), by logsumexp of (log a + log p_a, log(1−a) + log p_b)."""
    return torch.logaddexp(log_a + math.log(a), log_b + math.log1p(-a))


def _check_lambda(lam: float) -> None:
    if not 0.0 < lam < 1.0:
        raise ValueError(f"skew_lambda must be in (0, 1), got {lam}")


def forward_kl(s_logits, t_logits, temperature=1.0, teacher_temperature=1.0):
    """FKL = Σ_v p_T (log p_T − log p_S). N×V_s, N×V_t -> N."""
    log_s, log_t = log_probs(s_logits, t_logits, temperature, teacher_temperature)
    return _kl(log_t, log_s)


def reverse_kl(s_logits, t_logits, temperature=1.0, teacher_temperature=1.0):
    """RKL = Σ_v p_S (log p_S − log p_T). N×V_s, N×V_t -> N."""
    log_s, log_t = log_probs(s_logits, t_logits, temperature, teacher_temperature)
    return _kl(log_s, log_t)


def skewed_forward_kl(s_logits, t_logits, temperature=1.0, teacher_temperature=1.0, skew_lambda=0.1):
    """SFKL = Σ_v p_T (log p_T − log(λ p_T + (1−λ) p_S)), λ = skew_lambda. N×V_s, N×V_t -> N."""
    _check_lambda(skew_lambda)
    log_s, log_t = log_probs(s_logits, t_logits, temperature, teacher_temperature)
    return _kl(log_t, _mix(log_t, log_s, skew_lambda))


def skewed_reverse_kl(s_logits, t_logits, temperature=1.0, teacher_temperature=1.0, skew_lambda=0.1):
    """SRKL = Σ_v p_S (log p_S − log((1−λ) p_T + λ p_S)), λ = skew_lambda. N×V_s, N×V_t -> N."""
    _check_lambda(skew_lambda)
    log_s, log_t = log_probs(s_logits, t_logits, temperature, teacher_temperature)
    return _kl(log_s, _mix(log_s, log_t, skew_lambda))


def js(s_logits, t_logits, temperature=1.0, teacher_temperature=1.0):
    """JS = ½ KL(p_T‖m) + ½ KL(p_S‖m), m = (p_T + p_S)/2. N×V_s, N×V_t -> N."""
    log_s, log_t = log_probs(s_logits, t_logits, temperature, teacher_temperature)
    log_m = _mix(log_t, log_s, 0.5)
    return 0.5 * _kl(log_t, log_m) + 0.5 * _kl(log_s, log_m)


def gjsd(s_logits, t_logits, temperature=1.0, teacher_temperature=1.0, beta=0.5):
    """GKD's generalised JSD (Agarwal et al., 2024; TRL's ``generalized_jsd_loss``), β = beta:

        GJSD_β = β·KL(p_T‖m) + (1−β)·KL(p_S‖m),   m = β·p_T + (1−β)·p_S,

    with β = 0 the forward KL(p_T‖p_S) and β = 1 the reverse KL(p_S‖p_T), exactly (GKD's convention: the limits of
    the mixture form are 0). N×V_s, N×V_t -> N."""
    _check_beta(beta)
    log_s, log_t = log_probs(s_logits, t_logits, temperature, teacher_temperature)
    if beta == 0:
        return _kl(log_t, log_s)
    if beta == 1:
        return _kl(log_s, log_t)
    log_m = _mix(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")


def tvd(s_logits, t_logits, temperature=1.0, teacher_temperature=1.0):
    """TVD = ½ Σ_v |p_T − p_S|. N×V_s, N×V_t -> N."""
    log_s, log_t = log_probs(s_logits, t_logits, temperature, teacher_temperature)
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


@torch.no_grad()
def adaptive_kl_gaps(log_s: torch.Tensor, log_t: torch.Tensor, alpha: float = 0.5):
    """(g_head, g_tail), each N, detached. Sort p_T ascending; the tail is the tokens whose cumulative p_T
    is ≤ α, the head the rest; g = Σ |p_T − p_S| over each part."""
    p_t, p_s = log_t.exp(), log_s.exp()
    p_t_sorted, order = p_t.sort(dim=-1)
    gap = (p_t - p_s).abs().gather(-1, order)
    tail = p_t_sorted.cumsum(-1) <= alpha
    return (gap * ~tail).sum(-1), (gap * tail).sum(-1)


def adaptive_kl(s_logits, t_logits, temperature=1.0, teacher_temperature=1.0, adaptive_alpha=0.5):
    """AKL = (g_head·FKL + g_tail·RKL) / (g_head + g_tail), gaps from :func:`adaptive_kl_gaps` (detached,
    α = adaptive_alpha); ½(FKL + RKL) where p_T = p_S exactly. N×V_s, N×V_t -> N."""
    log_s, log_t = log_probs(s_logits, t_logits, temperature, teacher_temperature)
    g_head, g_tail = adaptive_kl_gaps(log_s, log_t, adaptive_alpha)
    total = g_head + g_tail
    tiny = torch.finfo(total.dtype).tiny
    w_head = torch.where(total > 0, g_head / total.clamp_min(tiny), torch.full_like(total, 0.5))
    return w_head * _kl(log_t, log_s) + (1 - w_head) * _kl(log_s, log_t)


def cross_entropy(s_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE = −log softmax(z^s)[y]. s_logits N×V, targets N (long, all valid) -> N."""
    log_s = torch.log_softmax(s_logits.to(_float(s_logits)), dim=-1)
    return -log_s.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skewed_forward_kl": skewed_forward_kl,
    "skewed_reverse_kl": skewed_reverse_kl,
    "js": js,
    "gjsd": gjsd,
    "tvd": tvd,
    "adaptive_kl": adaptive_kl,
}


def divergence_fn(
    name: str,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skew_lambda: float = 0.1,
    adaptive_alpha: float = 0.5,
    beta: float = 0.5,
) -> PerTokenDivergence:
    """The divergence ``name`` with its settings bound: per_token_fn(s_logits N×V_s, t_logits N×V_t) -> N."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCES)}")
    fn = DIVERGENCES[name]
    options = dict(
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        skew_lambda=skew_lambda,
        adaptive_alpha=adaptive_alpha,
        beta=beta,
    )
    accepted = inspect.signature(fn).parameters
    if "skew_lambda" in accepted:
        _check_lambda(skew_lambda)
    if "beta" in accepted:
        _check_beta(beta)
    if temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {temperature}, {teacher_temperature}")
    return partial(fn, **{k: v for k, v in options.items() if k in accepted})


def kd_divergence_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    name: str = "forward_kl",
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skew_lambda: float = 0.1,
    adaptive_alpha: float = 0.5,
    chunk_size: int = 1024,
    weights: torch.Tensor | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """Σ_{mask} w · D(p_T ‖ p_S) per token, chunked (see :func:`chunked_token_loss`).

    student_logits B×T×V_s (gets the gradient); teacher_logits B×T×V_t at the SAME positions (stop-grad);
    mask B×T bool; weights optional B×T. Returns a scalar sum (fp32).
    """
    fn = divergence_fn(name, temperature, teacher_temperature, skew_lambda, adaptive_alpha, beta)
    return chunked_token_loss(fn, student_logits, mask, teacher_logits, chunk_size=chunk_size, weights=weights)


def cross_entropy_sum(
    logits: Logits, labels: torch.Tensor, chunk_size: int = 1024, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_{labels ≠ −100} w · (−log softmax(logits)[label]), chunked. logits B×T×V (or the
    :class:`~prefkd.losses.chunked.HiddenRows` that give them); labels B×T (already shifted: labels[:, i] is the
    target of logits[:, i]). Returns a scalar sum (fp32)."""
    mask = labels.ne(IGNORE_INDEX)
    return chunked_token_loss(cross_entropy, logits, mask, labels, chunk_size=chunk_size, weights=weights)
