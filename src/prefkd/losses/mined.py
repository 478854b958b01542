"""MinED: minimum-edit-distance alignment + KD in the student's vocabulary (docs/methods.md §6, FuseLLM / DSKD
``minedit``).

The alignment is data: :class:`~prefkd.align.mined.MinEDAligner` (the precompute hook that :meth:`MinEDLoss.setup`
installs) gives each student position j ``mined_teacher_index[b, j] = i``, the teacher sequence position whose
logits z^t[b, i] predict the token aligned with the student's target ``labels[b, j]``, or −100.

Target logits in the student vocabulary (V_s rows of the student model), per student response position j:

- aligned (index i ≥ 0): z̃[v] = z^t[b, i, s2t[v]] if s2t[v] ≥ 0, else −inf, with s2t the student → teacher map
  that keeps ONE teacher id per student id, the lowest (:func:`prefkd.align.vocab_map.invert_map`). This gather is
  docs/methods.md §6's "gathered at mapped ids and scattered into the student vocabulary" with that inversion:
  scattering z^t[s2t[v]] to v for every mapped v writes the same tensor. ``merge="max"`` instead keeps, for each student
  id, the largest logit among ALL teacher ids mapping to it (a scatter-amax over t2s: FuseLLM's loop over the teacher's
  top-k in descending order, keeping the first hit per student id). The two agree when t2s is injective.
- ``top_k = K`` (FuseLLM keeps 10): before mapping, the teacher logits outside the teacher's top K are −inf. An
  aligned row that keeps no finite logit after mapping falls back to the one-hot target (not counted as aligned).
- unaligned (−100): a one-hot target on the gold token, z̃[labels[j]] = 0, −inf elsewhere.

Maps are resized to the models (``map_to_tensor(..., size)``): the teacher model may have more rows than its
tokenizer (Qwen1.5: 151,936 vs 151,646), the student model too; ids beyond a model's rows are unmapped.

    KD = Σ_{M_s} D(softmax(z̃/τ) ‖ softmax(z^s/τ)),  D forward KL by default (any of ``DIVERGENCES``),
    total = (1 − kd_rate)·Σ_{M_s} CE + kd_rate·KD.

−inf target logits follow :mod:`prefkd.losses.divergences` (log-probabilities floored at −1e5: no NaN; the
reverse directions then charge student mass off the target's support at ≈1e5 per unit, like DSKD's −1e5 logits).
z̃ is built per chunk inside the chunked per-token function (one chunk of n×V_t + n×V_s fp32 at a time). Fused
output heads (issue 17): either side may come as hidden states and head (``logit_source``); the teacher's hidden
states are then gathered at the aligned positions (B×n×H_t) and projected per chunk
(:class:`~prefkd.losses.chunked.PartnerRows`), so neither side's logits are built.
Metrics (sums): ``ce``, ``kd``, ``aligned`` (positions with a teacher target; the trainer's division by the
response tokens turns it into the alignment rate).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from prefkd.align.mined import FIELD, MinEDAligner
from prefkd.align.vocab_map import load_vocab_map, map_to_tensor
from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, Needs, require_teacher, response_mask
from prefkd.losses.chunked import PartnerRows, chunked_token_loss
from prefkd.losses.divergences import cross_entropy, divergence_fn

MERGES = ("lowest", "max")


def student_space_logits(t_rows: torch.Tensor, s2t: torch.Tensor | None = None, t2s: torch.Tensor | None = None,
                         v_s: int | None = None, top_k: int | None = None) -> torch.Tensor:
    """Teacher logits N×V_t → N×V_s in the student's vocabulary, −inf at unmapped student ids.

    Gather (``s2t``, V_s long, −1 = unmapped): out[:, v] = t[:, s2t[v]]. Scatter-amax (``t2s``, V_t long, −1 =
    unmapped; needs ``v_s``): out[:, u] = max_{v: t2s[v] = u} t[:, v]. ``top_k``: keep only each row's K largest
    teacher logits first. Works in the rows' dtype (fp32 at least).
    """
    t = t_rows.detach().to(torch.promote_types(t_rows.dtype, torch.float32))
    if top_k is not None and top_k < t.shape[-1]:
        vals, ids = t.topk(top_k, dim=-1)
        t = torch.full_like(t, -math.inf).scatter(-1, ids, vals)
    if s2t is not None:
        out = t[:, s2t.clamp_min(0)]
        return out.masked_fill(s2t.lt(0), -math.inf)
    if t2s is None or v_s is None:
        raise ValueError("student_space_logits needs s2t, or t2s and v_s")
    keep = t2s.ge(0)
    out = torch.full((t.shape[0], v_s), -math.inf, dtype=t.dtype, device=t.device)
    index = t2s[keep].unsqueeze(0).expand(t.shape[0], -1)
    return out.scatter_reduce(-1, index, t[:, keep], reduce="amax", include_self=True)


class MinEDLoss(DistillationLoss):
    """MinED KD (docs/methods.md §6) between any two tokenizers; sums over the student's response tokens.

    kd_rate, temperature (τ = 2 in docs/methods.md §6), divergence (a name of ``DIVERGENCES``; teacher_temperature,
    skew_lambda, adaptive_alpha are its settings), top_k (None = all teacher logits), merge ("lowest" = docs/methods.md
    §6's one teacher id per student id; "max"), vocab_map (None = built and cached by ``load_or_build_vocab_map``; or a
    ``{teacher_id: student_id}`` JSON file such as a published map), chunk_size (tokens per chunk).
    """

    needs = Needs(teacher=True)
    fused_head = True  # both sides through logit_source; the aligned teacher rows are projected per chunk

    def __init__(self, kd_rate: float = 0.5, temperature: float = 2.0, divergence: str = "forward_kl",
                 top_k: int | None = None, chunk_size: int = 1024, merge: str = "lowest",
                 vocab_map: str | None = None, teacher_temperature: float = 1.0, skew_lambda: float = 0.1,
                 adaptive_alpha: float = 0.5, beta: float = 0.5):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"merge={merge!r}: valid values are {', '.join(MERGES)}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive number of teacher logits or None, got {top_k}")
        self.kd_rate, self.top_k, self.chunk_size, self.merge = kd_rate, top_k, chunk_size, merge
        self.vocab_map = vocab_map
        self.divergence = divergence
        self._divergence = divergence_fn(divergence, temperature, teacher_temperature, skew_lambda,
                                         adaptive_alpha, beta)
        self.aligner: MinEDAligner | None = None
        self._maps: dict[tuple, torch.Tensor] = {}

    def setup(self, student_tokenizer, teacher_tokenizer) -> None:
        """Build the :class:`MinEDAligner` (vocabulary map from ``vocab_map`` or the on-disk cache) and install it
        as the precompute hook."""
        if teacher_tokenizer is None:
            raise ValueError("loss=minedit needs a teacher tokenizer (pick a teacher, not teacher=none)")
        mapping = load_vocab_map(Path(self.vocab_map).expanduser()) if self.vocab_map else None
        self.use_aligner(MinEDAligner(teacher_tokenizer, student_tokenizer, vocab_map=mapping, top_k=self.top_k))

    def use_aligner(self, aligner: MinEDAligner) -> None:
        """Use a ready aligner (e.g. one built on a partial vocabulary map): sets ``precompute`` and its version."""
        self.aligner = aligner
        self.precompute = aligner
        self.precompute_version = aligner.version
        self._maps.clear()

    def _map(self, v_s: int, v_t: int, device: torch.device) -> torch.Tensor:
        """s2t (V_s) for merge "lowest", t2s (V_t) for "max", resized to the models and cached per device."""
        key = (self.merge, v_s, v_t, str(device))
        if key not in self._maps:
            if self.merge == "lowest":
                ids = map_to_tensor(self.aligner.s2t, v_s)
                ids[ids >= v_t] = -1  # a teacher id beyond the teacher model's rows
            else:
                ids = map_to_tensor(self.aligner.t2s, v_t)
                ids[ids >= v_s] = -1
            self._maps[key] = ids.to(device)
        return self._maps[key]

    def forward(self, inputs: LossInputs) -> LossOutput:
        batch, student = inputs.batch, inputs.student
        teacher = require_teacher(inputs, "minedit")
        if self.aligner is None:
            raise ValueError("MinEDLoss.setup(student_tokenizer, teacher_tokenizer) must run before the loss "
                             "(it builds the vocabulary map and the alignment hook)")
        if FIELD not in batch:
            raise ValueError(f"the batch has no {FIELD!r}: build the dataset with precompute=loss.precompute")
        labels = batch["labels"]
        index = batch[FIELD].to(labels.device)
        if index.shape != labels.shape:
            raise ValueError(f"{FIELD} {tuple(index.shape)} must have the shape of labels {tuple(labels.shape)}")
        s_source, t_source = student.logit_source, teacher.logit_source
        b, m, v_t = t_source.shape
        v_s = s_source.shape[-1]
        flat = torch.where(index.ge(0), index + torch.arange(b, device=index.device).unsqueeze(1) * m, -1)
        partners = PartnerRows(t_source, flat)  # aligned teacher rows, gathered (or projected) per chunk
        vocab = self._map(v_s, v_t, s_source.device)
        gather = self.merge == "lowest"
        rate, top_k = self.kd_rate, self.top_k

        def per_token(s: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, *projected: torch.Tensor):
            target = torch.full_like(s, -math.inf).detach()
            sel = idx.ge(0)
            if sel.any():
                rows = partners.rows(idx, sel, projected)
                z = (student_space_logits(rows, s2t=vocab, top_k=top_k) if gather
                     else student_space_logits(rows, t2s=vocab, v_s=v_s, top_k=top_k)).to(s.dtype)
                ok = torch.isfinite(z).any(-1)  # nothing mapped (possible with top_k): one-hot instead
                where = sel.nonzero().squeeze(1)[ok]
                target[where] = z[ok]
                sel = torch.zeros_like(sel).index_fill_(0, where, True)
            gold = (~sel).nonzero().squeeze(1)
            target[gold, y[gold]] = 0.0
            ce, kd = cross_entropy(s, y), self._divergence(s, target)
            return (1 - rate) * ce + rate * kd, {"ce": ce, "kd": kd, "aligned": sel}

        loss, metrics = chunked_token_loss(per_token, s_source, response_mask(labels), labels, flat,
                                           *partners.others(), chunk_size=self.chunk_size,
                                           terms=("ce", "kd", "aligned"))
        return LossOutput(loss=loss, metrics=metrics)
