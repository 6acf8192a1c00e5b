"""MTR, ToP-ViM and UTR do what their descriptions say, checked on hand-made cases and against loops."""

import pytest
import torch
import torch.nn.functional as F

from tokred.core import create_reducer
from tokred.core.testing import make_tokens
from tokred.mamba import MTR, attach, create_model
from tokred.mamba.layers import ScanDelta
from tokred.mamba.scores import SUPPLIED_SCORES, delta_importance


def test_mtr_groups_by_importance_and_merges_sources_into_nearest_target():
    # 8 tokens ranked by score, remove r = 3 with one Target per Source (target_ratio 1).
    tokens = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, 0.0], [0.0, -1.0], [0.9, 0.0], [0.1, 1.0], [-1.0, 0.1]]]
    )
    scores = torch.tensor([[8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    red = MTR(num_remove=3, target_ratio=1.0)(tokens, scores=scores)
    # r = 3: Keep = tokens 0, 1 (top 2), Target = 2, 3, 4, Source = 5, 6, 7.
    assert red.indices.tolist() == [[0, 1, 2, 3, 4]]
    # Sources go to their most similar *Target*, never to Keep (token 6 is closest to Keep token 1).
    expected_targets = {5: 2, 6: 2, 7: 3}
    for source, target in expected_targets.items():
        sims = {t: F.cosine_similarity(tokens[0, source], tokens[0, t], dim=0).item() for t in (2, 3, 4)}
        assert max(sims, key=sims.get) == target
    assert red.assignment.tolist() == [[0, 1, 2, 3, 4, 2, 2, 3]]
    torch.testing.assert_close(red.tokens[0, 2], tokens[0, [2, 5, 6]].mean(dim=0))
    torch.testing.assert_close(red.tokens[0, 3], tokens[0, [3, 7]].mean(dim=0))
    assert torch.equal(red.tokens[0, :2], tokens[0, :2]), "Keep tokens are untouched"


def test_mtr_prune_ablation_drops_the_least_important():
    tokens = make_tokens(2, 20, 6)
    scores = torch.rand(2, 20, generator=torch.Generator().manual_seed(0))
    red = MTR(num_remove=5, merge=False)(tokens, scores=scores)
    for b in range(2):
        assert red.indices[b].tolist() == sorted(scores[b].argsort(descending=True)[:15].tolist())


def test_mtr_never_merges_into_the_protected_class_token():
    tokens = make_tokens(1, 30, 8)
    scores = torch.rand(1, 30, generator=torch.Generator().manual_seed(1))
    protected = torch.zeros(1, 30, dtype=torch.bool)
    protected[0, 15] = True
    scores[0, 15] = -5.0  # the least important by Δ, yet it must survive unchanged
    red = MTR(num_remove=10)(tokens, scores=scores, protected=protected)
    slot = red.indices[0].tolist().index(15)
    assert torch.equal(red.tokens[0, slot], tokens[0, 15]) and red.sizes[0, slot] == 1


def test_delta_importance_sums_directions_then_reduces_channels():
    fwd = torch.rand(2, 6, 5, generator=torch.Generator().manual_seed(2))  # (B, E, L)
    bwd = torch.rand(2, 6, 5, generator=torch.Generator().manual_seed(3))
    delta = ScanDelta(fwd, bwd)
    torch.testing.assert_close(delta_importance(delta), (fwd + bwd).mean(dim=1))
    torch.testing.assert_close(delta_importance(delta, directions="forward", channel_reduce="max"), fwd.amax(dim=1))
    torch.testing.assert_close(delta_importance(delta, directions="backward"), bwd.mean(dim=1))
    with pytest.raises(ValueError, match="directions"):
        delta_importance(delta, directions="sideways")


def test_mtr_declares_delta_and_asks_for_its_own_reduction_of_it():
    assert MTR.needs_scores == "delta" and "delta" in SUPPLIED_SCORES
    reducer = MTR(directions="backward", channel_reduce="max")
    assert reducer.score_options() == {"directions": "backward", "channel_reduce": "max"}
    assert reducer.budget is None, "MTR() needs no budget: a model's schedule sets it"


def test_mtr_without_a_budget_runs_under_a_schedule():
    model = create_model("vim_test").eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attach(model, MTR(), r=2) as by_instance:
        first = model(x)
    with torch.no_grad(), attach(model, "mtr", r=2) as by_name:
        second = model(x)
    assert torch.equal(first, second)
    assert by_instance.last_stats.tokens == by_name.last_stats.tokens


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_ratio": 0}, "target_ratio"),
        ({"directions": "up"}, "directions"),
        ({"channel_reduce": "sum"}, "channel_reduce"),
    ],
)
def test_mtr_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MTR(num_remove=1, **kwargs)


def test_topvim_keeps_the_largest_clipped_output_mass():
    tokens = make_tokens(2, 16, 5, seed=4)
    red = create_reducer("topvim", num_keep=6)(tokens)
    for b in range(2):
        mass = tokens[b].clamp_min(0).sum(dim=-1)
        assert red.indices[b].tolist() == sorted(mass.argsort(descending=True)[:6].tolist())


def test_utr_merges_half_and_prunes_half_of_the_chosen_sources():
    tokens = make_tokens(1, 20, 6, seed=5, dtype=torch.float64)
    red = create_reducer("utr", num_remove=4)(tokens)
    assert red.num_kept == 16
    assert int(red.dropped_mask.sum()) == 2, "half of the 4 removed tokens are pruned"
    assert int(red.merged_mask.sum()) == 2, "the other half is merged"
    mass = tokens[0].clamp_min(0).sum(dim=-1)
    low_half = set(mass.argsort()[:10].tolist())
    removed = set(torch.nonzero(~red.keep_mask[0]).flatten().tolist())
    assert removed <= low_half, "only the less important half can be removed"
    pruned = set(torch.nonzero(red.dropped_mask[0]).flatten().tolist())
    merged = removed - pruned
    assert min(mass[list(merged)]) >= max(mass[list(pruned)]), "the more important half is the merged one"
