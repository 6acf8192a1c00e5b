"""Pattern scenes: large patterned objects on natural-looking backgrounds, with the ground truth recorded.

The headline reference models of tokred-bench are trained and measured on these scenes. They are built to
resemble what real checkpoints see in photographs: the evidence for an answer is spread over many patches.

* **Objects** are smooth blobs (an ellipse with a wavy outline). The *target* covers roughly 30-60% of the
  image; zero to two smaller objects (about 5-10% each) may stand beside or in front of it. Every object has a
  colour and a surface pattern; a class is colour × pattern
  ([`COLORS`][tokred.bench.scenes.COLORS] × [`PATTERNS`][tokred.bench.scenes.PATTERNS], 24
  classes), so no single patch and no outline decides it.
* **Backgrounds** are 1/f ("pink") noise over a gentle colour gradient, with two to four mid-size grey
  *clutter* blobs that carry the same patterns as the objects but no colour.

Scenes are deterministic: scene ``i`` of a split depends only on the split's seed and ``i``, never on how many
scenes are drawn at once, in which order, or at which image size (the layout is in relative coordinates), so a
held-out split is the same on every machine.

Examples:
    >>> from tokred.bench.scenes import make_scenes
    >>> scenes = make_scenes(4, split="test", image_size=112)
    >>> scenes.images.shape, scenes.masks.shape
    (torch.Size([4, 3, 112, 112]), torch.Size([4, 3, 112, 112]))
    >>> scene = scenes.scenes[0]
    >>> scene.target.pattern in PATTERNS, 1 <= len(scene.objects) <= 3
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokred.core.errors import InvalidInputError

__all__ = [
    "COLORS",
    "MAX_OBJECTS",
    "NUM_CLASSES",
    "PATTERNS",
    "SPLIT_SEEDS",
    "Scene",
    "SceneObject",
    "SceneSet",
    "label_name",
    "make_scenes",
    "render_scene",
    "sample_scene",
]

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.16, 0.12),
    "green": (0.18, 0.65, 0.22),
    "blue": (0.16, 0.32, 0.88),
    "yellow": (0.92, 0.80, 0.18),
    "purple": (0.58, 0.22, 0.72),
    "cyan": (0.12, 0.74, 0.80),
}
"""Object colours (RGB in ``[0, 1]``), in label order; all saturated, unlike the background and its clutter."""

PATTERNS: tuple[str, ...] = ("plain", "striped", "checked", "dotted")
"""Surface patterns, in label order. Stripes, checks and dots alternate the colour with a darker shade of it
(the same hue), at a period of one to two 8-pixel patches of a 112-pixel image."""

SPLIT_SEEDS: dict[str, int] = {"train": 10, "validation": 11, "test": 12}
"""Seed of each named split; a split is an infinite, indexable stream of scenes."""

NUM_CLASSES: int = len(PATTERNS) * len(COLORS)
"""Number of object classes (pattern × colour)."""

MAX_OBJECTS = 3
"""The most objects in a scene, target included."""

_MIN_SIZE = 32


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene, in coordinates relative to the image side (``0 .. 1``, from the top left).

    Attributes:
        color: One of [`COLORS`][tokred.bench.scenes.COLORS].
        pattern: One of [`PATTERNS`][tokred.bench.scenes.PATTERNS].
        center: ``(x, y)`` of the blob's centre.
        radius: Mean radius of the blob's outline.
        aspect: Ratio of the blob's two axes (before the wavy outline).
        angle: Rotation of the blob's axes and of its pattern, in radians.
        harmonics: ``(amplitude, phase)`` of the outline's waves of order 2, 3 and 4.
        period: Period of the pattern (stripe pitch, check size times two, dot spacing).
        phase: Offset of the pattern, in periods.
    """

    color: str
    pattern: str
    center: tuple[float, float]
    radius: float
    aspect: float
    angle: float
    harmonics: tuple[tuple[float, float], ...]
    period: float
    phase: tuple[float, float]

    @property
    def label(self) -> int:
        """Class index ``pattern * len(COLORS) + colour``.

        See [`label_name`][tokred.bench.scenes.label_name].
        """
        return PATTERNS.index(self.pattern) * len(COLORS) + list(COLORS).index(self.color)

    @property
    def name(self) -> str:
        """``"<colour> <pattern>"``, e.g. ``"red striped"``."""
        return f"{self.color} {self.pattern}"


