"""ApET: the conformance contract, closed-form cases, the reference-code quirks and independent loop oracles."""

from __future__ import annotations

import doctest

import pytest
import torch

import tokred.vlm.methods.apet as apet_module
from tokred.core import Reduction, create_reducer, get_reducer_class
from tokred.core.errors import BudgetError
from tokred.core.ops import farthest_point_sampling
from tokred.core.testing import ReducerConformance, make_tokens
from tokred.vlm import ApET

# -- the conformance suite -------------------------------------------------------------------------------------


class _DeterministicBasis:
    """ApET is ``stochastic`` (for ``basis="random"``); with FPS the seed and the global RNG must not matter."""

    def test_global_rng_and_seed(self) -> None:
        tokens = self.tokens()
        base = {**self.reducer_kwargs, "num_keep": 8}
        runs = [create_reducer(self.reducer_name, **{**base, "seed": s})(tokens) for s in range(3)]
        assert all(torch.equal(runs[0].indices, r.indices) and torch.equal(runs[0].tokens, r.tokens) for r in runs)
        torch.manual_seed(0)
        first = self.run(tokens)
        torch.manual_seed(1)
        assert torch.equal(first.indices, self.run(tokens).indices)


class TestPaperConformance(_DeterministicBasis, ReducerConformance):
    reducer_name = "apet"
    reducer_kwargs = {"num_basis": 3}


class TestPaperNoMergeConformance(_DeterministicBasis, ReducerConformance):
    reducer_name = "apet"
    reducer_kwargs = {"num_basis": 3, "merge": False}


class TestReferenceConformance(_DeterministicBasis, ReducerConformance):
    reducer_name = "apet"
    reducer_kwargs = {"num_basis": 3, "variant": "reference"}
    # Basis tokens are merged into a target and also fill a borrowed slot; the plan records the latter only.
    reproduces_tokens = False


class TestReferenceNoMergeConformance(_DeterministicBasis, ReducerConformance):
    reducer_name = "apet"
    reducer_kwargs = {"num_basis": 3, "variant": "reference", "merge": False}
    # A basis token among the targets (rank-deficient inputs) leaves its borrowed slot to another token's plan.
    reproduces_tokens = False


class TestRandomBasisConformance(ReducerConformance):
    reducer_name = "apet"
    reducer_kwargs = {"num_basis": 3, "basis": "random", "seed": 0}


# -- independent oracles: apet.md §1.1 followed literally, one row at a time ----------------------------------


def _loop_fps(x: torch.Tensor, k: int, start: int) -> list[int]:
    """'pick the current point; dist = min(dist, ||X - x_pick||^2); next pick = argmax dist', k times."""
    dist = torch.full((x.shape[0],), float("inf"), dtype=x.dtype)
    picks, current = [], start
    for _ in range(k):
        picks.append(current)
        dist = torch.minimum(dist, ((x - x[current]) ** 2).sum(dim=1))
        current = int(dist.argmax())  # first of tied maxima; picked points have distance 0
    return picks


def _loop_residual(x: torch.Tensor, basis: list[int], ridge: float) -> list[float]:
    s = x[basis]  # (k, C)
    gram = s @ s.T + ridge * torch.eye(len(basis), dtype=x.dtype)
    coeffs = torch.linalg.solve(gram, s @ x.T).T  # (N, k)
    return [float(v) for v in (x - coeffs @ s).norm(dim=1)]


def _loop_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / max(float(a.norm() * b.norm()), 1e-30)


def _loop_merge(x: torch.Tensor, targets: list[int], sources: list[int]) -> dict[int, torch.Tensor]:
    """Equal-weight average: target <- (target + sum(assigned)) / (1 + count), cosine argmax, first on ties."""
    sums = {t: x[t].clone() for t in targets}
    counts = dict.fromkeys(targets, 1)
    for i in sources:
        sims = [_loop_cos(x[i], x[t]) for t in targets]
        best = targets[sims.index(max(sims))]  # argmax, first on ties
        sums[best] += x[i]
        counts[best] += 1
    return {t: sums[t] / counts[t] for t in targets}


