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
state_dict, so checkpoints keep it.

Memory. The student's top-k logits come out of DSKD-CMA's chunked pass (:class:`prefkd.losses.chunked.RowFeatures`),
so the loss still allocates one logits-sized gradient buffer; the teacher's top-k is taken per chunk under no_grad.
The OT work is B×P×P (plus B×P×k and B×P×d clouds).

``projector_warmup_steps`` and ``teacher_space`` are DSKD-CMA's (see :mod:`prefkd.losses.dskd`); during the warm-up
the OT terms are off too (the loss is DSKD-CMA's warm-up loss with ``ce_weight``), so P_ot and the salience layer
start learning when it ends.

Metrics (sums, normalised per token by the trainer like the loss): DSKD-CMA's, ``ot_logits``, ``ot_hidden``
(Σ_b n_b·OT_b), ``<branch>_<cost>`` (Σ_b n_b·mean raw cost over valid pairs), ``alpha_<branch>_<cost>``,
``iters_<branch>`` and ``marginal_err_<branch>`` (scaled by the micro-batch's token count so that the trainer's
division returns α, the Sinkhorn iterations and the mean marginal error).
"""

from __future__ import annotations

import torch
from torch import nn

from prefkd.losses.base import LossInputs, LossOutput, response_mask
from prefkd.losses.chunked import RowFeatures
from prefkd.losses.dskd import DSKDCMALoss
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
    sinkhorn,
)

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


class MCWKDLoss(DSKDCMALoss):
    """MCW-KD (module docstring). Every number of docs/methods.md §8 is an argument (config/loss/mcw_kd.yaml comments
    each)."""

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
                 projector_warmup_steps: int = 0, teacher_space: bool = True):
        super().__init__(divergence, kd_rate, temperature, teacher_temperature, skew_lambda, adaptive_alpha,
                         pretrain_projectors, chunk_size, projector_warmup_steps, teacher_space)
        if top_k < 1 or ot_temperature <= 0 or window < 0 or eps <= 0:
            raise ValueError(f"need top_k >= 1, ot_temperature > 0, window >= 0, eps > 0; got {top_k}, "
                             f"{ot_temperature}, {window}, {eps}")
        if not 0 <= interpolate_start <= 1 or (interpolate_steps is not None and interpolate_steps < 1):
            raise ValueError(f"need 0 <= interpolate_start <= 1 and interpolate_steps >= 1 (or null); got "
                             f"{interpolate_start}, {interpolate_steps}")
        if sinkhorn_grad not in ("envelope", "unrolled"):
            raise ValueError(f"sinkhorn_grad must be 'envelope' or 'unrolled', got {sinkhorn_grad!r}")
        self.ce_weight, self.lambda_logits, self.lambda_hidden = ce_weight, lambda_logits, lambda_hidden
        self.top_k, self.ot_temperature, self.window = int(top_k), ot_temperature, int(window)
        self.include_prompt, self.cost_scale = bool(include_prompt), cost_scale
        self.eps, self.max_iter, self.tol, self.sinkhorn_grad = eps, int(max_iter), tol, sinkhorn_grad
        self.interpolate, self.interpolate_start, self.interpolate_steps = bool(interpolate), interpolate_start, \
            interpolate_steps
        self.costs = {"logits": _check_costs(logits_costs, LOGITS_COSTS, "logits"),
                      "hidden": _check_costs(hidden_costs, HIDDEN_COSTS, "hidden")}
        alphas = {"logits": logits_alpha, "hidden": hidden_alpha}
        for branch, names in self.costs.items():
            if alphas[branch] is not None and len(alphas[branch]) != len(names):
                raise ValueError(f"{branch}_alpha has {len(alphas[branch])} weights for {len(names)} costs "
                                 f"{list(names)}: give one weight per cost (or null for uniform)")
        self.cost_weights = nn.ModuleDict({
            branch: AdaptiveCostWeights(len(names), mode=alpha_mode, alpha=alphas[branch], sigma=sigma,
                                        alpha_min=alpha_min, update_interval=update_interval)
            for branch, names in self.costs.items()})
        self.ot_projectors = nn.ModuleDict()  # hidden: P_ot (d_t → d_s), salience: w, b (d_s → 1); from build()

    # ------------------------------------------------------------------------------------------ life cycle
    def active(self, branch: str) -> bool:
        return (self.lambda_logits if branch == "logits" else self.lambda_hidden) != 0

    def setup(self, student_tokenizer, teacher_tokenizer) -> None:
        """Install the lexical-cost precompute hook when the hidden branch uses it."""
        if self.active("hidden") and "lexical" in self.costs["hidden"]:
            if teacher_tokenizer is None:
                raise ValueError(f"loss={self.name} needs a teacher tokenizer (pick a teacher, not teacher=none)")
            from prefkd.align.lexical import LexicalCost

            self.precompute = LexicalCost(teacher_tokenizer, student_tokenizer, self.include_prompt)
            self.precompute_version = self.precompute.version

    def build(self, student_model: nn.Module, teacher_model: nn.Module | None) -> None:
        super().build(student_model, teacher_model)
        d_s, d_t = hidden_size(student_model), hidden_size(teacher_model)
        ensure_projectors(self.ot_projectors, {"hidden": (d_t, d_s), "salience": (d_s, 1)}, student_model,
                          f"loss={self.name}: OT projectors")

    def on_optimizer_step(self, step: int) -> None:
        for weights in self.cost_weights.values():
            weights.on_optimizer_step(step)

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
        self._check(inputs)
        batch, student, teacher = inputs.batch, inputs.student, inputs.teacher
        labels, t_labels = batch["labels"], batch["teacher_labels"]
        if self.include_prompt:
            s_pts = Clouds(batch["attention_mask"].bool())
            t_pts = Clouds(batch["teacher_attention_mask"].to(t_labels.device).bool())
        else:
            s_pts, t_pts = Clouds(response_mask(labels)), Clouds(response_mask(t_labels))
        k = min(self.top_k, student.logits.shape[-1], teacher.logits.shape[-1])
        features = None
        dual_only = self.pretrain_projectors or self.warming_up(inputs)  # no OT terms (module docstring)
        if self.active("logits") and not dual_only:
            features = RowFeatures(s_pts.rows * labels.shape[1] + s_pts.cols,
                                   select=lambda r: r.topk(k, dim=-1).indices, value=lambda r, idx: r.gather(1, idx))
        loss, metrics, top_s = self.dual_space_terms(inputs, features, ce_weight=self.ce_weight)
        if dual_only:
            return LossOutput(loss=loss, metrics=metrics)

        n_b = response_mask(labels).sum(1).to(loss.dtype)  # student response tokens per example
        means: dict[str, torch.Tensor] = {}  # per-batch values (LossOutput.means), not sums
        with fp32_region(loss.device):
            x_t = self.ot_projectors["hidden"](t_pts.pack(teacher.hidden.detach()).float())  # B×m×d_s
            x_s = s_pts.pack(student.hidden).float()  # B×n×d_s
            branches = []
            if self.active("logits"):
                mix = self.interpolation_weight(inputs.step, inputs.total_steps)
                branches.append(("logits", self.lambda_logits, *self.logits_costs(top_s, teacher, t_pts, s_pts, x_t,
                                                                                  x_s, k, mix)))
                if self.interpolate:
                    means["interpolation_t"] = torch.as_tensor(mix)
            if self.active("hidden"):
                branches.append(("hidden", self.lambda_hidden, *self.hidden_costs(batch, t_pts, s_pts, x_t, x_s)))
            pairs = pair_mask(t_pts.valid, s_pts.valid)  # B×m×n valid (j, i), the same for both branches
            count = pairs.sum((1, 2)).clamp_min(1)
            for branch, weight, points, costs in branches:
                scaled = [scale_cost(c, pairs, self.cost_scale) for c in costs]
                ot_b, diag = self.transport(branch, points, scaled, t_pts.valid, s_pts.valid, pairs)
                loss = loss + weight * (n_b * ot_b).sum()
                metrics[f"ot_{branch}"] = (n_b * ot_b).sum().detach()
                alpha = self.cost_weights[branch]().detach()
                for name, cost, a in zip(self.costs[branch], costs, alpha):
                    mean_b = torch.where(pairs, cost.detach(), 0).sum((1, 2)) / count
                    metrics[f"{branch}_{name}"] = (n_b * mean_b).sum()
                    means[f"alpha_{branch}_{name}"] = a
                for name, value in diag.items():
                    means[f"{name}_{branch}"] = value
        metrics = {key: torch.as_tensor(v, dtype=loss.dtype, device=loss.device).detach() for key, v in metrics.items()}
        means = {key: torch.as_tensor(v, dtype=loss.dtype, device=loss.device).detach() for key, v in means.items()}
        return LossOutput(loss=loss, metrics=metrics, means=means)

    def logits_costs(self, top_s, teacher, t_pts: Clouds, s_pts: Clouds, x_t, x_s, k, mix: float = 1.0):
        """(teacher points q B×m×k, [cost B×m×n per name]) of the logits branch; ``mix`` < 1 interpolates the
        student's sorted logits index-wise towards the teacher's (module docstring)."""
        flat_t = teacher.logits.detach().reshape(-1, teacher.logits.shape[-1])
        index = t_pts.rows * teacher.logits.shape[1] + t_pts.cols
        with torch.no_grad():  # the teacher's sorted top-k logits, per chunk
            top_t = torch.cat([flat_t[index[i:i + self.chunk_size]].float().topk(k, dim=-1).values
                               for i in range(0, index.numel(), self.chunk_size)] or [flat_t.new_zeros(0, k).float()])
        sorted_t, sorted_s = t_pts.pack_rows(top_t), s_pts.pack_rows(top_s.float())
        if mix < 1.0:
            width = min(sorted_t.shape[1], sorted_s.shape[1])
            both = (s_pts.valid[:, :width] & t_pts.valid[:, :width])[..., None]
            mixed = mix * sorted_s[:, :width] + (1 - mix) * sorted_t[:, :width]
            sorted_s = torch.cat([torch.where(both, mixed, sorted_s[:, :width]), sorted_s[:, width:]], 1)
        log_q = torch.log_softmax(sorted_t / self.ot_temperature, -1)
        log_p = torch.log_softmax(sorted_s / self.ot_temperature, -1)
        costs = []
        for name in self.costs["logits"]:
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
        if {"context_euclidean", "context_cosine"} & set(self.costs["hidden"]):
            c_t, c_s = context_vectors(x_t, t_pts.valid, self.window), context_vectors(x_s, s_pts.valid, self.window)
        for name in self.costs["hidden"]:
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

    def transport(self, branch: str, points: torch.Tensor, scaled: list[torch.Tensor], valid_t: torch.Tensor,
                  valid_s: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(OT_b = ⟨P*, Σ α_k Ĉ_k⟩ per example (B), diagnostics) for the scaled costs Ĉ_k (B×m×n each); ``pairs``:
        their valid entries (B×m×n). ``points``: the teacher cloud (unused here, used by the semi-dual)."""
        weights = self.cost_weights[branch]
        res = sinkhorn(weights.combine(scaled), self.eps, mask_x=valid_t, mask_y=valid_s, max_iter=self.max_iter,
                       tol=self.tol, grad=self.sinkhorn_grad)
        active = valid_t.any(1) & valid_s.any(1)  # problems with points on both sides
        if weights.mode == "adaptive" and torch.is_grad_enabled():  # training only: dev batches do not move α
            plan = res.plan.detach()
            per_cost = torch.stack([(plan * torch.where(pairs, c.detach(), 0)).sum((1, 2)) for c in scaled], -1)
            on = active.to(per_cost.dtype)
            weights.observe((per_cost * on[:, None]).sum(0) / on.sum().clamp_min(1))
        error = res.marginal_error[active].mean() if active.any() else res.marginal_error.new_zeros(())
        return res.cost, {"iters": torch.as_tensor(float(res.iterations)), "marginal_err": error.detach()}


class MCWKDDualLoss(MCWKDLoss):
    """MCW-KD with the semi-dual OT of docs/methods.md §8 instead of Sinkhorn, per branch:

        OT_b = max_φ Σ_j μ_j φ(x_j) + Σ_i ν_i Σ_k α_k φ^{c_k}(y_i),  φ^{c_k}(y_i) = −ε log Σ_j μ_j e^{(φ(x_j) −
        Ĉ_k[j,i])/ε}

    φ is a small tanh-bounded network on the teacher points x_j (the logits branch: q_j, B×m×k; the hidden branch:
    P_ot h^t_j), one per branch (:class:`prefkd.ot.semidual.SemiDualOT`). Each training forward first runs
    ``inner_steps`` ascent steps on φ (its own Adam, lr ``inner_lr``; costs and points detached), then the objective
    at the current φ is the OT value, with gradients to the student, the projectors and β but never to φ (φ is not
    among :meth:`trainable_modules`; its weights and inner optimizer state are in the loss's state_dict).
    α = softmax(β) (``alpha_mode: learned``) by default; ``adaptive`` is refused (it needs a plan).
    """

    name = "mcw_kd_dual"

    def __init__(self, *args, alpha_mode: str = "learned", potential_hidden: int = 64, potential_bound: float = 10.0,
                 inner_steps: int = 5, inner_lr: float = 1e-2, **kwargs):
        if alpha_mode == "adaptive":
            raise ValueError("loss=mcw_kd_dual: alpha_mode=adaptive needs Sinkhorn's plan; use learned or fixed")
        super().__init__(*args, alpha_mode=alpha_mode, **kwargs)
        self.potential_hidden, self.potential_bound = int(potential_hidden), float(potential_bound)
        self.inner_steps, self.inner_lr = int(inner_steps), float(inner_lr)
        self.potentials = nn.ModuleDict()  # per branch, from build()

    def build(self, student_model: nn.Module, teacher_model: nn.Module | None) -> None:
        from prefkd.ot.semidual import SemiDualOT

        super().build(student_model, teacher_model)
        if len(self.potentials):
            return
        dims = {"logits": min(self.top_k, student_model.get_output_embeddings().weight.shape[0],
                              teacher_model.get_output_embeddings().weight.shape[0]),
                "hidden": hidden_size(student_model)}
        device = student_model.get_output_embeddings().weight.device
        self.potentials.update({
            branch: SemiDualOT(dims[branch], eps=self.eps, hidden=self.potential_hidden, bound=self.potential_bound,
                               inner_steps=self.inner_steps, inner_lr=self.inner_lr).to(
                None if device.type == "meta" else device)
            for branch in self.costs if self.active(branch)})

    def trainable_modules(self) -> list[nn.Module]:
        """Projectors and β; never the potentials (they are maximised by their own inner steps)."""
        return [m for name, m in self.named_children()
                if name != "potentials" and any(p.requires_grad for p in m.parameters())]

    def transport(self, branch, points, scaled, valid_t, valid_s, pairs):
        if branch not in self.potentials:
            raise RuntimeError(f"loss={self.name}: call loss.build(student_model, teacher_model) first")
        alpha = self.cost_weights[branch]()
        potential = self.potentials[branch]
        if torch.is_grad_enabled() and self.training:
            potential.fit(points, scaled, alpha, valid_t, valid_s)
        return potential(points, scaled, alpha, valid_t, valid_s), {}
