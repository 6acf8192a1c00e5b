"""Procedural scenes: coloured shapes on a cluttered background, with the ground truth recorded.

The reference models of tokred-bench (a LLaVA and a Vim) are trained and measured on these scenes, so every
benchmark runs offline on data the project makes itself. A scene puts two to five objects in distinct cells of
a 3 x 3 grid over a grey, textured background strewn with grey speckles; exactly one object (the *target*) is
large, the others are small distractors. Everything about each object is recorded: shape, colour, grid cell,
centre and radius.

Scenes are deterministic: scene ``i`` of a split depends only on the split's seed and ``i``, never on how many
scenes are drawn at once or in which order, so a held-out split is the same on every machine.

Examples:
    >>> from tokred.bench.scenes import make_scenes
    >>> scenes = make_scenes(4, split="test", image_size=64)
    >>> scenes.images.shape, scenes.images.dtype
    (torch.Size([4, 3, 64, 64]), torch.float32)
    >>> scene = scenes.scenes[0]
    >>> scene.target.shape in ("circle", "square", "triangle", "cross"), 2 <= len(scene.objects) <= 5
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokred.core.errors import InvalidInputError

__all__ = [
    "COLORS",
    "NUM_CLASSES",
    "POSITIONS",
    "SHAPES",
    "SPLIT_SEEDS",
    "Scene",
    "SceneObject",
    "SceneSet",
    "label_name",
    "make_scenes",
    "render_scene",
    "sample_scene",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
"""Object shapes, in label order."""

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.60, 0.20, 0.75),
    "cyan": (0.10, 0.80, 0.85),
}
"""Object colours (RGB in ``[0, 1]``), in label order. All saturated, so none is mistaken for the grey clutter."""

POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
"""Names of the 3 x 3 grid cells, row-major: cell ``i`` is row ``i // 3``, column ``i % 3``."""

SPLIT_SEEDS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
"""Seed of each named split; a split is an infinite, indexable stream of scenes."""

NUM_CLASSES: int = len(SHAPES) * len(COLORS)
"""Number of target classes (shape x colour)."""


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
        shape: One of [`SHAPES`][tokred.bench.scenes.SHAPES].
        color: One of [`COLORS`][tokred.bench.scenes.COLORS].
        cell: Grid cell index ``0..8`` (see [`POSITIONS`][tokred.bench.scenes.POSITIONS]).
        center: ``(x, y)`` in pixels from the top-left corner.
        radius: Half the object's extent in pixels.
    """

    shape: str
    color: str
    cell: int
    center: tuple[float, float]
    radius: float

    @property
    def position(self) -> str:
        """The name of the object's grid cell, such as ``"top left"``."""
        return POSITIONS[self.cell]

    @property
    def label(self) -> int:
        """Class index ``shape * len(COLORS) + colour`` of this object.

        See [`label_name`][tokred.bench.scenes.label_name].
        """
        return SHAPES.index(self.shape) * len(COLORS) + list(COLORS).index(self.color)


@dataclass(frozen=True)
class Scene:
    """The ground truth of one scene.

    Attributes:
        objects: The objects, the target first.
        image_size: Side of the square image in pixels.
        index: Index of the scene in its split.
        seed: Seed of its split.
    """

    objects: tuple[SceneObject, ...]
    image_size: int
    index: int
    seed: int

    @property
    def target(self) -> SceneObject:
        """The large object (the classification target)."""
        return self.objects[0]

    @property
    def label(self) -> int:
        """Class index of the target (see [`label_name`][tokred.bench.scenes.label_name])."""
        return self.target.label

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        """How many objects have the given shape and/or colour (all objects when both are None)."""
        return sum((shape is None or o.shape == shape) and (color is None or o.color == color) for o in self.objects)

    def at(self, position: str) -> SceneObject | None:
        """The object in the named grid cell, or None if the cell is empty."""
        cell = POSITIONS.index(position)
        return next((o for o in self.objects if o.cell == cell), None)


@dataclass(frozen=True)
class SceneSet:
    """A batch of rendered scenes.

    Attributes:
        images: fp32 tensor ``(B, 3, H, W)`` with values in ``[0, 1]``.
        scenes: The ground truth of each image.
    """

    images: torch.Tensor
    scenes: tuple[Scene, ...]

    @property
    def labels(self) -> torch.Tensor:
        """Long tensor ``(B,)``: the target class of each scene."""
        return torch.tensor([s.label for s in self.scenes], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.scenes)


def label_name(label: int) -> str:
    """The name of a class index, colour first: ``label_name(0) == "red circle"``.

    Raises:
        ValueError: If ``label`` is not in ``0 .. len(SHAPES) * len(COLORS) - 1``.
    """
    if not 0 <= label < NUM_CLASSES:
        raise InvalidInputError(f"label must lie in 0..{NUM_CLASSES - 1}; got {label}")
    shape, color = divmod(label, len(COLORS))
    return f"{list(COLORS)[color]} {SHAPES[shape]}"