@dataclass(frozen=True)
class Scene:
    """The ground truth of one scene.

    Attributes:
        objects: The objects, the target (the large one) first; later objects are drawn over earlier ones.
        clutter: Grey background blobs, as objects whose colour is ``"grey"``.
        index: Index of the scene in its split.
        seed: Seed of its split.
    """

    objects: tuple[SceneObject, ...]
    clutter: tuple[SceneObject, ...]
    index: int
    seed: int

    @property
    def target(self) -> SceneObject:
        """The large object (the classification target)."""
        return self.objects[0]

    @property
    def label(self) -> int:
        """Class index of the target."""
        return self.target.label

    def count(self, color: str | None = None, pattern: str | None = None) -> int:
        """How many objects have the given colour and/or pattern (all objects when both are None)."""
        return sum(
            (color is None or o.color == color) and (pattern is None or o.pattern == pattern) for o in self.objects
        )


@dataclass(frozen=True)
class SceneSet:
    """A batch of rendered scenes.

    Attributes:
        images: fp32 ``(B, 3, H, W)`` in ``[0, 1]``.
        masks: bool ``(B, MAX_OBJECTS, H, W)``: the visible pixels of each object (object ``k`` of
            ``scenes[b].objects``; all False beyond a scene's objects).
        scenes: The ground truth of each image.
    """

    images: torch.Tensor
    masks: torch.Tensor
    scenes: tuple[Scene, ...]

    @property
    def labels(self) -> torch.Tensor:
        """Long ``(B,)``: the target class of each scene."""
        return torch.tensor([s.label for s in self.scenes], dtype=torch.long)

    @property
    def coverage(self) -> torch.Tensor:
        """fp32 ``(B, MAX_OBJECTS)``: the share of the image each object's visible pixels cover."""
        return self.masks.flatten(2).float().mean(-1)

    def patch_coverage(self, patch_size: int) -> torch.Tensor:
        """fp32 ``(B, MAX_OBJECTS, P)``: the share of each non-overlapping patch (row-major) each object covers.

        Raises:
            InvalidInputError: If ``patch_size`` does not divide the image side.
        """
        side = self.images.shape[-1]
        if patch_size < 1 or side % patch_size:
            raise InvalidInputError(f"patch_size must divide the image side {side}; got {patch_size}")
        return torch.nn.functional.avg_pool2d(self.masks.float(), patch_size).flatten(2)

    def __len__(self) -> int:
        return len(self.scenes)


def label_name(label: int) -> str:
    """The name of a class index, colour first: ``label_name(0) == "red plain"``.

    Raises:
        InvalidInputError: If ``label`` is not in ``0 .. NUM_CLASSES - 1``.
    """
    if not 0 <= label < NUM_CLASSES:
        raise InvalidInputError(f"label must lie in 0..{NUM_CLASSES - 1}; got {label}")
    pattern, color = divmod(label, len(COLORS))
    return f"{list(COLORS)[color]} {PATTERNS[pattern]}"


def _generator(seed: int, index: int, stream: int) -> torch.Generator:
    # One generator per (scene, stream), seeded from those alone: scene i is the same however it is drawn.
    return torch.Generator().manual_seed(((seed * 1_000_003 + index) * 7 + stream) % (2**63 - 1))


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def _choice(gen: torch.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(torch.randint(len(options), (), generator=gen))]


def _blob(gen: torch.Generator, color: str, pattern: str, center: tuple[float, float], radius: float) -> SceneObject:
    harmonics = tuple((_uniform(gen, 0.0, 0.08), _uniform(gen, 0.0, 2 * math.pi)) for _ in range(3))
    return SceneObject(
        color=color,
        pattern=pattern,
        center=center,
        radius=radius,
        aspect=_uniform(gen, 0.8, 1.25),
        angle=_uniform(gen, 0.0, math.pi),
        harmonics=harmonics,
        period=_uniform(gen, 0.09, 0.13),
        phase=(_uniform(gen, 0.0, 1.0), _uniform(gen, 0.0, 1.0)),
    )


