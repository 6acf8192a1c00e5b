"""Reduction: building plans, applying them to other tensors, composing them."""

import pytest
import torch
import torch.nn.functional as F

from tokred.core import Reduction, create_reducer
from tokred.core.testing import make_tokens


def test_from_targets_builds_size_weighted_means():
    tokens = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)
    kept = torch.tensor([[1, 4]])
    targets = torch.tensor([[1, 1, -1, 4, 4, 1]])
    sizes = torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0, 2.0]])
    red = Reduction.from_targets(tokens, kept, targets, sizes)
    expected_0 = (1 * tokens[0, 0] + 3 * tokens[0, 1] + 2 * tokens[0, 5]) / 6
    expected_1 = (tokens[0, 3] + tokens[0, 4]) / 2
    torch.testing.assert_close(red.tokens[0], torch.stack([expected_0, expected_1]))
    assert red.sizes.tolist() == [[6.0, 2.0]]
    assert red.assignment.tolist() == [[0, 0, -1, 1, 1, 0]]
    assert red.keep_mask.tolist() == [[False, True, False, False, True, False]]
    assert red.merged_mask.tolist() == [[True, False, False, True, False, True]]
    assert red.dropped_mask.tolist() == [[False, False, True, False, False, False]]


@pytest.mark.parametrize(
    ("kept", "targets", "match"),
    [
        ([[1, 4]], [[1, 1, 1, 2, 4, 4]], "every target must be a kept position"),
        ([[1, 4]], [[1, 4, 1, 4, 4, 4]], "kept tokens must target themselves"),
        ([[1, 1]], [[1, 1, 1, 1, 1, 1]], "distinct"),
    ],
)
def test_from_targets_rejects_inconsistent_plans(kept, targets, match):
    with pytest.raises(ValueError, match=match):
        Reduction.from_targets(torch.randn(1, 6, 2), torch.tensor(kept), torch.tensor(targets))


def test_apply_select_and_merge_on_other_tensors():
    tokens = make_tokens(2, 20, 8)
    red = create_reducer("tome", num_keep=5)(tokens)
    positions = torch.arange(20).expand(2, 20)
    assert torch.equal(red.apply(positions, how="select"), red.indices)
    mrope = torch.stack([positions, positions * 2, positions * 3], dim=-1)  # (B, N, 3) like Qwen's M-RoPE
    assert torch.equal(red.apply(mrope, how="select")[..., 1], red.indices * 2)
    residual = make_tokens(2, 20, 3, seed=5, dtype=torch.float16)
    merged = red.apply(residual)
    assert merged.shape == (2, 5, 3) and merged.dtype == torch.float16
    with pytest.raises(TypeError, match="how='select'"):
        red.apply(positions)
    with pytest.raises(ValueError, match="how must be"):
        red.apply(residual, how="mean")
    with pytest.raises(ValueError, match=r"\(B, N\) = \(2, 20\)"):
        red.apply(torch.randn(2, 19, 3))


def test_compose_equals_sequential_application():
    tokens = make_tokens(2, 30, 6, seed=3)
    first = create_reducer("uniform", num_keep=20, merge=True)(tokens)
    second = create_reducer("tome", num_keep=8)(first.tokens, sizes=first.sizes)
    chained = first.compose(second)
    torch.testing.assert_close(chained.tokens, second.tokens)
    torch.testing.assert_close(chained.apply(tokens), second.tokens, atol=1e-5, rtol=1e-5)
    other = make_tokens(2, 30, 4, seed=4)
    torch.testing.assert_close(chained.apply(other), second.apply(first.apply(other)), atol=1e-5, rtol=1e-5)
    assert torch.equal(chained.indices, first.indices.gather(1, second.indices))
    torch.testing.assert_close(chained.sizes.sum(dim=1), torch.full((2,), 30.0))
    with pytest.raises(ValueError, match="cannot compose"):
        second.compose(first)


