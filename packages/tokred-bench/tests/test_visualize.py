"""Drawing reductions with Pillow: patch states, true colours under the marks, text around, tiling."""

import numpy as np
import pytest
import torch
from PIL import Image

from tokred.bench.visualize import (
    DROPPED,
    KEPT,
    MERGED,
    cluster_colors,
    draw_legend,
    draw_reduction,
    image_to_pil,
    patch_states,
    tile_pictures,
)
from tokred.core import Reduction, create_reducer
from tokred.core.errors import InvalidInputError, InvalidTypeError, TokredError


def _plan(assignment, indices, n_keep):
    assignment = torch.tensor([assignment])
    tokens = torch.zeros(1, n_keep, 2)
    weights = (assignment >= 0).float()
    sizes = torch.zeros(1, n_keep).scatter_add(1, assignment.clamp_min(0), weights)
    return Reduction(tokens, torch.tensor([indices]), sizes, assignment, weights)


# 4 tokens on a 2 x 2 grid: slot 0 at token 0 absorbs token 1; token 2 dropped; slot 1 at token 3 kept alone.
PLAN = ([0, 0, -1, 1], [0, 3], 2)


def _pixels(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture.convert("RGB")).copy()).long()  # (H, W, 3)


def _patchy_image(grid: int, patch: int, seed: int = 0) -> torch.Tensor:
    """A (3, grid*patch, grid*patch) image of saturated, non-grey patches with some texture."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(3, grid, grid, generator=gen) * 0.6 + 0.2
    base[0] = base[0] * 0.3 + 0.7  # clearly red-ish: never grey
    image = base.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return (image + 0.05 * torch.rand(image.shape, generator=gen)).clamp(0, 1)


def _upscaled(image: torch.Tensor, scale: int) -> torch.Tensor:
    return _pixels(image_to_pil(image)).repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def test_patch_states_follow_the_plan():
    plan = _plan(*PLAN)
    state, slot = patch_states(plan)
    assert state.tolist() == [KEPT, MERGED, DROPPED, KEPT]
    assert slot.tolist() == [0, 0, -1, 1]
    # a class token at position 2 is skipped by patch_tokens
    state, slot = patch_states(plan, patch_tokens=[0, 1, 3])
    assert state.tolist() == [KEPT, MERGED, KEPT]
    assert slot.tolist() == [0, 0, 1]


@pytest.mark.parametrize(("patch", "scale"), [(2, 2), (8, 4)])
def test_marks_keep_the_true_colours(patch, scale):
    image = _patchy_image(2, patch)
    picture = draw_reduction(image, _plan(*PLAN), grid=(2, 2), scale=scale, legend=False)
    cell = patch * scale
    assert picture.size == (2 * cell, 2 * cell) and picture.mode == "RGB"
    drawn, original = _pixels(picture), _upscaled(image, scale)

    def part(t, p):
        r, c = divmod(p, 2)
        return t[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]

    border = 1 if cell <= 4 else cell // 4
    inner = (slice(border, cell - border), slice(border, cell - border))
    cluster = torch.tensor(cluster_colors(1)[0])
    slot, merged, dropped, alone = (part(drawn, p) for p in range(4))

    # every patch the model sees keeps its own pixels, the merged one included: no tint
    for p in (0, 1, 3):
        assert torch.equal(part(drawn, p)[inner], part(original, p)[inner]), p
    # the slot that absorbed another patch: thick frame in the cluster's colour
    assert torch.equal(slot[0, 0], cluster) and torch.equal(slot[cell // 2, 0], cluster)
    # the merged patch: a mark of the same colour near its corner, true pixels in the middle of its edges
    corner = [merged[i, i] for i in range(max(1, cell // 8))]
    assert any(torch.equal(pixel, cluster) for pixel in corner)
    assert torch.equal(merged[cell // 2, 0], part(original, 1)[cell // 2, 0])
    # the patch kept alone: white frame
    assert torch.equal(alone[0, 0], torch.tensor([255, 255, 255])) and torch.equal(alone[cell // 2, 0], alone[0, 0])
    # the dropped patch: grey everywhere and darker than the image
    assert (dropped[..., 0] == dropped[..., 1]).all() and (dropped[..., 1] == dropped[..., 2]).all()
    luminance = part(original, 2).float() @ torch.tensor([0.299, 0.587, 0.114])
    assert (dropped[..., 0].float() < luminance).all()


def test_a_red_patch_merged_elsewhere_stays_red():
    image = torch.zeros(3, 8, 8)
    image[:, :, :4] = torch.tensor([0.9, 0.15, 0.1])[:, None, None]  # left half red
    image[:, :, 4:] = torch.tensor([0.15, 0.3, 0.9])[:, None, None]  # right half blue
    plan = _plan([0, 0, 0, 0], [1], 1)  # everything merged into the top-right (blue) patch
    drawn = _pixels(draw_reduction(image, plan, grid=(2, 2), scale=4, legend=False))
    red = _pixels(image_to_pil(image))[0, 0]
    assert red[0] > 200 and red[1] < 50 and red[2] < 50
    assert torch.equal(drawn[8, 8], red)  # a red patch, merged into a blue slot, is drawn red


def test_drawing_a_real_reduction_keeps_the_kept_patches_pixels():
    torch.manual_seed(0)
    image = torch.rand(3, 32, 32)
    reduction = create_reducer("tome", num_keep=5)(torch.randn(2, 16, 8))
    picture = draw_reduction(image, reduction, grid=(4, 4), row=1, scale=4, legend=False)
    assert picture.size == (128, 128)
    state, _ = patch_states(reduction, row=1)
    assert (state == KEPT).sum() == 5
    drawn, upscaled = _pixels(picture), _upscaled(image, 4)
    for patch in torch.nonzero(state != DROPPED).flatten().tolist():
        r, c = divmod(patch, 4)
        inner = (slice(r * 32 + 8, r * 32 + 24), slice(c * 32 + 8, c * 32 + 24))
        assert torch.equal(drawn[inner], upscaled[inner])


def _find(haystack: torch.Tensor, needle: torch.Tensor) -> list[tuple[int, int]]:
    """Every place where ``needle`` appears, unchanged, inside ``haystack``."""
    h, w = needle.shape[:2]
    starts = torch.nonzero((haystack == needle[0, 0]).all(-1)).tolist()
    return [
        (top, left)
        for top, left in starts
        if top + h <= haystack.shape[0]
        and left + w <= haystack.shape[1]
        and torch.equal(haystack[top : top + h, left : left + w], needle)
    ]


def test_title_caption_and_legend_surround_the_unchanged_drawing():
    image = _patchy_image(4, 2, seed=1)
    reduction = create_reducer("tome", num_keep=6)(torch.randn(1, 16, 8))
    bare = draw_reduction(image, reduction, grid=(4, 4), scale=4, legend=False)
    sizes = {}
    for name, kwargs in {
        "title": {"title": "tome · 6 of 16", "legend": False},
        "caption": {"caption": ["Q: what colour is the large object?", "truth: red · dense: red"], "legend": False},
        "legend": {"legend": True},
        "all": {"title": "tome", "caption": ["truth: red"], "legend": True},
    }.items():
        picture = draw_reduction(image, reduction, grid=(4, 4), scale=4, **kwargs)
        sizes[name] = picture.size
        assert picture.height > bare.height, name
        assert len(_find(_pixels(picture), _pixels(bare))) == 1, name
    # text wider than the 32-pixel drawing widens the picture
    assert sizes["legend"][0] > bare.width and sizes["caption"][0] > bare.width
    assert sizes["all"][1] > max(sizes["title"][1], sizes["legend"][1])


def test_the_default_drawing_has_a_legend_and_a_single_caption_string_is_one_line():
    image = _patchy_image(4, 2)
    reduction = create_reducer("tome", num_keep=6)(torch.randn(1, 16, 8))
    bare = draw_reduction(image, reduction, grid=(4, 4), scale=2, legend=False)
    assert draw_reduction(image, reduction, grid=(4, 4), scale=2).height > bare.height
    one = draw_reduction(image, reduction, grid=(4, 4), scale=2, caption="one line", legend=False)
    assert one.size == draw_reduction(image, reduction, grid=(4, 4), scale=2, caption=["one line"], legend=False).size


def test_a_pil_image_draws_like_the_tensor():
    image = _patchy_image(2, 4)
    plan = _plan(*PLAN)
    from_tensor = draw_reduction(image, plan, grid=(2, 2), scale=3, legend=False)
    from_pil = draw_reduction(image_to_pil(image), plan, grid=(2, 2), scale=3, legend=False)
    assert torch.equal(_pixels(from_tensor), _pixels(from_pil))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image": torch.rand(4, 4, 3)}, InvalidInputError, r"\(3, H, W\)"),
        ({"image": torch.zeros(3, 4, 4, dtype=torch.uint8)}, InvalidTypeError, "floating"),
        ({"image": [[0.0]]}, InvalidTypeError, "Tensor"),
        ({"grid": (3, 3)}, InvalidInputError, "does not divide"),
        ({"grid": (1, 2)}, InvalidInputError, "pass patch_tokens"),
        ({"patch_tokens": [0, 1, 2, 9]}, InvalidInputError, "patch_tokens must index"),
        ({"row": 1}, InvalidInputError, "row 1 is out of range"),
        ({"scale": 0}, InvalidInputError, "scale"),
        ({"scale": 1.5}, InvalidTypeError, "scale"),
    ],
)
def test_bad_drawing_arguments_are_refused(kwargs, error, match):
    arguments = {"image": torch.rand(3, 4, 4), "reduction": _plan(*PLAN), "grid": (2, 2)}
    arguments.update(kwargs)
    with pytest.raises(error, match=match) as caught:
        draw_reduction(**arguments)
    assert isinstance(caught.value, TokredError)


def test_image_to_pil_rounds_to_the_nearest_level():
    image = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 0.5, 1.0, 1.7, -0.2, 128.4 / 255]).reshape(1, 1, 8).repeat(3, 1, 1)
    picture = image_to_pil(image)
    assert picture.mode == "RGB" and picture.size == (8, 1)
    assert _pixels(picture)[0, :, 0].tolist() == [0, 0, 1, 128, 255, 255, 0, 128]
    assert image_to_pil(image.double()).tobytes() == picture.tobytes()
    with pytest.raises(InvalidInputError):
        image_to_pil(torch.rand(1, 4, 4))
    with pytest.raises(InvalidTypeError):
        image_to_pil(torch.zeros(3, 4, 4, dtype=torch.int64))


def test_tile_pictures_places_each_picture():
    a = Image.new("RGB", (3, 2), (10, 10, 10))
    b = Image.new("RGB", (2, 4), (20, 20, 20))
    c = Image.new("L", (1, 1), 30)
    grid = tile_pictures([a, b, c], columns=2, padding=1, background=(0, 0, 0))
    assert grid.size == (1 + 2 * (3 + 1), 1 + 2 * (4 + 1)) and grid.mode == "RGB"
    pixels = _pixels(grid)
    assert (pixels[1:3, 1:4] == 10).all() and (pixels[1:5, 5:7] == 20).all() and (pixels[6, 1] == 30).all()
    assert (pixels == 0).all(-1).sum() == grid.width * grid.height - (6 + 8 + 1)
    assert tile_pictures([a], columns=3, padding=8).size == (8 + 3 * (3 + 8), 8 + 2 + 8)
    with pytest.raises(InvalidTypeError):
        tile_pictures([torch.zeros(2, 2, 3)], columns=1)
    with pytest.raises(InvalidInputError):
        tile_pictures([], columns=1)
    with pytest.raises(InvalidInputError):
        tile_pictures([a], columns=0)


def test_a_footer_goes_once_under_the_grid_at_the_left():
    a = Image.new("RGB", (3, 2), (10, 10, 10))
    wide = Image.new("RGB", (20, 3), (40, 40, 40))
    grid = tile_pictures([a, a], columns=2, padding=1, background=(0, 0, 0))
    with_footer = tile_pictures([a, a], columns=2, padding=1, background=(0, 0, 0), footer=wide)
    assert with_footer.size == (1 + 20 + 1, grid.height + 3 + 1)
    pixels = _pixels(with_footer)
    assert (pixels[: grid.height, : grid.width] == _pixels(grid)).all()
    assert (pixels[grid.height : grid.height + 3, 1:21] == 40).all()
    with pytest.raises(InvalidTypeError):
        tile_pictures([a], columns=1, footer=torch.zeros(2, 2, 3))


def test_a_title_goes_once_above_the_grid_and_is_cut_to_its_width():
    a = Image.new("RGB", (60, 40), (10, 10, 10))
    grid = tile_pictures([a, a], columns=2, padding=4, background=(255, 255, 255))
    titled = tile_pictures([a, a], columns=2, padding=4, background=(255, 255, 255), title="dense vs apet")
    top = titled.height - grid.height
    assert titled.width == grid.width and top > 8
    pixels = _pixels(titled)
    assert (pixels[top:] == _pixels(grid)).all(), "the grid moves down by the title's line, unchanged"
    ink = (pixels[:top] < 128).all(-1)
    assert ink.any(), "the title is written"
    long = tile_pictures([a], columns=1, padding=4, title="a title far too long for one small picture " * 4)
    long_ink = (_pixels(long)[: long.height - 48] < 128).all(-1)
    assert long.width == 4 + 60 + 4 and not long_ink[:, -4:].any(), "cut to the figure, margin kept"


def test_the_legend_alone_is_the_key_drawn_under_a_single_drawing():
    image, reduction = torch.rand(3, 16, 16), _plan(*PLAN)
    key = draw_legend(padding=0)
    assert key.mode == "RGB" and key.height > 4 * 22
    assert draw_legend(padding=5).size == (key.width + 10, key.height + 10)
    with_key = _pixels(draw_reduction(image, reduction, grid=(2, 2), scale=4))
    bare = draw_reduction(image, reduction, grid=(2, 2), scale=4, legend=False)
    expected = _pixels(key)
    found = any(
        (with_key[y : y + key.height, 10 : 10 + key.width] == expected).all()
        for y in range(bare.height, with_key.shape[0] - key.height + 1)
    )
    assert found, "draw_reduction's legend is draw_legend's picture"
    with pytest.raises(InvalidInputError):
        draw_legend(padding=-1)


def test_cluster_colours_are_distinct_and_saturated():
    colors = cluster_colors(20)
    assert len(colors) == 20 and len(set(colors)) == 20
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colors)
    values = torch.tensor(colors, dtype=torch.float32)
    assert (torch.cdist(values, values) + 1000 * torch.eye(20)).min() > 15
    assert (torch.cdist(values[:12], values[:12]) + 1000 * torch.eye(12)).min() > 60  # the first dozen: far apart
    assert (values.max(1).values - values.min(1).values).min() > 100  # none is grey or white
    assert cluster_colors(3) == colors[:3] and cluster_colors(0) == []
