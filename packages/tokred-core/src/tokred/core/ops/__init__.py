"""Shared numerics for token reduction, batched over ``B`` and device- and dtype-aware.

Every reducer in every tokred package builds on these functions instead of writing its own: ApET uses
farthest-point sampling, the ridge solve and the projection residual; MTR and ToMe use the ranking, the
matching and the size-weighted merge. Shapes use ``B`` (batch), ``N`` (tokens in), ``K`` (tokens kept or
slots), ``C`` (channels).

Numerics that are sensitive to precision (distances, Gram matrices, solves, similarities, merge sums) run in
the dtype of [`compute_dtype`][tokred.core.ops.compute_dtype], fp32 whatever the input precision; functions
that return features cast them back to the input dtype.
"""

from tokred.core.ops.linalg import projection_residual, ridge_least_squares
from tokred.core.ops.matching import BipartiteMatch, bipartite_soft_matching
from tokred.core.ops.merge import assign_to_nearest, merge_weights, scatter_merge
from tokred.core.ops.precision import compute_dtype
from tokred.core.ops.random import make_generator, uniform_noise
from tokred.core.ops.sampling import farthest_point_sampling
from tokred.core.ops.selection import gather_tokens, mask_to_indices, rank, topk_indices
from tokred.core.ops.similarity import cosine_similarity

__all__ = [
    "BipartiteMatch",
    "assign_to_nearest",
    "bipartite_soft_matching",
    "compute_dtype",
    "cosine_similarity",
    "farthest_point_sampling",
    "gather_tokens",
    "make_generator",
    "mask_to_indices",
    "merge_weights",
    "projection_residual",
    "rank",
    "ridge_least_squares",
    "scatter_merge",
    "topk_indices",
    "uniform_noise",
]
