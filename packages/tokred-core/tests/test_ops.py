"""The shared numerics against closed forms and brute-force loops."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from tokred.core.ops import (
    assign_to_nearest,
    bipartite_soft_matching,
    compute_dtype,
    cosine_similarity,
    farthest_point_sampling,
    gather_tokens,
    make_generator,
    mask_to_indices,
    merge_weights,
    projection_residual,
    rank,
    ridge_least_squares,
    scatter_merge,
    topk_indices,
    uniform_noise,
)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- ridge least squares ---------------------------------------------------------------------------------------


def test_ridge_zero_matches_lstsq_on_well_conditioned_inputs():
    basis, targets = randn(4, 6, 32, seed=1, dtype=torch.float64), randn(4, 50, 32, seed=2, dtype=torch.float64)
    coeffs = ridge_least_squares(basis, targets, ridge=0.0)
    # targets ≈ coeffs @ basis  <=>  basis^T coeffs^T ≈ targets^T
    expected = torch.linalg.lstsq(basis.transpose(1, 2), targets.transpose(1, 2)).solution.transpose(1, 2)
    torch.testing.assert_close(coeffs, expected, rtol=1e-9, atol=1e-9)


def test_ridge_matches_normal_equations_closed_form():
    basis, targets = randn(2, 5, 16, seed=3, dtype=torch.float64), randn(2, 9, 16, seed=4, dtype=torch.float64)
    lam = 0.7
    coeffs = ridge_least_squares(basis, targets, ridge=lam)
    eye = torch.eye(5, dtype=torch.float64)
    expected = targets @ basis.transpose(1, 2) @ torch.linalg.inv(basis @ basis.transpose(1, 2) + lam * eye)
    torch.testing.assert_close(coeffs, expected)


def test_ridge_fp32_solve_matches_fp64_reference():
    basis, targets = randn(3, 10, 64, seed=5), randn(3, 100, 64, seed=6)
    coeffs = ridge_least_squares(basis, targets, ridge=1e-5)
    assert coeffs.dtype == torch.float32
    expected = ridge_least_squares(basis.double(), targets.double(), ridge=1e-5)
    torch.testing.assert_close(coeffs.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ridge_half_inputs_solve_in_fp32(dtype):
    basis, targets = randn(2, 4, 32, seed=7, dtype=dtype), randn(2, 20, 32, seed=8, dtype=dtype)
    coeffs = ridge_least_squares(basis, targets)
    assert coeffs.dtype == torch.float32
    expected = ridge_least_squares(basis.double(), targets.double())
    torch.testing.assert_close(coeffs.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ridge", [0.0, 1e-5])
def test_ridge_rank_deficient_basis_does_not_crash(ridge):
    token = randn(1, 1, 8, seed=9)
    basis = token.repeat(2, 4, 1)  # four copies of one token: Gram matrix of rank 1
    targets = torch.cat([token.repeat(2, 3, 1), randn(2, 3, 8, seed=10)], dim=1)
    coeffs = ridge_least_squares(basis, targets, ridge=ridge)
    assert torch.isfinite(coeffs).all()
    residual = projection_residual(targets, basis, ridge=ridge)
    assert torch.isfinite(residual).all()
    # Copies of the basis token are explained exactly; the others leave their orthogonal component.
    torch.testing.assert_close(residual[:, :3], torch.zeros(2, 3), atol=1e-3, rtol=0)
    unit = token[0, 0] / token[0, 0].norm()
    others = targets[:, 3:]
    expected = (others - (others @ unit).unsqueeze(-1) * unit).norm(dim=-1)
    torch.testing.assert_close(residual[:, 3:], expected, atol=1e-3, rtol=1e-4)


def test_ridge_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        ridge_least_squares(randn(1, 2, 3), randn(1, 4, 3), ridge=-1.0)
    with pytest.raises(ValueError, match="share B and C"):
        ridge_least_squares(randn(1, 2, 3), randn(1, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, k, C\)"):
        ridge_least_squares(randn(2, 3), randn(1, 4, 3))


def test_projection_residual_matches_orthogonal_projection():
    basis, tokens = randn(3, 6, 40, seed=11, dtype=torch.float64), randn(3, 30, 40, seed=12, dtype=torch.float64)
    residual = projection_residual(tokens, basis, ridge=0.0)
    q, _ = torch.linalg.qr(basis.transpose(1, 2))  # (B, C, k) orthonormal basis of the span
    expected = (tokens - tokens @ q @ q.transpose(1, 2)).norm(dim=-1)
    torch.testing.assert_close(residual, expected)


def test_projection_residual_of_basis_tokens_is_zero():
    tokens = randn(2, 20, 16, seed=13)
    basis = tokens[:, [2, 7, 11]]
    residual = projection_residual(tokens, basis)
    assert residual[:, [2, 7, 11]].abs().max() < 1e-3
    assert residual.dtype == torch.float32


# -- farthest-point sampling -----------------------------------------------------------------------------------


def fps_brute_force(points, k, start, metric="euclidean"):
    """A plain Python loop: pick the unpicked point with the largest min distance, ties to the lowest index."""

    def dist(a, b):
        if metric == "cosine":
            return 1.0 - F.cosine_similarity(a, b, dim=0).item()
        return (a - b).pow(2).sum().item()

    picks = [start]
    while len(picks) < k:
        best, best_i = -1.0, None
        for i in range(points.shape[0]):
            if i in picks:
                continue
            d = min(dist(points[i], points[j]) for j in picks)
            if d > best:
                best, best_i = d, i
        picks.append(best_i)
    return picks


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_fps_matches_brute_force(metric):
    points = randn(3, 40, 8, seed=14, dtype=torch.float64)
    picks = farthest_point_sampling(points, 10, start=torch.tensor([0, 5, 39]), metric=metric)
    for row, start in enumerate([0, 5, 39]):
        assert picks[row].tolist() == fps_brute_force(points[row], 10, start, metric)
    distances = 1 - cosine_similarity(points) if metric == "cosine" else torch.cdist(points, points).pow(2)
    precomputed = farthest_point_sampling(distances, 10, start=torch.tensor([0, 5, 39]), metric="precomputed")
    assert torch.equal(precomputed, picks)


def test_fps_identical_points_give_distinct_picks():
    points = torch.ones(2, 12, 4)
    picks = farthest_point_sampling(points, 5)
    assert picks.tolist() == [[0, 1, 2, 3, 4]] * 2


def test_fps_respects_valid_mask_and_pads_exhausted_rows():
    points = randn(2, 10, 3, seed=15)
    valid = torch.zeros(2, 10, dtype=torch.bool)
    valid[0, [1, 4, 6, 8]] = True
    valid[1, [2, 3]] = True
    picks = farthest_point_sampling(points, 4, start=torch.tensor([1, 2]), valid=valid)
    assert sorted(picks[0].tolist()) == [1, 4, 6, 8]
    assert picks[1, :2].tolist() in ([2, 3],) and picks[1, 2:].tolist() == [-1, -1]


def test_fps_half_precision_and_errors():
    points = randn(1, 16, 4, seed=16, dtype=torch.float16)
    assert farthest_point_sampling(points, 3).dtype == torch.long
    with pytest.raises(ValueError, match="num_samples"):
        farthest_point_sampling(points, 17)
    with pytest.raises(ValueError, match="start"):
        farthest_point_sampling(points, 3, start=16)
    with pytest.raises(ValueError, match="metric"):
        farthest_point_sampling(points, 3, metric="manhattan")


# -- similarity, selection, gather -----------------------------------------------------------------------------


def test_cosine_similarity_matches_torch_and_handles_zero_vectors():
    a, b = randn(2, 7, 5, seed=17), randn(2, 4, 5, seed=18)
    expected = F.cosine_similarity(a.unsqueeze(2), b.unsqueeze(1), dim=-1)
    torch.testing.assert_close(cosine_similarity(a, b), expected)
    zeros = torch.zeros(1, 2, 3)
    assert torch.equal(cosine_similarity(zeros), torch.zeros(1, 2, 2))
    assert cosine_similarity(a.half()).dtype == torch.float32


def test_topk_indices_matches_sorted_python_with_ties_to_lower_position():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9, 0.5]])
    assert topk_indices(scores, 3).tolist() == [[0, 1, 4]]
    assert topk_indices(scores, 2, largest=False).tolist() == [[0, 3]]
    random = randn(5, 30, seed=19)
    for row in range(5):
        expected = sorted(sorted(range(30), key=lambda i: -random[row, i].item())[:8])
        assert topk_indices(random, 8)[row].tolist() == expected
    with pytest.raises(ValueError, match="k must be between"):
        topk_indices(random, 31)


def test_gather_tokens_matches_indexing_for_any_trailing_shape():
    x = randn(3, 10, 4, 2, seed=20)
    idx = torch.tensor([[0, 3], [9, 1], [5, 5]])
    out = gather_tokens(x, idx)
    for b in range(3):
        assert torch.equal(out[b], x[b, idx[b]])
    positions = torch.arange(10).expand(3, 10)
    assert torch.equal(gather_tokens(positions, idx), idx)


# -- merging ---------------------------------------------------------------------------------------------------


def test_scatter_merge_and_weights_match_a_loop():
    x = randn(2, 8, 3, seed=21)
    assignment = torch.tensor([[0, 0, 1, -1, 2, 2, 2, 1], [2, 1, 0, 0, 0, -1, -1, 1]])
    sizes = torch.tensor([[1.0, 3.0, 1.0, 5.0, 2.0, 1.0, 1.0, 1.0]] * 2)
    weights, slot_sizes = merge_weights(assignment, 3, sizes)
    merged = scatter_merge(x, assignment, 3, weights)
    for b in range(2):
        for j in range(3):
            members = [i for i in range(8) if assignment[b, i] == j]
            total = sum(sizes[b, i] for i in members)
            expected = sum(sizes[b, i] * x[b, i] for i in members) / total
            torch.testing.assert_close(merged[b, j], expected)
            assert slot_sizes[b, j] == total
    assert (weights[assignment < 0] == 0).all()


def test_scatter_merge_preserves_half_dtype_and_sums_in_fp32():
    x = torch.full((1, 2048, 1), 0.1, dtype=torch.float16)
    assignment = torch.zeros(1, 2048, dtype=torch.long)
    weights, _ = merge_weights(assignment, 1)
    merged = scatter_merge(x, assignment, 1, weights)
    assert merged.dtype == torch.float16
    # An fp16 running sum of 2048 × 0.1 would stall far from 204.8; the mean comes back as 0.1.
    assert abs(merged.item() - 0.1) < 1e-3


def test_scatter_merge_rejects_out_of_range_assignment():
    with pytest.raises(ValueError, match="assignment values"):
        scatter_merge(randn(1, 3, 2), torch.tensor([[0, 1, 5]]), 2)


def test_assign_to_nearest_matches_a_loop_and_respects_mask():
    src, tgt = randn(2, 9, 6, seed=22), randn(2, 4, 6, seed=23)
    nearest = assign_to_nearest(src, tgt)
    for b, i in itertools.product(range(2), range(9)):
        sims = [F.cosine_similarity(src[b, i], tgt[b, j], dim=0).item() for j in range(4)]
        assert nearest[b, i].item() == max(range(4), key=lambda j: sims[j])
    mask = torch.tensor([[False, True, False, False], [True, False, False, True]])
    masked = assign_to_nearest(src, tgt, target_mask=mask)
    assert (masked[0] == 1).all() and set(masked[1].tolist()) <= {0, 3}


# -- bipartite soft matching -----------------------------------------------------------------------------------


def matching_brute_force(tokens, r, protected):
    """ToMe's matching written as loops over one row."""
    free = [i for i in range(tokens.shape[0]) if not protected[i]]
    a, b = free[0::2], free[1::2]
    best = {}
    for i in a:
        sims = {j: F.cosine_similarity(tokens[i], tokens[j], dim=0).item() for j in b}
        j = max(b, key=lambda j: (sims[j], -j))
        best[i] = (sims[j], j)
    chosen = sorted(a, key=lambda i: (-best[i][0], i))[:r]
    return chosen, [best[i][1] for i in chosen]