def test_compose_tracks_dropped_tokens():
    tokens = make_tokens(1, 10, 4)
    first = create_reducer("norm", num_keep=6)(tokens)
    second = create_reducer("norm", num_keep=3)(first.tokens)
    chained = first.compose(second)
    assert int(chained.dropped_mask.sum()) == 7
    assert torch.equal(chained.tokens, tokens[0:1, chained.indices[0]])


def test_identity_keeps_everything():
    tokens = make_tokens(2, 5, 3)
    red = Reduction.identity(tokens, sizes=torch.full((2, 5), 2.0))
    assert torch.equal(red.tokens, tokens) and red.sizes.sum().item() == 20.0
    assert torch.equal(red.apply(tokens), tokens)


def test_inconsistent_fields_are_rejected():
    with pytest.raises(ValueError, match="inconsistent Reduction"):
        Reduction(
            torch.zeros(1, 3, 2),
            torch.zeros(1, 2, dtype=torch.long),
            torch.ones(1, 2),
            torch.zeros(1, 4, dtype=torch.long),
            torch.ones(1, 4),
        )


def test_merge_into_nearest_matches_a_loop_and_respects_allowed():
    tokens = make_tokens(2, 20, 6, seed=8, dtype=torch.float64)
    kept = torch.tensor([[1, 5, 9, 14], [0, 3, 4, 19]])
    allowed = torch.tensor([[True, False, True, True], [False, True, True, True]])
    red = Reduction.merge_into_nearest(tokens, kept, allowed=allowed)
    for b in range(2):
        targets = [kept[b, j].item() for j in range(4) if allowed[b, j]]
        groups = {k.item(): [k.item()] for k in kept[b]}
        for i in range(20):
            if i in groups:
                continue
            sims = {t: F.cosine_similarity(tokens[b, i], tokens[b, t], dim=0).item() for t in targets}
            groups[max(targets, key=lambda t: (sims[t], -t))].append(i)
        expected = torch.stack([tokens[b, groups[k.item()]].mean(dim=0) for k in kept[b]])
        torch.testing.assert_close(red.tokens[b], expected)
    assert red.sizes[0, 1] == 1 and red.sizes[1, 0] == 1, "a slot that may not receive merges stays alone"


def test_merge_into_nearest_without_allowed_slots_drops():
    tokens = make_tokens(1, 6, 3)
    red = Reduction.merge_into_nearest(tokens, torch.tensor([[2, 4]]), allowed=torch.zeros(1, 2, dtype=torch.bool))
    assert red.dropped_mask.sum() == 4 and torch.equal(red.tokens, tokens[:, [2, 4]])


def test_merge_rounds_track_owners_sums_and_padding():
    from tokred.core import MergeRounds

    tokens = torch.arange(12, dtype=torch.float32).reshape(2, 6, 1)
    rounds = MergeRounds(tokens, sizes=torch.tensor([[1.0, 2, 1, 1, 1, 1], [1.0] * 6]))
    # Row 0: 1 -> 2 (merge), 4 dropped. Row 1: only 0 -> 5, the second entry is padding.
    rounds.remove(torch.tensor([[1, 4], [0, -1]]), torch.tensor([[2, -1], [5, -1]]))
    assert rounds.alive.tolist() == [[True, False, True, True, False, True], [False, True, True, True, True, True]]
    assert rounds.excess(4).tolist() == [0, 1]
    rounds.remove(torch.tensor([[-1], [2]]), torch.tensor([[-1], [5]]))  # a second round for row 1 only
    assert rounds.owner.tolist() == [[0, 2, 2, 3, -1, 5], [5, 1, 5, 3, 4, 5]]
    red = rounds.finish(4)
    assert red.indices.tolist() == [[0, 2, 3, 5], [1, 3, 4, 5]]
    torch.testing.assert_close(red.tokens[0, 1, 0], torch.tensor((2 * 1.0 + 1 * 2.0) / 3))  # size-weighted
    torch.testing.assert_close(red.tokens[1, 3, 0], torch.tensor((6.0 + 8.0 + 11.0) / 3))
    torch.testing.assert_close(rounds.means()[1, 5, 0], red.tokens[1, 3, 0])
