"""The evaluation transform against a straightforward recomputation, and ImageFolder on generated files."""

import random

import pytest
import torch
from PIL import Image

from tokred.mamba import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, load_image, preprocess_image
from tokred.mamba.preprocess import resize_size


def noisy_image(width, height, mode="RGB", seed=0):
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    image.putdata(
        [((x * 255) // width, (y * 255) // height, rng.randrange(256)) for y in range(height) for x in range(width)]
    )
    return image.convert(mode)


def by_hand(image, img_size):
    """Resize shorter side to int(size / 0.875) bicubic, center crop, [0, 1], normalise: pixel by pixel."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    short = int(img_size / 0.875)
    new = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    resized = rgb.resize(new, Image.BICUBIC) if new != (width, height) else rgb
    left = round((new[0] - img_size) / 2)
    top = round((new[1] - img_size) / 2)
    out = torch.empty(3, img_size, img_size)
    pixels = resized.load()
    for y in range(img_size):
        for x in range(img_size):
            r, g, b = pixels[left + x, top + y]
            for c, value in enumerate((r, g, b)):
                out[c, y, x] = (value / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    return out


@pytest.mark.parametrize(("width", "height", "mode"), [(80, 60, "RGB"), (50, 90, "L"), (64, 64, "RGBA"), (37, 41, "P")])
def test_preprocess_matches_a_pixel_by_pixel_recomputation(width, height, mode):
    image = noisy_image(width, height, mode)
    got = preprocess_image(image, img_size=32)
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, by_hand(image, 32), rtol=0, atol=1e-6)


def test_resize_size_is_the_official_one():
    assert resize_size(224) == 256 and resize_size(384) == 438 and resize_size(32) == 36


def test_load_image_reads_and_converts_to_rgb(tmp_path):
    image = noisy_image(70, 50, "L")
    path = tmp_path / "gray.png"
    image.save(path)
    torch.testing.assert_close(load_image(path, img_size=32), preprocess_image(Image.open(path), 32))
    assert load_image(path, img_size=32).shape == (3, 32, 32)
    (tmp_path / "fake.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"fake\.jpg.*not a readable image"):
        load_image(tmp_path / "fake.jpg")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_image_folder_sorts_classes_and_samples_and_skips_non_images(tmp_path):
    for cls, names in {"zebra": ["b.png", "a.jpg"], "apple": ["c.png"], "mango": ["nested/d.png"]}.items():
        for i, name in enumerate(names):
            path = tmp_path / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            noisy_image(40 + i, 30, seed=i).save(path)
    (tmp_path / "zebra" / "notes.txt").write_text("labels were checked by hand")
    (tmp_path / "zebra" / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / "README.md").write_text("top-level files are not classes")
    with pytest.warns(UserWarning, match=r"skipped 1 files.*notes.txt"):
        dataset = ImageFolder(tmp_path, img_size=24)
    assert dataset.classes == ["apple", "mango", "zebra"]
    assert dataset.skipped == 1 and dataset.skipped_files == [tmp_path / "zebra" / "notes.txt"]
    assert [(p.relative_to(tmp_path).as_posix(), label) for p, label in dataset.samples] == [
        ("apple/c.png", 0),
        ("mango/nested/d.png", 1),
        ("zebra/a.jpg", 2),
        ("zebra/b.png", 2),
    ]
    image, label = dataset[3]
    assert image.shape == (3, 24, 24) and label == 2
    torch.testing.assert_close(image, load_image(tmp_path / "zebra" / "b.png", 24))
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "nope")