def sample_scene(index: int, *, seed: int = SPLIT_SEEDS["train"]) -> Scene:
    """Draw the layout of scene ``index`` of a split (no rendering).

    The target's area is drawn from 34-62% of the image (its outline may leave the frame a little, and smaller
    objects may hide part of it, so the visible share is somewhat less); each further object from 5-10%.

    Args:
        index: Index of the scene, ``>= 0``.
        seed: Seed of the split.

    Returns:
        The scene's ground truth.
    """
    gen = _generator(seed, index, 0)
    colors = list(COLORS)
    count = 1 + int(torch.randint(MAX_OBJECTS, (), generator=gen))
    radius = math.sqrt(_uniform(gen, 0.34, 0.62) / math.pi)
    slack = max(0.5 - 0.8 * radius, 0.02)
    center = (0.5 + _uniform(gen, -slack, slack), 0.5 + _uniform(gen, -slack, slack))
    objects = [_blob(gen, _choice(gen, colors), _choice(gen, PATTERNS), center, radius)]
    for _ in range(count - 1):
        small = math.sqrt(_uniform(gen, 0.05, 0.10) / math.pi)
        # The place farthest from the objects so far, among a few candidates: beside the target where there is
        # room, partly in front of it where there is not.
        best, best_gap = (0.5, 0.5), -math.inf
        for _ in range(12):
            x, y = _uniform(gen, small, 1 - small), _uniform(gen, small, 1 - small)
            gap = min(math.dist((x, y), o.center) - o.radius - small for o in objects)
            if gap > best_gap:
                best, best_gap = (x, y), gap
        objects.append(_blob(gen, _choice(gen, colors), _choice(gen, PATTERNS), best, small))
    clutter = tuple(
        _blob(
            gen,
            "grey",
            _choice(gen, PATTERNS),
            (_uniform(gen, 0.05, 0.95), _uniform(gen, 0.05, 0.95)),
            math.sqrt(_uniform(gen, 0.02, 0.06) / math.pi),
        )
        for _ in range(2 + int(torch.randint(3, (), generator=gen)))
    )
    return Scene(tuple(objects), clutter, index, seed)


