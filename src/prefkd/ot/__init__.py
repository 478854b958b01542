"""Optimal transport for KD (docs/methods.md §8): batched log-stabilised Sinkhorn, transport costs, cost weights.

    from prefkd.ot import sinkhorn
    res = sinkhorn(cost, eps=0.1, mask_x=mask_t, mask_y=mask_s)   # cost B×m×n, masks B×m / B×n
    res.plan, res.cost, res.reg_value, res.iterations, res.marginal_error, res.converged

The semi-dual variant (a potential network and c-transforms per cost) is :class:`SemiDualOT`.
"""

from prefkd.ot.costs import (
    context_cosine_cost,
    context_euclidean_cost,
    context_vectors,
    euclidean_cost,
    kl_cost,
    normalized_edit_distance_matrix,
    pair_mask,
    salience_cost,
    scale_cost,
    strip_markers,
)
from prefkd.ot.semidual import SemiDualOT, c_transform, semidual_objective
from prefkd.ot.sinkhorn import SinkhornResult, sinkhorn
from prefkd.ot.weights import AdaptiveCostWeights, adaptive_alpha, combine_costs, project_to_capped_simplex

__all__ = [
    "AdaptiveCostWeights",
    "SemiDualOT",
    "SinkhornResult",
    "adaptive_alpha",
    "c_transform",
    "combine_costs",
    "context_cosine_cost",
    "context_euclidean_cost",
    "context_vectors",
    "euclidean_cost",
    "kl_cost",
    "normalized_edit_distance_matrix",
    "pair_mask",
    "project_to_capped_simplex",
    "salience_cost",
    "scale_cost",
    "semidual_objective",
    "sinkhorn",
    "strip_markers",
]
