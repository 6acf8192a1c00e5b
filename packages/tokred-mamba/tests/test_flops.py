"""FLOPs counting: the published Vim figures, both conventions, and exact counts of reduced models."""

import math
from types import SimpleNamespace

import pytest

from tokred.core.errors import BudgetError, InvalidInputError
from tokred.mamba.flops import block_flops, count_flops, token_counts
from tokred.mamba.schedule import default_reduce_after, solve_schedule


def vim_sizes(dim, depth=24, stride=16, img_size=224):
    """The attributes count_flops reads, for Vim of width dim (mtr.md §2.4)."""
    return SimpleNamespace(
        embed_dim=dim,
        depth=depth,
        d_inner=2 * dim,
        d_state=16,
        dt_rank=math.ceil(dim / 16),
        d_conv=4,
        patch_size=16,
        stride=stride,
        num_frames=1,
        num_classes=1000,
        img_size=img_size,
        token_reduction=None,
        layers=[None] * depth,
    )


@pytest.mark.parametrize(("dim", "published"), [(192, 1.45), (384, 5.08), (768, 18.87)])
def test_dense_vim_matches_published_one_direction_figures(dim, published):
    gflops = count_flops(vim_sizes(dim)) / 1e9
    assert abs(gflops - published) / published < 0.01


@pytest.mark.parametrize(("dim", "expected"), [(192, 1.82), (384, 5.91), (768, 20.89)])
def test_both_directions_counts_the_second_scan(dim, expected):
    assert abs(count_flops(vim_sizes(dim), convention="both_directions") / 1e9 - expected) < 0.01


def test_block_flops_by_hand_for_vim_tiny():
    # L = 197, D = 192, E = 384, N = 16, R = 12, K = 4 (one direction).
    by_hand = 197 * (384 * 2 * 192 + 384 * 4 + 384 * (12 + 32) + 12 * 384 + 9 * 384 * 16 + 2 * 384 + 384 * 192)
    assert block_flops(vim_sizes(192), 197) == by_hand


def test_reduced_model_is_counted_block_by_block():
    model = vim_sizes(384)
    schedule = {1: 10, 5: 20}
    counts = token_counts(model, schedule=schedule)
    assert counts[:3] == [197, 197, 187] and counts[6] == 167 and counts[-1] == 167
    expected = sum(block_flops(model, c) for c in counts) + 196 * 384 * 768 + 384 * 1000
    assert count_flops(model, schedule=schedule) == expected


def test_stride8_and_other_resolutions_change_the_token_count():
    assert token_counts(vim_sizes(192, stride=8))[0] == 27 * 27 + 1
    assert token_counts(vim_sizes(192), image_size=384)[0] == 24 * 24 + 1


@pytest.mark.parametrize(("cut", "r"), [(0.2, 7), (0.3, 11), (0.4, 14)])
def test_flops_cut_solves_r_on_every_second_block(cut, r):
    model = vim_sizes(768)
    schedule = solve_schedule(model, cut)
    assert set(schedule) == set(default_reduce_after(24)) == set(range(1, 22, 2))
    assert set(schedule.values()) == {r}
    achieved = 1 - count_flops(model, schedule=schedule) / count_flops(model, schedule={})
    assert abs(achieved - cut) < 0.015


def test_impossible_cuts_and_schedules_are_refused():
    model = vim_sizes(192)
    with pytest.raises(BudgetError, match="cannot be met"):
        solve_schedule(model, 0.9, after=[20])
    with pytest.raises(InvalidInputError, match=r"flops_cut must be a fraction in \(0, 1\)"):
        solve_schedule(model, 1.5)
    with pytest.raises(InvalidInputError, match="out of range"):
        solve_schedule(model, 0.3, after=[99])
    with pytest.raises(ValueError, match="convention"):
        count_flops(model, convention="fvcore")


@pytest.mark.parametrize(("name", "published"), [("vim_tiny", 1.45), ("vim_small", 5.08), ("vim_base", 18.87)])
def test_real_models_built_on_meta_reproduce_the_published_figures(name, published):
    import torch

    from tokred.mamba import create_model

    with torch.device("meta"):
        model = create_model(name)
    assert abs(count_flops(model) / 1e9 - published) / published < 0.01
    assert count_flops(model, schedule={}) == count_flops(vim_sizes(model.embed_dim), schedule={})