def test_bipartite_matching_matches_brute_force():
    tokens = randn(3, 20, 5, seed=24, dtype=torch.float64)
    protected = torch.zeros(3, 20, dtype=torch.bool)
    protected[1, [0, 7]] = True
    protected[2, 10:] = True
    match = bipartite_soft_matching(tokens, torch.tensor([4, 6, 2]), protected=protected)
    for row, r in enumerate([4, 6, 2]):
        sources, dests = matching_brute_force(tokens[row], r, protected[row])
        assert match.sources[row, :r].tolist() == sources
        assert match.destinations[row, :r].tolist() == dests
        assert (match.sources[row, r:] == -1).all()


def test_bipartite_matching_single_free_token_is_dropped():
    tokens = randn(1, 4, 3, seed=25)
    protected = torch.tensor([[True, False, True, True]])
    match = bipartite_soft_matching(tokens, 1, protected=protected)
    assert match.sources.tolist() == [[1]] and match.destinations.tolist() == [[-1]]
    with pytest.raises(ValueError, match="r must lie between"):
        bipartite_soft_matching(tokens, 2, protected=protected)


def test_bipartite_matching_with_an_explicit_source_set_matches_brute_force():
    tokens = randn(2, 16, 5, seed=26, dtype=torch.float64)
    protected = torch.zeros(2, 16, dtype=torch.bool)
    protected[1, 3] = True
    sources = torch.zeros(2, 16, dtype=torch.bool)
    sources[0, :6] = True
    sources[1, [3, 5, 9, 12]] = True  # position 3 is protected: never a source
    match = bipartite_soft_matching(tokens, torch.tensor([4, 2]), protected=protected, sources=sources)
    for row, r in enumerate([4, 2]):
        a = [i for i in range(16) if sources[row, i] and not protected[row, i]]
        b = [i for i in range(16) if not sources[row, i] and not protected[row, i]]
        best = {}
        for i in a:
            sims = {j: F.cosine_similarity(tokens[row, i], tokens[row, j], dim=0).item() for j in b}
            j = max(b, key=lambda j: (sims[j], -j))
            best[i] = (sims[j], j)
        chosen = sorted(a, key=lambda i: (-best[i][0], i))[:r]
        assert match.sources[row, :r].tolist() == chosen
        assert match.destinations[row, :r].tolist() == [best[i][1] for i in chosen]
    with pytest.raises(ValueError, match="number of sources"):
        bipartite_soft_matching(tokens, 4, protected=protected, sources=sources)
    with pytest.raises(ValueError, match="sources must be a bool tensor"):
        bipartite_soft_matching(tokens, 1, sources=sources.long())