def _loop_apet(
    x: torch.Tensor, num_keep: int, k: int, *, variant: str, ridge: float = 1e-5, start: int = 0
) -> tuple[list[int], torch.Tensor]:
    """One token set (N, C) -> (kept positions ascending, (K, C) tokens), written from apet.md, not the module."""
    n = x.shape[0]
    basis = _loop_fps(x, k, start)
    err = _loop_residual(x, basis, ridge)
    ranked = sorted(range(n), key=lambda i: (-err[i], i))  # idx = topk(e, n), descending
    out: dict[int, torch.Tensor] = {}
    if variant == "reference":
        idx = ranked[:num_keep]
        targets, slots = idx[:-k], idx[-k:]
        out.update(_loop_merge(x, targets, [i for i in range(n) if i not in idx]))
        for j, pos in enumerate(sorted(slots)):  # boolean-mask assignment: ascending slot order
            out[pos] = x[basis[j]]
    else:
        targets = [i for i in ranked if i not in basis][: num_keep - k]
        out.update(_loop_merge(x, targets, [i for i in range(n) if i not in targets and i not in basis]))
        out.update({b: x[b] for b in basis})
    positions = sorted(out)
    return positions, torch.stack([out[p] for p in positions])


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize(("num_keep", "num_basis", "fps_start"), [(16, 4, 0), (9, 3, 11), (20, 10, 5)])
def test_matches_loop_oracle(variant: str, num_keep: int, num_basis: int, fps_start: int) -> None:
    tokens = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    red = ApET(num_keep=num_keep, num_basis=num_basis, fps_start=fps_start, variant=variant)(tokens)
    for row in range(tokens.shape[0]):
        positions, expected = _loop_apet(tokens[row], num_keep, num_basis, variant=variant, start=fps_start)
        assert red.indices[row].tolist() == positions
        torch.testing.assert_close(red.tokens[row], expected, rtol=1e-6, atol=1e-6)


# -- a hand-computed case --------------------------------------------------------------------------------------
#
# Basis (FPS from position 7, k = 2): x7 = 10 e0, then x0 = 10 e1 (squared distance 200; every other token is
# within 106..120 of x7). The basis spans e0, e1, so each residual is the norm of the e2..e5 components:
# x1: 5, x2: 4, x6: 3, x3: 2, x4: sqrt(2), x5: sqrt(1.25), x0 and x7: 0.

