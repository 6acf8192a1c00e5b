"""The evaluation preprocessing of Vim and VideoMamba, and an ImageNet-style folder dataset.

The official eval transform (``vim/datasets.py``, timm/DeiT): resize the shorter side to
``int(img_size / 0.875)`` (256 for 224) with PIL bicubic, center-crop ``img_size``, scale to ``[0, 1]`` and
normalise with the ImageNet mean and std. Implemented with PIL and torch only (no torchvision), with the same
rounding as torchvision's ``Resize`` and ``CenterCrop``. A model trained otherwise says how in its
[`PreprocessConfig`][tokred.mamba.preprocess.PreprocessConfig] (``model.preprocess_config``), and
[`load_image`][tokred.mamba.load_image] follows it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from tokred.core.errors import InvalidInputError, MissingFileError

__all__ = [
    "EVAL_CROP_RATIO",
    "IMAGENET_EVAL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "PreprocessConfig",
    "load_image",
    "preprocess_image",
    "resize_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet (RGB, in ``[0, 1]``), timm's ``IMAGENET_DEFAULT_MEAN``."""

IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet (RGB), timm's ``IMAGENET_DEFAULT_STD``."""

EVAL_CROP_RATIO = 0.875
"""Fraction of the resized shorter side that the center crop keeps (224 of 256)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model's input images are prepared: resize the shorter side, center-crop, scale, normalise.

    Attributes:
        mean: Per-channel mean (RGB, in ``[0, 1]``) subtracted after scaling.
        std: Per-channel standard deviation the result is divided by.
        crop_ratio: Fraction of the resized shorter side the center crop keeps; the shorter side is resized to
            ``int(img_size / crop_ratio)`` first (1.0: resize straight to ``img_size``).
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_ratio: float = EVAL_CROP_RATIO

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise InvalidInputError(f"mean and std need 3 values each, std positive; got {self.mean}, {self.std}")
        if not 0.0 < self.crop_ratio <= 1.0:
            raise InvalidInputError(f"crop_ratio must lie in (0, 1]; got {self.crop_ratio}")


IMAGENET_EVAL = PreprocessConfig()
"""The official evaluation transform of the published Vim and VideoMamba checkpoints."""


def resize_size(img_size: int, crop_ratio: float = EVAL_CROP_RATIO) -> int:
    """The shorter side before cropping: ``int(img_size / crop_ratio)`` (256 for 224)."""
    # The small epsilon keeps exact ratios such as 1.0 from rounding one pixel short.
    return int(img_size / crop_ratio + 1e-9)


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    # torchvision's rule: the shorter side becomes `size`, the longer one is scaled and truncated.
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        raise InvalidInputError(f"cannot center-crop {size}×{size} from a {width}×{height} image")
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def preprocess_image(image: Image.Image, img_size: int = 224, config: PreprocessConfig = IMAGENET_EVAL) -> torch.Tensor:
    """Apply a model's evaluation transform to a PIL image (the official ImageNet one by default).

    Args:
        image: Any PIL image; converted to RGB first (grayscale, palette, RGBA, CMYK …).
        img_size: Output side in pixels (the model's ``img_size``).
        config: The transform; a model built by [`create_model`][tokred.mamba.create_model] carries its
            own as ``model.preprocess_config``.

    Returns:
        A normalised float32 tensor ``(3, img_size, img_size)``.

    Examples:
        >>> from PIL import Image
        >>> from tokred.mamba import preprocess_image
        >>> preprocess_image(Image.new("RGB", (320, 240)), img_size=224).shape
        torch.Size([3, 224, 224])
    """
    resized = _resize_shorter_side(image.convert("RGB"), resize_size(img_size, config.crop_ratio))
    image = _center_crop(resized, img_size)
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    tensor = pixels.permute(2, 0, 1).float().div(255.0)  # (3, H, W) in [0, 1]
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return (tensor - mean) / std


def load_image(
    path: str | os.PathLike[str], img_size: int = 224, config: PreprocessConfig = IMAGENET_EVAL
) -> torch.Tensor:
    """Read an image file and apply [`preprocess_image`][tokred.mamba.preprocess_image].

    Args:
        path: The image file.
        img_size: Output side in pixels.
        config: The transform (the model's ``preprocess_config``).

    Returns:
        ``(3, img_size, img_size)`` fp32.

    Raises:
        MissingFileError: If the file does not exist or is a folder (a ``FileNotFoundError``).
        InvalidInputError: If the file is not an image PIL can read (a ``ValueError``).
    """
    path = Path(path)
    if path.is_dir():
        raise MissingFileError(f"{str(path)!r} is a folder, not an image file")
    if not path.exists():
        raise MissingFileError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return preprocess_image(image, img_size, config)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL raises SyntaxError for some bad files
        raise InvalidInputError(f"{str(path)!r} is not a readable image: {error}") from error


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path):  # reads the header only
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


class ImageFolder(Dataset):
    """An ImageNet-style folder: ``root/<class>/<image>``, classes sorted by name, samples sorted by path.

    Every file below a class folder (at any depth) is a candidate; hidden files are ignored. Files that PIL
    cannot identify as images are skipped, named in one ``warnings.warn`` and counted in ``skipped``.

    Args:
        root: The dataset directory, with one sub-folder of images per class.
        img_size: Side of the preprocessed images.
        config: The transform (the model's ``preprocess_config``; the official ImageNet one by default).

    Raises:
        MissingFileError: If ``root`` does not exist or is a file.
        InvalidInputError: If ``root`` has no class sub-folders, or they hold no readable image.

    Attributes:
        classes: Class names (sub-folder names) in label order.
        class_to_idx: Class name → label.
        samples: ``(path, label)`` pairs in the order items are returned.
        skipped: How many files were skipped as not readable images.
        skipped_files: Their paths.

    Examples:
        >>> from tokred.mamba import ImageFolder
        >>> dataset = ImageFolder("imagenet/val", img_size=224)  # doctest: +SKIP
        >>> image, label = dataset[0]                             # doctest: +SKIP
    """

    def __init__(
        self, root: str | os.PathLike[str], img_size: int = 224, config: PreprocessConfig = IMAGENET_EVAL
    ) -> None:
        self.root = Path(root)
        self.img_size = img_size
        self.config = config
        if self.root.is_file():
            raise MissingFileError(
                f"{str(self.root)!r} is a file; expected a folder with one sub-folder of images per class"
            )
        if not self.root.is_dir():
            raise MissingFileError(f"dataset folder {str(self.root)!r} does not exist")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            loose = sum(1 for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))
            found = f"it holds {loose} files but no sub-folders" if loose else "it is empty"
            raise InvalidInputError(
                f"dataset folder {str(self.root)!r} has no class sub-folders ({found}); expected one sub-folder "
                "per class, named after the class, holding that class's images (root/<class>/<image>)"
            )
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        self.skipped_files: list[Path] = []
        for name in self.classes:
            for path in sorted((self.root / name).rglob("*")):
                if not path.is_file() or any(part.startswith(".") for part in path.relative_to(self.root).parts):
                    continue
                if _is_image(path):
                    self.samples.append((path, self.class_to_idx[name]))
                else:
                    self.skipped_files.append(path)
        if not self.samples:
            raise InvalidInputError(
                f"dataset folder {str(self.root)!r} has {len(self.classes)} class sub-folders but no readable image "
                f"in them ({len(self.skipped_files)} other files)"
            )
        if self.skipped_files:
            shown = ", ".join(str(p) for p in self.skipped_files[:5])
            more = f" and {len(self.skipped_files) - 5} more" if len(self.skipped_files) > 5 else ""
            warnings.warn(
                f"ImageFolder({str(self.root)!r}) skipped {len(self.skipped_files)} files that are not readable "
                f"images: {shown}{more}",
                stacklevel=2,
            )

    @property
    def skipped(self) -> int:
        """How many files were skipped as not readable images."""
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """The preprocessed image ``(3, img_size, img_size)`` and its label."""
        path, label = self.samples[index]
        return load_image(path, self.img_size, self.config), label