def _scene_generator(seed: int, index: int) -> torch.Generator:
    # One generator per scene, seeded from (seed, index) alone: scene i is the same however it is drawn.
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def sample_scene(
    index: int, *, seed: int = 0, image_size: int = 64, min_objects: int = 2, max_objects: int = 5
) -> Scene:
    """Draw the layout of scene ``index`` of a split (no rendering).

    Args:
        index: Index of the scene, ``>= 0``.
        seed: Seed of the split.
        image_size: Side of the image in pixels, at least 24.
        min_objects: Fewest objects, target included (at least 1).
        max_objects: Most objects (at most 9, one per grid cell).

    Returns:
        The scene's ground truth.
    """
    gen = _scene_generator(seed, index)
    count = int(torch.randint(min_objects, max_objects + 1, (), generator=gen))
    cells = torch.randperm(9, generator=gen)[:count].tolist()
    cell_size = image_size / 3
    objects = []
    for i, cell in enumerate(cells):
        shape = SHAPES[int(torch.randint(len(SHAPES), (), generator=gen))]
        color = list(COLORS)[int(torch.randint(len(COLORS), (), generator=gen))]
        # The target fills most of its cell; distractors are about half its size.
        radius = cell_size * (_uniform(gen, 0.36, 0.42) if i == 0 else _uniform(gen, 0.18, 0.24))
        slack = max(cell_size / 2 - radius - 0.5, 0.0)
        row, col = divmod(cell, 3)
        cx = (col + 0.5) * cell_size + _uniform(gen, -slack, slack)
        cy = (row + 0.5) * cell_size + _uniform(gen, -slack, slack)
        objects.append(SceneObject(shape, color, cell, (cx, cy), radius))
    return Scene(tuple(objects), image_size, index, seed)


def _shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    if shape == "circle":
        return dx.square() + dy.square() <= r * r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        return (dy >= -r) & (dy <= 0.8 * r) & (dx.abs() <= (dy + r) / 1.8)
    if shape == "cross":
        bar = r / 3
        return ((dx.abs() <= bar) & (dy.abs() <= r)) | ((dy.abs() <= bar) & (dx.abs() <= r))
    raise InvalidInputError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene) -> torch.Tensor:
    """Render a scene to an fp32 image ``(3, H, W)`` in ``[0, 1]``.

    The background (grey level, smooth texture, speckles) and the small colour jitter of each object are drawn
    from the scene's own generator, so rendering is as deterministic as the layout.
    """
    size = scene.image_size
    gen = _scene_generator(scene.seed, scene.index)
    gen.manual_seed(gen.initial_seed() ^ 0x5EED)  # a stream apart from the layout's
    base = _uniform(gen, 0.30, 0.60)
    coarse = torch.rand((1, 1, 6, 6), generator=gen) - 0.5
    texture = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    grey = base + 0.25 * texture
    speckles = torch.rand((size, size), generator=gen) < 0.04
    grey = torch.where(speckles, torch.rand((size, size), generator=gen), grey)
    image = grey.clamp(0, 1).expand(3, size, size).clone()

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    for obj in reversed(scene.objects):  # the target last, on top (objects never overlap anyway)
        mask = _shape_mask(obj.shape, xs - obj.center[0], ys - obj.center[1], obj.radius)
        jitter = (torch.rand(3, generator=gen) - 0.5) * 0.1
        color = (torch.tensor(COLORS[obj.color]) + jitter).clamp(0, 1)
        image = torch.where(mask, color[:, None, None], image)
    return image


def make_scenes(
    count: int,
    *,
    split: str = "train",
    start: int = 0,
    image_size: int = 64,
    min_objects: int = 2,
    max_objects: int = 5,
) -> SceneSet:
    """Draw and render scenes ``start .. start + count - 1`` of a split.

    Args:
        count: Number of scenes, ``>= 1``.
        split: ``"train"``, ``"validation"`` or ``"test"`` (see [`SPLIT_SEEDS`][tokred.bench.scenes.SPLIT_SEEDS]).
        start: Index of the first scene.
        image_size: Side of the square images in pixels (at least 24).
        min_objects: Fewest objects per scene, target included.
        max_objects: Most objects per scene (at most 9).

    Returns:
        The images ``(count, 3, image_size, image_size)`` and their ground truth.

    Raises:
        ValueError: On an unknown split or out-of-range sizes and counts.
    """
    if split not in SPLIT_SEEDS:
        raise InvalidInputError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    if count < 1 or start < 0:
        raise InvalidInputError(f"count must be >= 1 and start >= 0; got count={count}, start={start}")
    if image_size < 24:
        raise InvalidInputError(
            f"image_size must be at least 24 pixels so small objects stay visible; got {image_size}"
        )
    if not 1 <= min_objects <= max_objects <= 9:
        raise InvalidInputError(f"need 1 <= min_objects <= max_objects <= 9; got {min_objects}, {max_objects}")
    seed = SPLIT_SEEDS[split]
    scenes = tuple(
        sample_scene(i, seed=seed, image_size=image_size, min_objects=min_objects, max_objects=max_objects)
        for i in range(start, start + count)
    )
    images = torch.stack([render_scene(scene) for scene in scenes])
    return SceneSet(images, scenes)
