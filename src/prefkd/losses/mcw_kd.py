"""MCW-KD, multi-cost Wasserstein KD (docs/methods.md §8): DSKD-CMA plus two optimal-transport terms between the
teacher's and the student's token clouds, each over a weighted combination of several costs in ONE transport problem.

    loss = w_ce·Σ_{M_s} CE + kd_rate·KD_CMA + λ_l·Σ_b n_b·OT_logits,b + λ_h·Σ_b n_b·OT_hidden,b

KD_CMA is DSKD-CMA's KD part (docs/methods.md §4: L_ce^{t→s} + L_kd^{stu} + L_kd^{tea}, see :class:`DSKDCMALoss`). n_b
is the number of student response tokens of example b. Normalisation: the trainer divides the returned sum by the
student response tokens of the global batch, so every CE/KD term is per token and each OT term is the n_b-weighted mean
of the per-sequence transport costs OT_b (the plain batch mean when all sequences have equal length), on the same
per-token scale as CE (as :class:`prefkd.losses.multilevel_ot.MultiLevelOTLoss`).

Points (per example). Student points i: response positions (labels ≠ −100); teacher points j: teacher response
positions; ``include_prompt=True`` takes every non-padding position (the released code's choice). Uniform marginals
over the valid points. Clouds are packed B×P (P = most points in the batch) with masks; padded points get no mass.

Logits branch (one plan over the costs of ``logits_costs``, weights α_l):
    p_i = softmax(topk(z^s_i, k)/τ_ot), q_j = softmax(topk(z^t_j, k)/τ_ot) (sorted top-k logits, k = ``top_k``)
    optional interpolation (``interpolate``, the released code's schedule): p_i = softmax((t·topk(z^s_i) +
    (1 − t)·topk(z^t_i))/τ_ot) INDEX-WISE — the i-th student point is mixed with the i-th teacher point of the same
    example (i < min(n_b, m_b); no alignment), t = t_0 + (1 − t_0)·min(1, step/T) rising from ``interpolate_start``
    t_0 to 1 over T = ``interpolate_steps`` optimizer steps (null: the whole run), the teacher part detached
    euclidean C[j,i] = ‖q_j − p_i‖₂;  kl C[j,i] = Σ_k q_j,k log(q_j,k/p_i,k);
    salience  C[j,i] = |σ(wᵀP_ot h^t_j + b) − σ(wᵀh^s_i + b)|  (w, b: the trainable ``salience`` layer)
Hidden branch (weights α_h), clouds {P_ot h^t_j} and {h^s_i} in R^{d_s} (P_ot: trainable Linear d_t → d_s):
    lexical C[j,i] = normalised edit distance of the predicted tokens (full matrix, precomputed by
    :class:`prefkd.align.lexical.LexicalCost`); context_euclidean ‖c^t_j − c^s_i‖₂/max; context_cosine
    1 − cos(c^t_j, c^s_i), with c the mean of the cloud over the window [i − w, i + w]; euclidean ‖P_ot h^t_j − h^s_i‖₂.

Each cost is scaled to a comparable range (``cost_scale``: its mean or max over the valid pairs of the example,
detached), C = Σ_k α_k Ĉ_k, and OT_b = ⟨P*(C), C⟩ with P* from :func:`prefkd.ot.sinkhorn` (ε = ``eps``, masks,
gradient ``sinkhorn_grad``: envelope by default). α per branch: :class:`prefkd.ot.AdaptiveCostWeights` (fixed,
adaptive from the running transport values ⟨P*, Ĉ_k⟩, or learned softmax(β)); its state is in the loss's
state_dict, so checkpoints keep it. ``transport=semidual`` (``loss=mcw_kd_dual``) solves the same terms through the
semi-dual instead (:class:`prefkd.ot.transport.SemiDualTransport`, α learned).

Structure. :class:`MCWKDLoss` is composed, not derived: ``dual_space`` (a :class:`DSKDCMALoss`, its projectors and
CE/KD terms), ``ot_logits`` and ``ot_hidden`` (two :class:`OTTerm`, each λ, its costs and its α), ``ot_projectors``
(P_ot and the salience layer, shared by both terms' clouds) and ``transport`` (:mod:`prefkd.ot.transport`, shared).

Memory. The student's top-k logits come out of DSKD-CMA's chunked pass (:class:`prefkd.losses.chunked.RowFeatures`),
so the loss still allocates one logits-sized gradient buffer; the teacher's top-k comes out of DSKD-CMA's teacher-side
pass, which projects those rows anyway (``dual_space_terms(teacher_rows=...)``), or, when the teacher points are not
its rows (``include_prompt``, ``teacher_space=False``), per chunk, no grad (:func:`~prefkd.losses.chunked.map_rows`).
The OT work is B×P×P (plus B×P×k and B×P×d clouds). Fused output heads (issue 17): both sides are read through
``logit_source``; with hidden states and heads, the student's rows and the teacher's are projected per chunk, and the
gradient buffer is B×T×H plus the head's V×H: no B×T×V tensor exists (see :mod:`prefkd.losses.dskd` for DSKD-CMA's own
work). The student's top-k are its logits themselves, so their gradient is sparse: the engine writes it from the
head's rows at the top-k indices (g·W[idx], gᵀh into W[idx]) without projecting the rows again.

``projector_warmup_steps`` and ``teacher_space`` are DSKD-CMA's (see :mod:`prefkd.losses.dskd`); during the warm-up
the OT terms are off too (the loss is DSKD-CMA's warm-up loss with ``ce_weight``), so P_ot and the salience layer
start learning when it ends.

Metrics (sums, normalised per token by the trainer like the loss): DSKD-CMA's, ``ot_logits``, ``ot_hidden``
(Σ_b n_b·OT_b), ``<branch>_<cost>`` (Σ_b n_b·mean raw cost over valid pairs), ``alpha_<branch>_<cost>``,
``iters_<branch>`` and ``marginal_err_<branch>`` (the last three are :attr:`LossOutput.means`: α, the Sinkhorn
iterations and the mean marginal error).
"""