# -- ranking, masks, precision, random draws ---------------------------------------------------------------------


def test_rank_is_the_position_in_a_stable_sort():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.1], [3.0, 2.0, 1.0, 0.0, -1.0]])
    ranks = rank(scores)
    for row in range(2):
        order = sorted(range(5), key=lambda i: (-scores[row, i].item(), i))
        assert ranks[row].tolist() == [order.index(i) for i in range(5)]
    assert rank(scores, descending=False)[1].tolist() == [4, 3, 2, 1, 0]
    assert rank(torch.tensor([[True, False, True]])).tolist() == [[0, 2, 1]]


def test_mask_to_indices_gives_ascending_positions_and_checks_counts():
    mask = torch.tensor([[False, True, True, False], [True, False, False, True]])
    assert mask_to_indices(mask).tolist() == [[1, 2], [0, 3]]
    assert mask_to_indices(mask, 2).tolist() == [[1, 2], [0, 3]]
    assert mask_to_indices(torch.zeros(3, 0, dtype=torch.bool)).shape == (3, 0)
    with pytest.raises(ValueError, match="must hold 2 True entries"):
        mask_to_indices(torch.tensor([[True, True], [True, False]]))
    with pytest.raises(ValueError, match="bool tensor"):
        mask_to_indices(torch.ones(2, 2))


def test_compute_dtype_widens_half_and_keeps_double():
    half, single, double = (torch.ones(1, dtype=d) for d in (torch.float16, torch.float32, torch.float64))
    assert compute_dtype(half) == compute_dtype(single) == compute_dtype(torch.ones(1, dtype=torch.bfloat16))
    assert compute_dtype(half) is torch.float32
    assert compute_dtype(double) is torch.float64 and compute_dtype(half, None, double) is torch.float64
    assert compute_dtype(None) is torch.float32


def test_seeded_noise_is_reproducible_advances_and_ignores_the_global_rng():
    a, b = make_generator(5), make_generator(5)
    first = uniform_noise((2, 4), generator=a)
    torch.manual_seed(123)  # the global generator must not matter
    assert torch.equal(first, uniform_noise((2, 4), generator=b))
    assert not torch.equal(first, uniform_noise((2, 4), generator=a)), "successive draws differ"
    assert make_generator(None) is None
    assert uniform_noise((3,), device="meta").device.type == "meta"
    assert ((first >= 0) & (first < 1)).all() and first.dtype == torch.float32
