"""The procedural scene generator: determinism, recorded ground truth, rendering."""

import pytest
import torch

from tokred.bench.scenes import (
    COLORS,
    NUM_CLASSES,
    POSITIONS,
    SHAPES,
    label_name,
    make_scenes,
    render_scene,
    sample_scene,
)


def test_scene_depends_only_on_split_and_index():
    whole = make_scenes(6, split="test")
    tail = make_scenes(3, split="test", start=3)
    assert torch.equal(whole.images[3:], tail.images)
    assert whole.scenes[3:] == tail.scenes
    again = make_scenes(6, split="test")
    assert torch.equal(whole.images, again.images)


def test_splits_differ():
    train, test = make_scenes(8, split="train"), make_scenes(8, split="test")
    assert not torch.equal(train.images, test.images)
    assert train.scenes != test.scenes


def test_layout_rules_hold():
    for index in range(200):
        scene = sample_scene(index, seed=3, image_size=64, min_objects=2, max_objects=5)
        assert 2 <= len(scene.objects) <= 5
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells)  # one object per cell
        target, *distractors = scene.objects
        assert all(target.radius > d.radius for d in distractors)
        cell = 64 / 3
        for obj in scene.objects:
            row, col = divmod(obj.cell, 3)
            x, y = obj.center
            # the whole object lies inside its own cell, so objects never touch
            assert col * cell <= x - obj.radius and x + obj.radius <= (col + 1) * cell + 1e-6
            assert row * cell <= y - obj.radius and y + obj.radius <= (row + 1) * cell + 1e-6
            assert obj.shape in SHAPES and obj.color in COLORS


def test_rendered_colours_match_the_recorded_objects():
    scenes = make_scenes(20, split="validation", image_size=96)
    assert scenes.images.shape == (20, 3, 96, 96)
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    for image, scene in zip(scenes.images, scenes.scenes, strict=True):
        for obj in scene.objects:
            x, y = (int(c) for c in obj.center)
            pixel = image[:, y, x]  # the centre pixel is inside every shape
            assert torch.allclose(pixel, torch.tensor(COLORS[obj.color]), atol=0.051), (obj, pixel)


def test_background_is_grey():
    scene = sample_scene(0, seed=0)
    image = render_scene(scene)
    background = torch.ones(64, 64, dtype=torch.bool)
    coords = torch.arange(64) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    for obj in scene.objects:
        background &= (xs - obj.center[0]).abs().maximum((ys - obj.center[1]).abs()) > obj.radius
    pixels = image[:, background]
    assert pixels.shape[1] > 64 * 64 // 2
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


def test_labels_and_queries():
    scenes = make_scenes(30, split="train")
    labels = scenes.labels
    assert labels.shape == (30,) and labels.dtype == torch.long
    for label, scene in zip(labels.tolist(), scenes.scenes, strict=True):
        color, shape = label_name(label).split()
        assert (shape, color) == (scene.target.shape, scene.target.color)
        assert scene.count() == len(scene.objects)
        assert sum(scene.count(shape=s) for s in SHAPES) == len(scene.objects)
        for position in POSITIONS:
            obj = scene.at(position)
            assert (obj is None) == all(o.position != position for o in scene.objects)
    assert label_name(0) == "red circle" and label_name(NUM_CLASSES - 1) == "cyan cross"
    # every class occurs in a few hundred scenes
    assert set(make_scenes(400, split="train").labels.tolist()) == set(range(NUM_CLASSES))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": 0}, "count"),
        ({"count": 1, "split": "dev"}, "unknown split"),
        ({"count": 1, "image_size": 16}, "image_size"),
        ({"count": 1, "min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"count": 1, "max_objects": 10}, "max_objects"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_scenes(**kwargs)


def test_label_name_refuses_out_of_range():
    with pytest.raises(ValueError, match="label must lie"):
        label_name(NUM_CLASSES)