from __future__ import annotations

import torch
from torch import nn

from prefkd.losses.base import DistillationLoss, LossInputs, LossOutput, Needs, response_mask
from prefkd.losses.chunked import RowFeatures, map_rows
from prefkd.losses.dskd import DSKDCMALoss, teacher_rows_per_chunk
from prefkd.losses.projectors import ensure_projectors, fp32_region, hidden_size
from prefkd.ot import (
    AdaptiveCostWeights,
    context_cosine_cost,
    context_euclidean_cost,
    context_vectors,
    euclidean_cost,
    kl_cost,
    pair_mask,
    salience_cost,
    scale_cost,
)
from prefkd.ot.transport import SemiDualTransport, SinkhornTransport

LOGITS_COSTS = ("euclidean", "kl", "salience")
HIDDEN_COSTS = ("lexical", "context_euclidean", "context_cosine", "euclidean")


def pack_rows(values: torch.Tensor, rows: torch.Tensor, slot: torch.Tensor, bsz: int, width: int) -> torch.Tensor:
    """N×… rows (point order: grouped by example) → B×P×… zero-padded clouds (differentiable)."""
    return values.new_zeros(bsz, width, *values.shape[1:]).index_put((rows, slot), values)


class Clouds:
    """Point positions of one side: ``mask`` B×T; ``rows``, ``cols`` (N), ``slot`` (N, index within the example),
    ``valid`` B×P, ``width`` P."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self.rows, self.cols = mask.nonzero(as_tuple=True)
        self.slot = mask.long().cumsum(1)[self.rows, self.cols] - 1
        counts = mask.sum(1)
        self.width = int(counts.max()) if counts.numel() else 0
        self.valid = torch.arange(self.width, device=mask.device)[None, :] < counts[:, None]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """B×T×d → B×P×d (the points of each example, in order)."""
        return pack_rows(x[self.rows, self.cols], self.rows, self.slot, self.mask.shape[0], self.width)

    def pack_rows(self, values: torch.Tensor) -> torch.Tensor:
        return pack_rows(values, self.rows, self.slot, self.mask.shape[0], self.width)


def _check_costs(names, allowed, branch) -> tuple[str, ...]:
    names = tuple(names)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{branch}_costs={list(names)}: each must be one of {', '.join(allowed)} (at least one)")
    return names


class OTTerm(nn.Module):
    """One branch's OT term, λ·Σ_b n_b·OT_b: its costs Ĉ_k (each scaled by ``cost_scale``) in one transport problem
    per example with weights α (``weights``, an :class:`AdaptiveCostWeights`), solved by the loss's transport.

    Returns (the term, metrics as sums: ``ot_<branch>`` = Σ_b n_b·OT_b and ``<branch>_<cost>`` = Σ_b n_b·mean raw cost
    over the valid pairs, means: ``alpha_<branch>_<cost>`` and the transport's diagnostics ``<name>_<branch>``)."""

    def __init__(self, branch: str, costs: tuple[str, ...], weight: float, alpha, *, alpha_mode: str, sigma: float,
                 alpha_min: float, update_interval: int, cost_scale: str | None):
        super().__init__()
        if alpha is not None and len(alpha) != len(costs):
            raise ValueError(f"{branch}_alpha has {len(alpha)} weights for {len(costs)} costs {list(costs)}: give "
                             "one weight per cost (or null for uniform)")
        self.branch, self.costs, self.weight, self.cost_scale = branch, costs, weight, cost_scale
        self.weights = AdaptiveCostWeights(len(costs), mode=alpha_mode, alpha=alpha, sigma=sigma, alpha_min=alpha_min,
                                           update_interval=update_interval)

    @property
    def active(self) -> bool:
        return self.weight != 0

    def forward(self, points: torch.Tensor, costs: list[torch.Tensor], valid_t: torch.Tensor, valid_s: torch.Tensor,
                pairs: torch.Tensor, n_b: torch.Tensor, transport: nn.Module) -> tuple[torch.Tensor, dict, dict]:
        """``points`` B×m×p (the teacher cloud), ``costs`` [C_k B×m×n], ``valid_t`` B×m, ``valid_s`` B×n, ``pairs``
        B×m×n, ``n_b`` (B) student response tokens per example."""
        branch = self.branch
        scaled = [scale_cost(c, pairs, self.cost_scale) for c in costs]
        ot_b, diagnostics = transport(branch, points, scaled, self.weights, valid_t, valid_s, pairs)
        weighted = (n_b * ot_b).sum()
        metrics, means = {f"ot_{branch}": weighted.detach()}, {}
        count = pairs.sum((1, 2)).clamp_min(1)
        for name, cost, a in zip(self.costs, costs, self.weights().detach()):
            metrics[f"{branch}_{name}"] = (n_b * (torch.where(pairs, cost.detach(), 0).sum((1, 2)) / count)).sum()
            means[f"alpha_{branch}_{name}"] = a
        means |= {f"{name}_{branch}": value for name, value in diagnostics.items()}
        return self.weight * weighted, metrics, means

    def on_optimizer_step(self, step: int) -> None:
        self.weights.on_optimizer_step(step)


TRANSPORTS = ("sinkhorn", "semidual")
RENAMED = (("projectors.", "dual_space.projectors."), ("cost_weights.logits.", "ot_logits.weights."),
           ("cost_weights.hidden.", "ot_hidden.weights."), ("potentials.", "transport.potentials."))


class MCWKDLoss(DistillationLoss):
    """MCW-KD (module docstring): a DSKD-CMA term (``dual_space``, a :class:`DSKDCMALoss` with ``ce_weight``) plus two
    :class:`OTTerm` (``ot_logits``, ``ot_hidden``) over the clouds, solved by ``transport``: ``sinkhorn``
    (:class:`SinkhornTransport`, the paper's) or ``semidual`` (:class:`SemiDualTransport`, α learned by default; see
    :func:`MCWKDDualLoss`). Every number of docs/methods.md §8 is an argument (config/loss/mcw_kd.yaml comments each).
    """

    needs = Needs(teacher=True, hidden_states=True)
    fused_head = True  # both sides through logit_source (DSKD-CMA's pass and the teacher's top-k, per chunk)
    name = "mcw_kd"

    def __init__(self, ce_weight: float = 1.0, kd_rate: float = 0.5, divergence: str = "forward_kl",
                 temperature: float = 1.0, teacher_temperature: float = 1.0, skew_lambda: float = 0.1,
                 adaptive_alpha: float = 0.5, lambda_logits: float = 1.0, lambda_hidden: float = 1.0,
                 top_k: int = 400, ot_temperature: float = 2.0, window: int = 4, include_prompt: bool = False,
                 logits_costs=LOGITS_COSTS, logits_alpha=(0.2, 0.5, 0.3),
                 hidden_costs=("lexical", "context_euclidean", "context_cosine"), hidden_alpha=(0.3, 0.5, 0.2),
                 alpha_mode: str = "fixed", sigma: float = 2.0, alpha_min: float = 0.01, update_interval: int = 100,
                 cost_scale: str | None = "mean", eps: float = 0.1, max_iter: int = 1000, tol: float = 1e-6,
                 sinkhorn_grad: str = "envelope", pretrain_projectors: bool = False, chunk_size: int = 1024,
                 interpolate: bool = False, interpolate_start: float = 0.1, interpolate_steps: int | None = None,
                 projector_warmup_steps: int = 0, teacher_space: bool = True, transport: str = "sinkhorn",
                 potential_hidden: int = 64, potential_bound: float = 10.0, inner_steps: int = 5,
                 inner_lr: float = 1e-2, beta: float = 0.5, teacher_chunk_size: int | None = None):
        super().__init__()
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r}: choose one of {list(TRANSPORTS)}")
        if top_k < 1 or ot_temperature <= 0 or window < 0 or eps <= 0:
            raise ValueError(f"need top_k >= 1, ot_temperature > 0, window >= 0, eps > 0; got {top_k}, "
                             f"{ot_temperature}, {window}, {eps}")
        if not 0 <= interpolate_start <= 1 or (interpolate_steps is not None and interpolate_steps < 1):
            raise ValueError(f"need 0 <= interpolate_start <= 1 and interpolate_steps >= 1 (or null); got "
                             f"{interpolate_start}, {interpolate_steps}")
        if transport == "semidual":
            if alpha_mode == "adaptive":
                raise ValueError("loss=mcw_kd_dual (transport=semidual): alpha_mode=adaptive needs Sinkhorn's plan; "
                                 "use learned or fixed")
            self.name = "mcw_kd_dual"
        self.dual_space = DSKDCMALoss(divergence, kd_rate, temperature, teacher_temperature, skew_lambda,
                                      adaptive_alpha, pretrain_projectors, chunk_size, projector_warmup_steps,
                                      teacher_space, beta, teacher_chunk_size)
        self.dual_space.name = self.name  # its errors name this loss
        self.ce_weight, self.top_k, self.ot_temperature = ce_weight, int(top_k), ot_temperature
        self.window, self.include_prompt, self.chunk_size = int(window), bool(include_prompt), chunk_size
        self.interpolate, self.interpolate_start, self.interpolate_steps = bool(interpolate), interpolate_start, \
            interpolate_steps
        shared = dict(alpha_mode=alpha_mode, sigma=sigma, alpha_min=alpha_min, update_interval=update_interval,
                      cost_scale=cost_scale)
        self.ot_logits = OTTerm("logits", _check_costs(logits_costs, LOGITS_COSTS, "logits"), lambda_logits,
                                logits_alpha, **shared)
        self.ot_hidden = OTTerm("hidden", _check_costs(hidden_costs, HIDDEN_COSTS, "hidden"), lambda_hidden,
                                hidden_alpha, **shared)
        self.ot_projectors = nn.ModuleDict()  # hidden: P_ot (d_t → d_s), salience: w, b (d_s → 1); from build()
        self.transport = (SinkhornTransport(eps, max_iter, tol, sinkhorn_grad) if transport == "sinkhorn" else
                          SemiDualTransport(eps, potential_hidden, potential_bound, inner_steps, inner_lr))
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    # ------------------------------------------------------------------------------------------ life cycle
    @property
    def terms(self) -> tuple[OTTerm, OTTerm]:
        return self.ot_logits, self.ot_hidden

    def setup(self, student_tokenizer, teacher_tokenizer) -> None:
        """Install the lexical-cost precompute hook when the hidden branch uses it."""
        if self.ot_hidden.active and "lexical" in self.ot_hidden.costs:
            if teacher_tokenizer is None:
                raise ValueError(f"loss={self.name} needs a teacher tokenizer (pick a teacher, not teacher=none)")
            from prefkd.align.lexical import LexicalCost

            self.precompute = LexicalCost(teacher_tokenizer, student_tokenizer, self.include_prompt)
            self.precompute_version = self.precompute.version

    def build(self, student_model: nn.Module, teacher_model: nn.Module | None) -> None:
        """DSKD-CMA's projectors, P_ot and the salience layer, and the transport's own modules (idempotent)."""
        self.dual_space.build(student_model, teacher_model)
        d_s, d_t = hidden_size(student_model), hidden_size(teacher_model)
        ensure_projectors(self.ot_projectors, {"hidden": (d_t, d_s), "salience": (d_s, 1)}, student_model,
                          f"loss={self.name}: OT projectors")
        k = min(self.top_k, student_model.get_output_embeddings().weight.shape[0],
                teacher_model.get_output_embeddings().weight.shape[0])
        device = student_model.get_output_embeddings().weight.device
        self.transport.build({t.branch: {"logits": k, "hidden": d_s}[t.branch] for t in self.terms if t.active},
                             None if device.type == "meta" else device)

    def trainable_modules(self) -> list[nn.Module]:
        """Projectors (DSKD-CMA's, P_ot, salience) and β; never the transport's potentials (they are maximised by
        their own inner steps)."""
        return [m for name, m in self.named_children()
                if name != "transport" and any(p.requires_grad for p in m.parameters())]

    def on_optimizer_step(self, step: int) -> None:
        for term in self.terms:
            term.on_optimizer_step(step)

    def interpolation_weight(self, step: int, total_steps: int | None) -> float:
        """t of the index-wise interpolation at ``step`` (1.0 = the student's own points, also when it is off)."""
        if not self.interpolate:
            return 1.0
        span = self.interpolate_steps or total_steps
        if not span:
            return 1.0  # outside training (no schedule): the student's own distributions
        return self.interpolate_start + (1 - self.interpolate_start) * min(1.0, step / span)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, inputs: LossInputs) -> LossOutput:
        """DSKD-CMA's terms (with the student's top-k logits from the same chunked pass), then the two OT terms."""
        self.dual_space.check_inputs(inputs)
        batch, student, teacher = inputs.batch, inputs.student, inputs.teacher
        labels = batch["labels"]
        t_pts, s_pts = self.clouds(batch)
        k = min(self.top_k, student.logit_source.shape[-1], teacher.logit_source.shape[-1])
        dual_only = self.dual_space.pretrain_projectors or self.dual_space.warming_up(inputs)  # no OT terms
        features = None
        if self.ot_logits.active and not dual_only:
            features = RowFeatures(s_pts.rows * labels.shape[1] + s_pts.cols,
                                   select=lambda r: r.topk(k, dim=-1).indices)  # value: the logits themselves
        # the teacher's sorted top-k logits, taken in DSKD-CMA's teacher-side pass when its rows are the teacher points
        top_k = (lambda r: r.float().topk(k, dim=-1).values) if features is not None and not self.include_prompt \
            else None
        loss, metrics, top_s, top_t = self.dual_space.dual_space_terms(inputs, features, ce_weight=self.ce_weight,
                                                                       teacher_rows=top_k)
        if dual_only:
            return LossOutput(loss=loss, metrics=metrics)

        n_b = response_mask(labels).sum(1).to(loss.dtype)  # student response tokens per example
        means: dict[str, torch.Tensor] = {}  # per-batch values (LossOutput.means), not sums
        with fp32_region(loss.device):
            x_t = self.ot_projectors["hidden"](t_pts.pack(teacher.hidden.detach()).float())  # B×m×d_s
            x_s = s_pts.pack(student.hidden).float()  # B×n×d_s
            inputs_of = {}
            if self.ot_logits.active:
                mix = self.interpolation_weight(inputs.step, inputs.total_steps)
                if top_t is None:
                    top_t = self.teacher_top_k(teacher, t_pts, k, student.logit_source.shape[-1])
                inputs_of["logits"] = self.logits_costs(top_s, top_t, t_pts, s_pts, x_t, x_s, mix)
                if self.interpolate:
                    means["interpolation_t"] = torch.as_tensor(mix)
            if self.ot_hidden.active:
                inputs_of["hidden"] = self.hidden_costs(batch, t_pts, s_pts, x_t, x_s)
            pairs = pair_mask(t_pts.valid, s_pts.valid)  # B×m×n valid (j, i), the same for both terms
            for term in self.terms:
                if term.branch in inputs_of:
                    points, costs = inputs_of[term.branch]
                    value, term_metrics, term_means = term(points, costs, t_pts.valid, s_pts.valid, pairs, n_b,
                                                           self.transport)
                    loss = loss + value
                    metrics |= term_metrics
                    means |= term_means
        metrics = {key: torch.as_tensor(v, dtype=loss.dtype, device=loss.device).detach() for key, v in metrics.items()}
        means = {key: torch.as_tensor(v, dtype=loss.dtype, device=loss.device).detach() for key, v in means.items()}
        return LossOutput(loss=loss, metrics=metrics, means=means)

    def clouds(self, batch: dict) -> tuple[Clouds, Clouds]:
        """(teacher points, student points): the response positions, or every non-padding one (``include_prompt``)."""
        if self.include_prompt:
            t_mask = batch["teacher_attention_mask"].to(batch["teacher_labels"].device)
            return Clouds(t_mask.bool()), Clouds(batch["attention_mask"].bool())
        return Clouds(response_mask(batch["teacher_labels"])), Clouds(response_mask(batch["labels"]))

    def teacher_top_k(self, teacher, t_pts: Clouds, k: int, student_vocab: int) -> torch.Tensor:
        """The teacher points' sorted top-k logits (N_t×k), per chunk of ``chunk_size`` student-vocabulary rows'
        worth, no grad (when DSKD-CMA's teacher-side pass did not take them: ``include_prompt``, no teacher space)."""
        source = teacher.logit_source
        index = t_pts.rows * source.shape[1] + t_pts.cols
        chunk = self.dual_space.teacher_chunk_size or teacher_rows_per_chunk(
            self.chunk_size, teacher.model.get_output_embeddings().weight.shape, student_vocab)
        return map_rows(source, index, lambda r: r.float().topk(k, dim=-1).values, chunk)

    def logits_costs(self, top_s, top_t, t_pts: Clouds, s_pts: Clouds, x_t, x_s, mix: float = 1.0):
        """(teacher points q B×m×k, [cost B×m×n per name]) of the logits branch from both sides' sorted top-k logits
        (N_s×k, N_t×k); ``mix`` < 1 interpolates the student's index-wise towards the teacher's (module docstring)."""
        sorted_t, sorted_s = t_pts.pack_rows(top_t), s_pts.pack_rows(top_s.float())
        if mix < 1.0:
            width = min(sorted_t.shape[1], sorted_s.shape[1])
            both = (s_pts.valid[:, :width] & t_pts.valid[:, :width])[..., None]
            mixed = mix * sorted_s[:, :width] + (1 - mix) * sorted_t[:, :width]
            sorted_s = torch.cat([torch.where(both, mixed, sorted_s[:, :width]), sorted_s[:, width:]], 1)
        log_q = torch.log_softmax(sorted_t / self.ot_temperature, -1)
        log_p = torch.log_softmax(sorted_s / self.ot_temperature, -1)
        costs = []
        for name in self.ot_logits.costs:
            if name == "euclidean":
                costs.append(euclidean_cost(log_q.exp(), log_p.exp()))
            elif name == "kl":
                costs.append(kl_cost(log_q, log_p, log_input=True))
            else:  # salience: one linear layer on the (projected) hidden states
                sal = self.ot_projectors["salience"]
                costs.append(salience_cost(torch.sigmoid(sal(x_t)).squeeze(-1), torch.sigmoid(sal(x_s)).squeeze(-1)))
        return log_q.exp(), costs

    def hidden_costs(self, batch, t_pts: Clouds, s_pts: Clouds, x_t, x_s):
        """(teacher points P_ot h^t B×m×d_s, [cost B×m×n per name]) of the hidden-state branch."""
        costs = []
        c_t = c_s = None
        if {"context_euclidean", "context_cosine"} & set(self.ot_hidden.costs):
            c_t, c_s = context_vectors(x_t, t_pts.valid, self.window), context_vectors(x_s, s_pts.valid, self.window)
        for name in self.ot_hidden.costs:
            if name == "lexical":
                costs.append(self.lexical(batch, t_pts, s_pts))
            elif name == "context_euclidean":
                costs.append(context_euclidean_cost(c_t, c_s, t_pts.valid, s_pts.valid))
            elif name == "context_cosine":
                costs.append(context_cosine_cost(c_t, c_s))
            else:
                costs.append(euclidean_cost(x_t, x_s))
        return x_t, costs

    def lexical(self, batch, t_pts: Clouds, s_pts: Clouds) -> torch.Tensor:
        lex = batch.get("lex_cost")
        shape = (t_pts.mask.shape[0], t_pts.width, s_pts.width)
        if lex is None:
            raise ValueError(f"loss={self.name}: the batch has no 'lex_cost' (the lexical cost): build the dataset "
                             "with precompute=loss.precompute after loss.setup(...), or drop 'lexical' from "
                             "hidden_costs")
        if tuple(lex.shape) != shape:
            raise ValueError(f"loss={self.name}: lex_cost has shape {tuple(lex.shape)}, the clouds need {shape} "
                             "(teacher points × student points): was the dataset cache built with another "
                             "include_prompt?")
        return lex.to(t_pts.valid.device, torch.float32)


def _rename_old_keys(module, state_dict, prefix, *args) -> None:
    """Load hook: a state dict saved before MCW-KD was composed of terms (keys ``projectors.*``, ``cost_weights.*``,
    ``potentials.*``) loads into today's layout."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in RENAMED:
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


def MCWKDDualLoss(**kwargs) -> MCWKDLoss:  # noqa: N802 - the `_target_` of config/loss/mcw_kd_dual.yaml since v0
    """MCW-KD with the semi-dual transport (docs/methods.md §8): ``MCWKDLoss(transport="semidual")``, α learned
    (softmax(β)) unless ``alpha_mode`` says otherwise; ``adaptive`` is refused (it needs Sinkhorn's plan)."""
    return MCWKDLoss(**{"alpha_mode": "learned", **kwargs, "transport": "semidual"})