HAND = torch.tensor(
    [
        [0.0, 10.0, 0.0, 0.0, 0.0, 0.0],  # x0  basis (second FPS pick)
        [1.0, 0.0, 5.0, 0.0, 0.0, 0.0],  # x1  residual 5
        [0.0, 2.0, 0.0, 4.0, 0.0, 0.0],  # x2  residual 4
        [0.0, 1.0, 0.0, 2.0, 0.0, 0.0],  # x3  residual 2, parallel to x2
        [0.0, 0.0, 1.0, 0.0, 0.0, 1.0],  # x4  residual 1.41, cos 0.69 with x1, 0 with x2
        [0.0, 0.0, 0.0, 1.0, 0.5, 0.0],  # x5  residual 1.12, cos 0 with x1, 0.8 with x2
        [0.0, 0.0, 3.0, 0.0, 0.0, 0.0],  # x6  residual 3, cos 0.98 with x1
        [10.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # x7  basis (the FPS start)
    ]
).unsqueeze(0)
X = HAND[0]


@pytest.mark.parametrize("ridge", [0.0, 1e-5])
def test_hand_paper(ridge: float) -> None:
    red = ApET(num_keep=4, num_basis=2, fps_start=7, ridge=ridge)(HAND)
    # The basis {0, 7} at its own positions plus the two highest residuals {1, 2}; x3, x5 -> x2; x4, x6 -> x1.
    assert red.indices.tolist() == [[0, 1, 2, 7]]
    expected = torch.stack([X[0], (X[1] + X[4] + X[6]) / 3, (X[2] + X[3] + X[5]) / 3, X[7]])
    torch.testing.assert_close(red.tokens[0], expected)
    torch.testing.assert_close(red.tokens[0, 1], torch.tensor([1.0, 0.0, 9.0, 0.0, 0.0, 1.0]) / 3)
    assert red.sizes.tolist() == [[1.0, 3.0, 3.0, 1.0]]
    assert red.assignment.tolist() == [[0, 1, 2, 2, 1, 2, 1, 3]]
    torch.testing.assert_close(red.apply(HAND), red.tokens)


@pytest.mark.parametrize("ridge", [0.0, 1e-5])
def test_hand_reference_slot_overwrite(ridge: float) -> None:
    red = ApET(num_keep=4, num_basis=2, fps_start=7, ridge=ridge, variant="reference")(HAND)
    # idx = topk(e, 4) = [1, 2, 6, 3]; targets idx[:-2] = [1, 2]; idx[-2:] = [6, 3] are overwritten in
    # ascending position order by the basis in FPS order [7, 0]: position 3 <- x7, position 6 <- x0 (not the
    # other way round, which the descending rank order would give). Everything outside idx, the basis tokens'
    # own positions 0 and 7 included, is merged: x7, x4 -> x1 and x0, x5 -> x2.
    assert red.indices.tolist() == [[1, 2, 3, 6]]
    expected = torch.stack([(X[1] + X[4] + X[7]) / 3, (X[2] + X[5] + X[0]) / 3, X[7], X[0]])
    torch.testing.assert_close(red.tokens[0], expected)
    torch.testing.assert_close(red.tokens[0, 0], torch.tensor([11.0, 0.0, 6.0, 0.0, 0.0, 1.0]) / 3)

    # The plan: each basis token belongs to the slot it fills, the overwritten originals x3, x6 are dropped.
    assert red.assignment.tolist() == [[3, 0, 1, -1, 0, 1, -1, 2]]
    assert red.sizes.tolist() == [[2.0, 2.0, 1.0, 1.0]]
    applied = red.apply(HAND)
    torch.testing.assert_close(applied[0, 2:], red.tokens[0, 2:])  # basis slots: exact
    torch.testing.assert_close(applied[0, 0], (X[1] + X[4]) / 2)  # targets: without the basis token
    torch.testing.assert_close(applied[0, 1], (X[2] + X[5]) / 2)
    positions = torch.arange(8).unsqueeze(0)
    assert red.apply(positions, how="select").tolist() == [[1, 2, 3, 6]]


def test_hand_no_merge() -> None:
    paper = ApET(num_keep=4, num_basis=2, fps_start=7, merge=False)(HAND)
    assert paper.indices.tolist() == [[0, 1, 2, 7]]
    assert torch.equal(paper.tokens[0], X[[0, 1, 2, 7]])
    assert paper.assignment.tolist() == [[0, 1, 2, -1, -1, -1, -1, 3]]

    reference = ApET(num_keep=4, num_basis=2, fps_start=7, merge=False, variant="reference")(HAND)
    assert reference.indices.tolist() == [[1, 2, 3, 6]]
    assert torch.equal(reference.tokens[0], X[[1, 2, 7, 0]])
    assert reference.assignment.tolist() == [[3, 0, 1, -1, -1, -1, -1, 2]]
    assert torch.equal(reference.apply(HAND), reference.tokens)


def test_hand_sizes_weight_the_merge() -> None:
    sizes = torch.tensor([[1.0, 2.0, 1.0, 4.0, 3.0, 1.0, 1.0, 5.0]])
    red = ApET(num_keep=4, num_basis=2, fps_start=7)(HAND, sizes=sizes)
    expected = torch.stack([X[0], (2 * X[1] + 3 * X[4] + X[6]) / 6, (X[2] + 4 * X[3] + X[5]) / 6, X[7]])
    torch.testing.assert_close(red.tokens[0], expected)
    assert red.sizes.tolist() == [[1.0, 6.0, 6.0, 5.0]]

    ref = ApET(num_keep=4, num_basis=2, fps_start=7, variant="reference")(HAND, sizes=sizes)
    expected = torch.stack([(2 * X[1] + 3 * X[4] + 5 * X[7]) / 10, (X[2] + X[5] + X[0]) / 3, X[7], X[0]])
    torch.testing.assert_close(ref.tokens[0], expected)
    assert ref.sizes.tolist() == [[5.0, 2.0, 5.0, 1.0]]  # the plan: x7 (size 5) counted in its own slot


def test_hand_protected() -> None:
    protected = torch.zeros(1, 8, dtype=torch.bool)
    protected[0, 6] = True
    red = ApET(num_keep=5, num_basis=2, fps_start=7)(HAND, protected=protected)
    # x6 is kept as is and receives nothing; the other four slots are ApET's as before.
    assert red.indices.tolist() == [[0, 1, 2, 6, 7]]
    expected = torch.stack([X[0], (X[1] + X[4]) / 2, (X[2] + X[3] + X[5]) / 3, X[6], X[7]])
    torch.testing.assert_close(red.tokens[0], expected)

    ref = ApET(num_keep=5, num_basis=2, fps_start=7, variant="reference")(HAND, protected=protected)
    # Protected x6 ranks first: idx = [6, 1, 2, 3, 4], targets [6, 1, 2] (6 receives nothing), 3 <- x7, 4 <- x0.
    assert ref.indices.tolist() == [[1, 2, 3, 4, 6]]
    expected = torch.stack([(X[1] + X[7]) / 2, (X[2] + X[5] + X[0]) / 3, X[7], X[0], X[6]])
    torch.testing.assert_close(ref.tokens[0], expected)


def test_protected_fps_start_moves_to_next_free_token() -> None:
    protected = torch.zeros(1, 8, dtype=torch.bool)
    protected[0, 7] = True
    red = ApET(num_keep=4, num_basis=2, fps_start=7, merge=False)(HAND, protected=protected)
    # Start wraps to position 0 (x0 = 10 e1); the next FPS pick among the free tokens is x1 (distance 126).
    assert red.indices.tolist() == [[0, 1, 2, 7]]
    tokens = make_tokens(2, 24, 16)
    protected = torch.zeros(2, 24, dtype=torch.bool)
    protected[:, :3] = True
    free_start = ApET(num_keep=6, num_basis=2, merge=False)(tokens, protected=protected)
    assert bool((free_start.indices == 3).any(dim=1).all())  # position 3: the first free token


# -- small budgets: the basis shrinks to K' - 1 tokens -------------------------------------------------------


def test_budget_below_num_basis_clamps_the_basis() -> None:
    # K = 2 with num_basis = 2: one basis token (x7) and one target, the largest residual against span(e0): x0.
    red = ApET(num_keep=2, num_basis=2, fps_start=7)(HAND)
    assert red.indices.tolist() == [[0, 7]]
    torch.testing.assert_close(red.tokens[0], torch.stack([X[:7].mean(dim=0), X[7]]))
    ref = ApET(num_keep=2, num_basis=2, fps_start=7, variant="reference")(HAND)
    # idx = [0, 1]: target x0 absorbs everything outside idx (x7 included), slot 1 is overwritten by x7.
    assert ref.indices.tolist() == [[0, 1]]
    torch.testing.assert_close(ref.tokens[0], torch.stack([X[[0, 2, 3, 4, 5, 6, 7]].mean(dim=0), X[7]]))


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("num_keep", [1, 2, 6, 10, 11, 23])
def test_default_basis_against_small_sets(variant: str, num_keep: int) -> None:
    # num_basis=10 with N=24 and a protected token: the basis holds min(10, K - 2) tokens; the plan stays valid.
    suite = TestReferenceConformance() if variant == "reference" else TestPaperConformance()
    tokens = make_tokens()
    protected = torch.zeros(3, 24, dtype=torch.bool)
    protected[:, 5] = True
    red = ApET(num_keep=num_keep, variant=variant)(tokens, protected=protected)
    suite.check_plan(tokens, red, num_keep)
    assert bool((red.indices == 5).any(dim=1).all())
    if variant == "paper" and num_keep > 1:
        num_basis = min(10, max(num_keep - 2, 0))
        basis = farthest_point_sampling(tokens, 1 + num_basis, start=0, valid=~protected)[:, :num_basis]
        assert all(set(basis[row].tolist()) <= set(red.indices[row].tolist()) for row in range(3))


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_budget_of_one_keeps_the_largest_norm(variant: str) -> None:
    # No basis at all: the residual is the norm; x0 and x7 tie at 10 and the lower position wins.
    red = ApET(num_keep=1, num_basis=2, variant=variant)(HAND)
    assert red.indices.tolist() == [[0]]
    torch.testing.assert_close(red.tokens[0, 0], X.mean(dim=0))
    assert red.sizes.tolist() == [[8.0]]


def test_fewer_tokens_than_num_basis() -> None:
    # N = 8 <= num_basis = 10, K = 3: the basis is FPS's first two picks, x1 the one target.
    red = ApET(num_keep=3, num_basis=10, fps_start=7)(HAND)
    assert red.indices.tolist() == [[0, 1, 7]]
    torch.testing.assert_close(red.tokens[0, 1], X[1:7].mean(dim=0))
    assert torch.equal(red.tokens[0, [0, 2]], X[[0, 7]])
    same = ApET(num_keep=3, num_basis=2, fps_start=7)(HAND)
    assert torch.equal(same.tokens, red.tokens)


# -- batching, precision, variants ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("basis_size", [4, 10])
def test_batched_equals_per_row(variant: str, basis_size: int) -> None:
    tokens = make_tokens(4, 40, 32, seed=5)
    protected = torch.zeros(4, 40, dtype=torch.bool)
    protected[1, [0, 7]] = True
    protected[2, 3:9] = True  # six protected: this row's basis shrinks, unlike the others
    reducer = ApET(num_keep=12, num_basis=basis_size, variant=variant)
    sizes = torch.randint(1, 4, (4, 40), generator=torch.Generator().manual_seed(1)).float()
    batched = reducer(tokens, protected=protected, sizes=sizes)
    for row in range(4):
        alone = reducer(tokens[row : row + 1], protected=protected[row : row + 1], sizes=sizes[row : row + 1])
        assert torch.equal(alone.indices[0], batched.indices[row])
        assert torch.equal(alone.assignment[0], batched.assignment[row])
        torch.testing.assert_close(alone.tokens[0], batched.tokens[row])
        torch.testing.assert_close(alone.sizes[0], batched.sizes[row])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_half_precision_matches_fp32(dtype: torch.dtype, variant: str) -> None:
    tokens = make_tokens(2, 64, 32, seed=2, dtype=dtype)
    reducer = ApET(num_keep=16, num_basis=6, variant=variant)
    half = reducer(tokens)
    full = reducer(tokens.float())  # the same values: the numerics run in fp32 in both
    assert half.tokens.dtype == dtype
    assert torch.equal(half.indices, full.indices)
    assert torch.equal(half.assignment, full.assignment)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(half.tokens.float(), full.tokens, atol=tol, rtol=tol)


def test_paper_and_reference_differ_as_documented() -> None:
    tokens = make_tokens(3, 48, 32, seed=4)
    num_keep, k = 14, 5
    paper = ApET(num_keep=num_keep, num_basis=k)(tokens)
    ref = ApET(num_keep=num_keep, num_basis=k, variant="reference")(tokens)
    for row in range(3):
        basis = _loop_fps(tokens[row].double(), k, 0)
        paper_kept = set(paper.indices[row].tolist())
        ref_kept = ref.indices[row].tolist()
        targets = paper_kept - set(basis)
        # The same K - k high-error targets in both; paper keeps the basis at its own positions, the reference
        # puts it in the slots of the k next-ranked tokens, in FPS order along ascending positions.
        assert basis[0] == 0 and set(basis) <= paper_kept and not set(basis) & set(ref_kept)
        assert targets <= set(ref_kept)
        slots = sorted(set(ref_kept) - targets)
        assert len(slots) == k
        for j, pos in enumerate(slots):
            assert torch.equal(ref.tokens[row, ref_kept.index(pos)], tokens[row, basis[j]])
        # Reference targets also absorb the basis tokens, so a target mass is larger by the basis merged in.
        ref_target_sizes = sum(ref.sizes[row, ref_kept.index(t)] for t in targets)
        assert float(ref_target_sizes) == 48 - num_keep + len(targets) - k  # plan: basis counted in its slot
        assert float(paper.sizes[row].sum()) == 48 and float(ref.sizes[row].sum()) == 48 - k


def test_reference_apply_differs_only_by_the_basis_merged_into_targets() -> None:
    # The documented plan: reduction.tokens = apply(tokens) plus each basis token averaged into its target.
    tokens = make_tokens(2, 40, 32, seed=9)
    red = ApET(num_keep=12, num_basis=4, variant="reference")(tokens)
    applied = red.apply(tokens)
    for row in range(2):
        x = tokens[row]
        basis = _loop_fps(x.double(), 4, 0)
        basis_slots = [int(red.assignment[row, b]) for b in basis]
        assert [int(red.indices[row, s]) for s in basis_slots] == sorted(int(red.indices[row, s]) for s in basis_slots)
        targets = [s for s in range(12) if s not in basis_slots]
        total = applied[row] * red.sizes[row].unsqueeze(-1)
        count = red.sizes[row].clone()
        for b in basis:
            sims = [_loop_cos(x[b], x[int(red.indices[row, s])]) for s in targets]
            slot = targets[sims.index(max(sims))]
            total[slot] += x[b]
            count[slot] += 1
        torch.testing.assert_close(total / count.unsqueeze(-1), red.tokens[row])
        torch.testing.assert_close(applied[row, basis_slots], x[basis])


def test_reference_basis_token_among_the_targets() -> None:
    # Every token but x4, x5 lies in span(e0, e1) = span of the basis [x0, x1]; with the ridge (fp64) the
    # residuals are x5: 2, x4: 1, x1: 1.1e-6, x0: 1e-6, x2: 7.9e-7, x3: 3e-7. So idx = topk(e, 5) =
    # [5, 4, 1, 0, 2]: basis token x1 is a target, and the overwritten slots [0, 2] get x0, x1 (FPS order).
    tokens = torch.tensor(
        [
            [10.0, 0.0, 0.0, 0.0],
            [0.0, 9.0, 0.0, 0.0],
            [5.0, 5.0, 0.0, 0.0],
            [3.0, 0.3, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 2.0],
        ],
        dtype=torch.float64,
    ).unsqueeze(0)
    x = tokens[0]
    red = ApET(num_keep=5, num_basis=2, variant="reference")(tokens)
    assert red.indices.tolist() == [[0, 1, 2, 4, 5]]
    torch.testing.assert_close(red.tokens[0], torch.stack([x[0], (x[1] + x[3]) / 2, x[1], x[4], x[5]]))
    positions, expected = _loop_apet(x, 5, 2, variant="reference")
    assert red.indices[0].tolist() == positions
    torch.testing.assert_close(red.tokens[0], expected)
    # x1 stays with its own target slot in the plan, so the slot its features also fill (position 2) is
    # attributed to the overwritten original there, x2.
    assert red.assignment.tolist() == [[0, 1, 2, 1, 3, 4]]
    assert red.sizes.tolist() == [[1.0, 2.0, 1.0, 1.0, 1.0]]
    torch.testing.assert_close(red.apply(tokens)[0, 2], x[2])


@pytest.mark.parametrize("seed", [3, 4])
def test_reference_plan_with_budget_close_to_n(seed: int) -> None:
    # K = N - 1 and N = N - 2 on rank-deficient tokens: the plan stays complete, the tokens match the oracle.
    tokens = make_tokens(2, 12, 3, seed=seed, dtype=torch.float64)
    for num_keep in (10, 11):
        red = ApET(num_keep=num_keep, num_basis=4, variant="reference")(tokens)
        occupied = torch.zeros(2, num_keep, dtype=torch.float32)
        occupied.scatter_add_(1, red.assignment.clamp_min(0), red.weights)
        torch.testing.assert_close(occupied, torch.ones(2, num_keep))
        assert float(red.sizes.sum()) == float((red.assignment >= 0).sum())
        for row in range(2):
            positions, expected = _loop_apet(tokens[row], num_keep, 4, variant="reference")
            assert red.indices[row].tolist() == positions
            torch.testing.assert_close(red.tokens[row], expected, rtol=1e-6, atol=1e-6)


def test_random_basis_is_seeded() -> None:
    tokens = make_tokens(2, 48, 32, seed=6)
    first = ApET(num_keep=12, num_basis=4, basis="random", seed=3)(tokens)
    again = ApET(num_keep=12, num_basis=4, basis="random", seed=3)(tokens)
    other = ApET(num_keep=12, num_basis=4, basis="random", seed=4)(tokens)
    assert torch.equal(first.indices, again.indices) and torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.indices, other.indices)
    reducer = ApET(num_keep=12, num_basis=4, basis="random", seed=3)
    assert not torch.equal(reducer(tokens).indices, reducer(tokens).indices)  # each call advances the generator
    torch.manual_seed(0)
    unseeded = ApET(num_keep=12, num_basis=4, basis="random")(tokens)
    torch.manual_seed(0)
    assert torch.equal(unseeded.indices, ApET(num_keep=12, num_basis=4, basis="random")(tokens).indices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_cuda_matches_cpu(variant: str) -> None:
    tokens = make_tokens(3, 96, 64, seed=8)
    reducer = ApET(num_keep=24, variant=variant)
    cpu, gpu = reducer(tokens), reducer(tokens.cuda())
    assert torch.equal(cpu.indices, gpu.indices.cpu())
    torch.testing.assert_close(cpu.tokens, gpu.tokens.cpu(), atol=1e-4, rtol=1e-4)


# -- registry, configuration and errors ------------------------------------------------------------------------


def test_registry() -> None:
    reducer = create_reducer("apet", num_keep=8)
    assert isinstance(reducer, ApET) and get_reducer_class("apet") is ApET and ApET.name == "apet"
    assert reducer.config() == {
        "num_keep": 8,
        "keep_ratio": None,
        "num_remove": None,
        "num_basis": 10,
        "ridge": 1e-5,
        "basis": "fps",
        "fps_start": 0,
        "merge": True,
        "variant": "paper",
        "seed": None,
    }
    custom = create_reducer("apet", keep_ratio=0.25, num_basis=4, variant="reference", merge=False)
    assert create_reducer("apet", **custom.config()).config() == custom.config()
    assert isinstance(custom(make_tokens()), Reduction)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_basis": 0}, r"num_basis must be an int >= 1; got 0"),
        ({"num_basis": 2.5}, r"num_basis must be an int >= 1"),
        ({"num_basis": True}, r"num_basis must be an int >= 1"),
        ({"ridge": -1e-3}, r"ridge must be a finite number >= 0"),
        ({"ridge": float("nan")}, r"ridge must be a finite number >= 0"),
        ({"basis": "dpc"}, r"basis must be one of 'fps', 'random'; got 'dpc'"),
        ({"variant": "llava"}, r"variant must be one of 'paper', 'reference'; got 'llava'"),
        ({"fps_start": -1}, r"fps_start must be an int >= 0"),
        ({"merge": "yes"}, r"merge must be True or False"),
        ({"seed": "0"}, r"seed must be an int >= 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ApET(num_keep=4, **kwargs)


def test_bad_budget_and_call() -> None:
    with pytest.raises(BudgetError, match="without a budget"):
        ApET(num_basis=3)(make_tokens())  # built for a schedule, called without one
    assert ApET(num_basis=3)(make_tokens(), num_keep=5).num_kept == 5
    with pytest.raises(TypeError, match="unexpected keyword"):
        ApET(num_keep=4, num_bases=3)
    with pytest.raises(ValueError, match=r"fps_start=30 is out of range for a token set of N=24 tokens"):
        ApET(num_keep=4, fps_start=30)(make_tokens())
    with pytest.raises(ValueError, match="features alone"):
        ApET(num_keep=4)(make_tokens(), scores=torch.rand(3, 24))


def test_docstring_example_runs() -> None:
    result = doctest.testmod(apet_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
