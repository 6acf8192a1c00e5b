"""Each baseline does what its paper (or its name) says, checked against independent loops."""

import torch
import torch.nn.functional as F

from tokred.core import create_reducer
from tokred.core.testing import make_tokens


def test_norm_keeps_the_largest_norms():
    tokens = make_tokens(3, 30, 8)
    red = create_reducer("norm", num_keep=9)(tokens)
    for b in range(3):
        norms = tokens[b].norm(dim=-1)
        assert red.indices[b].tolist() == sorted(norms.argsort(descending=True)[:9].tolist())
    assert torch.equal(red.tokens, tokens.gather(1, red.indices.unsqueeze(-1).expand(-1, -1, 8)))


def test_uniform_spreads_slots_evenly():
    tokens = make_tokens(1, 10, 2)
    assert create_reducer("uniform", num_keep=5)(tokens).indices.tolist() == [[1, 3, 5, 7, 9]]
    grid = make_tokens(1, 576, 2)
    kept = create_reducer("uniform", num_keep=64)(grid).indices[0]
    gaps = set((kept[1:] - kept[:-1]).tolist())
    assert gaps == {9}, "576 tokens to 64 is every 9th token"


def test_uniform_skips_protected_positions_when_spacing():
    tokens = make_tokens(1, 9, 2)
    protected = torch.zeros(1, 9, dtype=torch.bool)
    protected[0, 0] = True  # a class token in front
    red = create_reducer("uniform", num_keep=3)(tokens, protected=protected)
    # The 8 patch tokens 1..8 get two evenly spaced slots: ranks 2 and 6 -> positions 3 and 7.
    assert red.indices.tolist() == [[0, 3, 7]]


def test_uniform_merge_pools_into_the_nearest_kept_position():
    tokens = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    red = create_reducer("uniform", num_keep=2, merge=True)(tokens)
    assert red.indices.tolist() == [[1, 4]]
    # 0,1,2 -> 1 (2 ties between 1 and 4? no: |2-1| < |2-4|); 3,4,5 -> 4.
    assert red.assignment.tolist() == [[0, 0, 0, 1, 1, 1]]
    torch.testing.assert_close(red.tokens, torch.tensor([[[1.0], [4.0]]]))


def divprune_brute_force(tokens, k):
    """Max–min diversity, greedy, written from the paper's description as plain loops."""
    n = tokens.shape[0]
    dist = [[1 - F.cosine_similarity(tokens[i], tokens[j], dim=0).item() for j in range(n)] for i in range(n)]
    start = max(range(n), key=lambda i: (min(dist[i][j] for j in range(n) if j != i), -i))
    chosen = [start]
    while len(chosen) < k:
        best = max((i for i in range(n) if i not in chosen), key=lambda i: (min(dist[i][j] for j in chosen), -i))
        chosen.append(best)
    return sorted(chosen)


def test_divprune_matches_greedy_max_min_loop():
    tokens = make_tokens(2, 25, 6, seed=3, dtype=torch.float64)
    red = create_reducer("divprune", num_keep=7)(tokens)
    for b in range(2):
        assert red.indices[b].tolist() == divprune_brute_force(tokens[b], 7)


def test_divprune_is_more_diverse_than_random():
    tokens = make_tokens(4, 60, 16, seed=4)

    def min_pairwise_distance(red):
        unit = F.normalize(red.tokens, dim=-1)
        dist = 1 - unit @ unit.transpose(1, 2)
        dist = dist + torch.eye(red.tokens.shape[1]) * 10
        return dist.amin(dim=(1, 2))

    diverse = min_pairwise_distance(create_reducer("divprune", num_keep=10)(tokens))
    random = min_pairwise_distance(create_reducer("random", num_keep=10, seed=0)(tokens))
    assert (diverse > random).all()


def test_random_is_seeded_and_roughly_uniform():
    tokens = make_tokens(1, 20, 2)
    a = create_reducer("random", num_keep=5, seed=3)
    b = create_reducer("random", num_keep=5, seed=3)
    first = [a(tokens).indices for _ in range(3)]
    second = [b(tokens).indices for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1]), "successive calls draw new subsets"
    counts = torch.zeros(20)
    reducer = create_reducer("random", num_keep=5, seed=0)
    for _ in range(400):
        counts[reducer(tokens).indices[0]] += 1
    assert counts.min() > 60 and counts.max() < 140  # expected 100 per position


def tome_one_round_loop(tokens, r):
    """One ToMe round written as loops: alternate split, best match, merge the r best pairs (plain mean)."""
    n = tokens.shape[0]
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    best = {i: max(b, key=lambda j: (F.cosine_similarity(tokens[i], tokens[j], dim=0).item(), -j)) for i in a}
    score = {i: F.cosine_similarity(tokens[i], tokens[best[i]], dim=0).item() for i in a}
    merged = sorted(a, key=lambda i: (-score[i], i))[:r]
    groups = {j: [j] for j in range(n) if j not in merged}
    for i in merged:
        groups[best[i]].append(i)
    kept = sorted(groups)
    return kept, torch.stack([tokens[groups[j]].mean(dim=0) for j in kept])


def test_tome_single_round_matches_loop():
    tokens = make_tokens(2, 16, 5, seed=5, dtype=torch.float64)
    red = create_reducer("tome", num_keep=11)(tokens)
    for b in range(2):
        kept, merged = tome_one_round_loop(tokens[b], 5)
        assert red.indices[b].tolist() == kept
        torch.testing.assert_close(red.tokens[b], merged)


def test_tome_multi_round_equals_repeated_single_rounds():
    tokens = make_tokens(1, 40, 6, seed=6, dtype=torch.float64)
    once = create_reducer("tome", num_keep=5)(tokens)
    # 40 -> 20 -> 10 -> 5, each a full round; chaining single-round reductions must agree.
    step1 = create_reducer("tome", num_keep=20)(tokens)
    step2 = create_reducer("tome", num_keep=10)(step1.tokens, sizes=step1.sizes)
    step3 = create_reducer("tome", num_keep=5)(step2.tokens, sizes=step2.sizes)
    chained = step1.compose(step2).compose(step3)
    assert torch.equal(once.indices, chained.indices)
    assert torch.equal(once.assignment, chained.assignment)
    torch.testing.assert_close(once.tokens, chained.tokens)
    assert once.sizes.sum().item() == 40


def test_tome_merges_duplicates_first():
    base = make_tokens(1, 6, 8, seed=7)
    tokens = base.repeat_interleave(2, dim=1)  # x0 x0 x1 x1 ...: each A token's twin sits in B
    red = create_reducer("tome", num_keep=6)(tokens)
    assert red.sizes.tolist() == [[2.0] * 6]
    assert red.indices.tolist() == [[1, 3, 5, 7, 9, 11]]
    torch.testing.assert_close(red.tokens, base)


def test_topk_keeps_the_best_scores_and_merges_into_its_survivors():
    tokens = make_tokens(2, 12, 4)
    scores = torch.tensor([[5, 1, 9, 0, 3, 8, 2, 7, 4, 6, 1, 0], [0] * 11 + [1]], dtype=torch.float32)
    dropped = create_reducer("topk", num_keep=3)(tokens, scores=scores)
    assert dropped.indices.tolist() == [[2, 5, 7], [0, 1, 11]]  # ties to the lower position
    merged = create_reducer("topk", num_keep=3, merge=True)(tokens, scores=scores)
    assert torch.equal(merged.indices, dropped.indices)
    assert merged.sizes.sum(dim=1).tolist() == [12.0, 12.0]
