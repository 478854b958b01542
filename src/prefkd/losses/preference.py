"""The preference losses of docs/methods.md §10 as pure functions of sequence / parent log-probabilities.

Nothing here knows about models or the trainer; :mod:`prefkd.losses.dpo` wraps them as trainer losses, and
:mod:`prefkd.losses.logps` computes the log-probabilities. Shapes: B sequences (one response each), T positions, V
vocabulary, P parents. ``labels`` are already shifted (``labels[:, t]`` is the target of ``logits[:, t]``) and −100
where no loss is taken (prompt, padding), as everywhere in prefkd.

**Losses** (one value per pair, shape B; the trainer sums and normalises by the number of pairs):

    h          = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]   (dpo_margin)
    dpo        = −(1−ε)·log σ(βh) − ε·log σ(−βh)                                   (ε: cDPO label smoothing)
    ipo        = (h − 1/(2β))²
    tisdpo     = −log σ(β·(h_w − α·(KL_w − KL_l))),  h_w: token-weighted sums Σ_t w_t(log π_θ − log π_ref)
    kd_tisdpo  = −log σ(β·(M_w − M_l)),  M = Σ_p w_p (ℓ^S_p − ℓ^T_p)     (teacher = reference, β 0.5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefkd.losses.logps import weighted_sums


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

    The KL term follows docs/methods.md §10 ("logits = h − α(KL_w − KL_l)", β 0.1, α 0.5) and TIS-DPO's public code
    (``tisdpo_loss`` with ``token_level=True`` and ``_get_batch_logps_tisdpo``): the per-position KL is
    **KL(π_θ ‖ π_ref)** = Σ_v π_θ (log π_θ − log π_ref), it is weighted by the same token weights as the
    log-ratios, summed over the response, nothing in it is detached, and β multiplies the whole logit
    (loss = −logsigmoid(β·z)). (TDPO, which TIS-DPO's code derives from, uses KL(π_ref ‖ π_θ) with the
    opposite sign, z = h − α(KL_l − KL_w.detach()); that is not what TIS-DPO or docs/methods.md §10 use.)

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
    or None (all 1); mask_*: B×P bool of real parents or None. β 0.5 (docs/methods.md §10). With identical tokenizers
    (one parent per token) and all weights 1 it equals :func:`dpo_loss` with the teacher as reference. Returns B.
    """
    _check_beta(beta)
    m_w = kd_tisdpo_margin(student_chosen, teacher_chosen, weights_chosen, mask_chosen)
    m_l = kd_tisdpo_margin(student_rejected, teacher_rejected, weights_rejected, mask_rejected)
    return -F.logsigmoid(beta * (m_w - m_l))


@torch.no_grad()
def preference_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                       ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The docs/methods.md §10 metrics of a micro-batch, as detached 0-dim tensors holding **sums over the B pairs**
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
