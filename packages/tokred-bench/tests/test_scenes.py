"""The pattern-scene generator: determinism, the recorded ground truth against the pixels, the regime it targets."""

import pytest
import torch

from tokred.bench.scenes import (
    COLORS,
    MAX_OBJECTS,
    NUM_CLASSES,
    PATTERNS,
    label_name,
    make_scenes,
    render_scene,
    sample_scene,
)
from tokred.core.errors import InvalidInputError


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(300, split="validation", image_size=112)


def _saturation(pixels: torch.Tensor) -> torch.Tensor:
    """Max minus min channel of ``(3, ...)`` pixels."""
    return pixels.amax(0) - pixels.amin(0)


def test_a_scene_depends_only_on_its_split_and_index():
    whole = make_scenes(6, split="test")
    tail = make_scenes(3, split="test", start=3)
    assert torch.equal(whole.images[3:], tail.images) and torch.equal(whole.masks[3:], tail.masks)
    assert whole.scenes[3:] == tail.scenes
    assert torch.equal(whole.images, make_scenes(6, split="test").images)
    assert make_scenes(6, split="train").scenes != whole.scenes


def test_the_layout_does_not_depend_on_the_image_size():
    small, large = make_scenes(40, split="test", image_size=64), make_scenes(40, split="test", image_size=112)
    assert small.scenes == large.scenes
    assert torch.allclose(small.coverage, large.coverage, atol=0.03)


def test_the_target_covers_30_to_60_percent_and_the_others_are_small(scenes):
    coverage = scenes.coverage  # (B, K)
    counts = torch.tensor([len(s.objects) for s in scenes.scenes])
    assert counts.min() == 1 and counts.max() == MAX_OBJECTS
    assert coverage[:, 0].min() >= 0.28 and coverage[:, 0].max() <= 0.65
    assert 0.40 <= coverage[:, 0].mean() <= 0.50
    others = coverage[:, 1:][torch.arange(1, MAX_OBJECTS) < counts[:, None]]
    assert others.max() <= 0.11 and (others > 0).all()
    assert (coverage[:, 0:1] > coverage[:, 1:]).all()  # the target is the largest object in every scene
    # Spread over many patches: a 112-px target at 8-px patches fills half or more of about 90 of 196 patches.
    patches = (scenes.patch_coverage(8)[:, 0] >= 0.5).sum(-1).float()
    assert patches.min() >= 50 and 80 <= patches.mean() <= 100


def test_masks_are_the_visible_pixels_of_each_object(scenes):
    assert scenes.masks.dtype == torch.bool and scenes.masks.shape == (300, MAX_OBJECTS, 112, 112)
    assert scenes.masks.sum(1).max() <= 1  # every pixel belongs to at most one object
    for row, scene in enumerate(scenes.scenes):
        assert not scenes.masks[row, len(scene.objects) :].any()


def test_each_object_shows_its_recorded_colour_and_pattern(scenes):
    for image, masks, scene in zip(scenes.images[:100], scenes.masks, scenes.scenes, strict=False):
        for obj, mask in zip(scene.objects, masks, strict=False):
            if mask.sum() < 150:
                continue  # a small object mostly hidden behind another
            pixels = image[:, mask]  # (3, P)
            reference = torch.tensor(COLORS[obj.color])
            # Every shade of the object has the colour's hue: scaled RGB keeps the direction.
            cosine = torch.nn.functional.cosine_similarity(pixels.T, reference[None], dim=1)
            assert cosine.median() > 0.99, (obj, cosine.median())
            brightness = pixels.mean(0) / reference.mean()
            dark = (brightness < 0.7).float().mean()
            if obj.pattern == "plain":
                assert dark < 0.02, (obj, dark)
            else:  # stripes and checks darken about half of it, dots about a quarter
                assert 0.12 < dark < 0.7, (obj, dark)


def test_the_background_is_grey_and_smooth(scenes):
    images, masks = scenes.images[:50], scenes.masks[:50]
    objects = masks.any(1)  # (B, H, W)
    background = _saturation(images.permute(1, 0, 2, 3))[~objects]
    foreground = _saturation(images.permute(1, 0, 2, 3))[objects]
    assert torch.quantile(background, 0.99) < 0.2 < torch.quantile(foreground, 0.5)
    # 1/f noise, not per-pixel speckle: neighbouring background pixels differ far less than the background varies.
    grey = images.mean(1)
    both = ~objects[:, :, 1:] & ~objects[:, :, :-1]
    steps = (grey[:, :, 1:] - grey[:, :, :-1]).abs()[both]
    assert steps.mean() < 0.35 * grey[~objects].std()


def test_labels_names_and_counts(scenes):
    assert scenes.labels.shape == (300,) and scenes.labels.dtype == torch.long
    assert set(scenes.labels.tolist()) == set(range(NUM_CLASSES))  # every class occurs
    for label, scene in zip(scenes.labels.tolist(), scenes.scenes[:50], strict=False):
        color, pattern = label_name(label).split()
        assert (color, pattern) == (scene.target.color, scene.target.pattern) == tuple(scene.target.name.split())
        assert scene.count() == len(scene.objects)
        assert scene.count(color=color, pattern=pattern) >= 1
        assert scene.count(color=color) == sum(o.color == color for o in scene.objects)
    assert label_name(0) == "red plain" and label_name(NUM_CLASSES - 1) == f"{list(COLORS)[-1]} {PATTERNS[-1]}"


def test_render_scene_equals_the_batch_rendering():
    batch = make_scenes(2, split="train", start=5, image_size=48)
    assert torch.equal(render_scene(sample_scene(6, seed=batch.scenes[1].seed), 48), batch.images[1])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_scenes(2, split="dev"), "unknown split 'dev'"),
        (lambda: make_scenes(0), "count must be >= 1"),
        (lambda: make_scenes(2, image_size=16), "at least 32 pixels"),
        (lambda: label_name(NUM_CLASSES), f"0..{NUM_CLASSES - 1}"),
        (lambda: make_scenes(1, image_size=60).patch_coverage(8), "must divide the image side 60"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises(InvalidInputError, match=message):
        call()