def _pink_noise(gen: torch.Generator, channels: int, size: int) -> torch.Tensor:
    """``(channels, size, size)`` noise with a 1/f amplitude spectrum, zero mean and unit standard deviation.

    Drawn at a fixed 64 x 64 and resized, so that a scene looks the same at every image size.
    """
    base = 64
    freq = torch.fft.fftfreq(base)
    radial = (freq[:, None].square() + freq[None, :].square()).sqrt().clamp(min=1.0 / base)
    spectrum = torch.randn((channels, base, base), generator=gen) / radial
    field = torch.fft.ifft2(spectrum * torch.exp(2j * math.pi * torch.rand((channels, base, base), generator=gen)))
    field = field.real
    field = (field - field.mean((1, 2), keepdim=True)) / field.std(dim=(1, 2), keepdim=True)
    return torch.nn.functional.interpolate(field[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def _outline_mask(obj: SceneObject, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Where the blob ``obj`` covers the pixel centres ``(xs, ys)`` (relative coordinates)."""
    dx, dy = xs - obj.center[0], ys - obj.center[1]
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    stretch = math.sqrt(obj.aspect)
    u, v = u / stretch, v * stretch
    theta = torch.atan2(v, u)
    edge = obj.radius * (1 + sum(a * torch.cos(k * theta + p) for k, (a, p) in enumerate(obj.harmonics, 2)))
    return u.square() + v.square() <= edge.square()


def _pattern_mask(obj: SceneObject, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Where the pattern of ``obj`` takes its darker shade (all False for ``"plain"``)."""
    if obj.pattern == "plain":
        return torch.zeros_like(xs, dtype=torch.bool)
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    # Pattern coordinates in periods, rotated with the blob.
    u = (xs * cos + ys * sin) / obj.period + obj.phase[0]
    v = (-xs * sin + ys * cos) / obj.period + obj.phase[1]
    if obj.pattern == "striped":
        return torch.remainder(u, 1.0) < 0.5
    if obj.pattern == "checked":
        return (torch.floor(2 * u) + torch.floor(2 * v)).remainder(2) == 0
    if obj.pattern == "dotted":
        return (u - u.round()).square() + (v - v.round()).square() < 0.28**2
    raise InvalidInputError(f"unknown pattern {obj.pattern!r}; expected one of {PATTERNS}")


def _render(scene: Scene, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image ``(3, H, W)`` and the visible-pixel masks ``(MAX_OBJECTS, H, W)`` of a scene."""
    gen = _generator(scene.seed, scene.index, 1)  # a stream apart from the layout's
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")

    base = _uniform(gen, 0.35, 0.6)
    tilt = _uniform(gen, 0.0, 2 * math.pi)
    gradient = 0.18 * ((xs - 0.5) * math.cos(tilt) + (ys - 0.5) * math.sin(tilt))
    tint = (torch.rand(3, generator=gen) - 0.5) * 0.08
    noise = _pink_noise(gen, 2, size)
    grey = base + gradient + 0.09 * noise[0]
    image = grey[None] + tint[:, None, None] + 0.025 * noise[1][None]  # low, smooth saturation

    for blob in scene.clutter:
        inside = _outline_mask(blob, xs, ys)
        level = _uniform(gen, 0.25, 0.75)
        shade = torch.where(_pattern_mask(blob, xs, ys), level * 0.55, level)
        image = torch.where(inside, shade.expand(3, size, size), image)

    masks = torch.zeros((MAX_OBJECTS, size, size), dtype=torch.bool)
    for k, obj in enumerate(scene.objects):
        inside = _outline_mask(obj, xs, ys)
        color = (torch.tensor(COLORS[obj.color]) + (torch.rand(3, generator=gen) - 0.5) * 0.08).clamp(0, 1)
        # Soft light across the object, so that it is not a flat cut-out.
        light = 1 + 0.12 * ((xs - obj.center[0]) * math.cos(tilt) + (ys - obj.center[1]) * math.sin(tilt))
        factor = torch.where(_pattern_mask(obj, xs, ys), 0.45, 1.0) * light
        image = torch.where(inside, color[:, None, None] * factor, image)
        masks[:k] &= ~inside
        masks[k] = inside
    image = image + 0.012 * torch.randn(image.shape, generator=gen)  # sensor noise, far below a pattern's contrast
    return image.clamp(0, 1), masks


def render_scene(scene: Scene, image_size: int = 112) -> torch.Tensor:
    """Render a scene to an fp32 image ``(3, image_size, image_size)`` in ``[0, 1]``.

    Raises:
        InvalidInputError: If ``image_size`` is below 32 pixels.
    """
    _check_size(image_size)
    return _render(scene, image_size)[0]


def _check_size(image_size: int) -> None:
    if image_size < _MIN_SIZE:
        raise InvalidInputError(
            f"image_size must be at least {_MIN_SIZE} pixels so patterns stay visible; got {image_size}"
        )


def make_scenes(count: int, *, split: str = "train", start: int = 0, image_size: int = 112) -> SceneSet:
    """Draw and render scenes ``start .. start + count - 1`` of a split.

    Args:
        count: Number of scenes, ``>= 1``.
        split: ``"train"``, ``"validation"`` or ``"test"`` (see
            [`SPLIT_SEEDS`][tokred.bench.scenes.SPLIT_SEEDS]).
        start: Index of the first scene.
        image_size: Side of the square images in pixels, at least 32.

    Returns:
        The images ``(count, 3, image_size, image_size)``, the objects' masks and their ground truth.

    Raises:
        InvalidInputError: On an unknown split or out-of-range sizes and counts.
    """
    if split not in SPLIT_SEEDS:
        raise InvalidInputError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    if count < 1 or start < 0:
        raise InvalidInputError(f"count must be >= 1 and start >= 0; got count={count}, start={start}")
    _check_size(image_size)
    seed = SPLIT_SEEDS[split]
    scenes = tuple(sample_scene(i, seed=seed) for i in range(start, start + count))
    images, masks = zip(*(_render(scene, image_size) for scene in scenes), strict=True)
    return SceneSet(torch.stack(images), torch.stack(masks), scenes)
