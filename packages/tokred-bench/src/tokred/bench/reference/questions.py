"""Templated one-word questions about procedural scenes, with answers from the scene's ground truth.

Four kinds of question ([`QUESTION_KINDS`][tokred.bench.reference.questions.QUESTION_KINDS]), each with one template:

| kind | template | answer |
| --- | --- | --- |
| ``color`` | ``what color is the {shape}?`` | a colour; asked only when that shape is unique |
| ``shape`` | ``what shape is at the {position}?`` | a shape; asked only about an occupied cell |
| ``exists`` | ``is there a {color} {shape}?`` | ``yes`` / ``no``, drawn half and half |
| ``count`` | ``how many {shape}s are there?`` | a digit ``0`` .. ``5`` |

Questions are deterministic: the question of a scene depends only on the scene (its split seed and index), the
kind and the ``seed`` given here, never on which other scenes are asked about. Negative ``exists`` questions
are half the time *hard*: the colour or the shape occurs in the scene, but not together.

Examples:
    >>> from tokred.bench.reference.questions import make_questions
    >>> qs = make_questions(4, split="test", image_size=80)
    >>> qs.images.shape, [q.kind for q in qs.questions]
    (torch.Size([4, 3, 80, 80]), ['color', 'shape', 'exists', 'count'])
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from tokred.bench.scenes import COLORS, POSITIONS, SHAPES, Scene, make_scenes
from tokred.core.errors import InvalidInputError

__all__ = [
    "ANSWERS",
    "MAX_COUNT",
    "QUESTION_KINDS",
    "WORDS",
    "Question",
    "QuestionSet",
    "ask",
    "make_questions",
    "plural",
    "questions_for_scene",
]

QUESTION_KINDS: tuple[str, ...] = ("color", "shape", "exists", "count")
"""The kinds of question, in the order [`make_questions`][tokred.bench.reference.questions.make_questions] rotates
through them."""

MAX_COUNT = 5
"""The largest answer of a ``count`` question (scenes hold at most five objects)."""

_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

ANSWERS: tuple[str, ...] = (*COLORS, *SHAPES, "yes", "no", *(str(n) for n in range(MAX_COUNT + 1)))
"""Every possible answer word."""

_PROMPT_WORDS = ("user", "assistant", ":", "?", ".", ",", "what", "color", "is", "the", "shape", "at", "there", "a")
_PROMPT_WORDS += ("how", "many", "are")

WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *_PROMPT_WORDS,
            *ANSWERS,
            *_PLURALS.values(),
            *(word for position in POSITIONS for word in position.split()),
        ]
    )
)
"""Every word a prompt or an answer uses (the reference tokenizer's vocabulary, besides special tokens)."""


def plural(shape: str) -> str:
    """The plural of a shape name: ``"crosses"`` for ``"cross"``, else ``shape + "s"``."""
    return _PLURALS[shape]


@dataclass(frozen=True)
class Question:
    """One question about one scene.

    Attributes:
        kind: One of [`QUESTION_KINDS`][tokred.bench.reference.questions.QUESTION_KINDS].
        text: The question, e.g. ``"what color is the circle?"``.
        answer: The one-word answer, e.g. ``"red"``.
        about: What the question names: ``(shape,)`` for ``color`` and ``count``, ``(position,)`` for
            ``shape``, ``(color, shape)`` for ``exists``.
        scene_index: Position of the scene in the [`QuestionSet`][tokred.bench.reference.questions.QuestionSet] it
            belongs to (0 for a lone question).
    """

    kind: str
    text: str
    answer: str
    about: tuple[str, ...] = ()
    scene_index: int = 0


@dataclass(frozen=True)
class QuestionSet:
    """Rendered scenes and one question per scene.

    Attributes:
        images: fp32 tensor ``(N, 3, H, W)`` in ``[0, 1]``, one image per question.
        scenes: The ground truth of each image.
        questions: The questions; ``questions[i]`` is about ``images[i]``.
    """

    images: torch.Tensor
    scenes: tuple[Scene, ...]
    questions: tuple[Question, ...]

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, count: int) -> QuestionSet:
        """The first ``count`` questions (all of them if ``count`` is larger)."""
        return QuestionSet(self.images[:count], self.scenes[:count], self.questions[:count])


def _rng(scene: Scene, kind: str, seed: int, draw: int) -> random.Random:
    # An integer seed from (split seed, scene index, kind, seed, draw): stable across runs and machines.
    value = (((scene.seed * 1_000_003 + scene.index) * 31 + QUESTION_KINDS.index(kind)) * 7919 + seed) * 101 + draw
    return random.Random(value)


def ask(scene: Scene, kind: str, *, seed: int = 0, draw: int = 0) -> Question | None:
    """One question of the given kind about ``scene``, or None where the kind cannot be asked.

    Only ``color`` can be impossible: it needs a shape that occurs exactly once in the scene.

    Args:
        scene: The scene.
        kind: One of [`QUESTION_KINDS`][tokred.bench.reference.questions.QUESTION_KINDS].
        seed: Seed of the question draw.
        draw: Index of the draw, to ask several questions of one kind about the same scene.

    Returns:
        The question (with ``scene_index=0``), or None.

    Raises:
        ValueError: On an unknown kind.
    """
    if kind not in QUESTION_KINDS:
        raise InvalidInputError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")
    rng = _rng(scene, kind, seed, draw)
    if kind == "color":
        unique = [o for o in scene.objects if scene.count(shape=o.shape) == 1]
        if not unique:
            return None
        obj = rng.choice(unique)
        return Question(kind, f"what color is the {obj.shape}?", obj.color, (obj.shape,))
    if kind == "shape":
        obj = rng.choice(scene.objects)
        return Question(kind, f"what shape is at the {obj.position}?", obj.shape, (obj.position,))
    if kind == "exists":
        present = sorted({(o.color, o.shape) for o in scene.objects})
        if rng.random() < 0.5:
            color, shape = rng.choice(present)
            return Question(kind, f"is there a {color} {shape}?", "yes", (color, shape))
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        hard = [(c, s) for c, s in absent if scene.count(color=c) or scene.count(shape=s)]
        color, shape = rng.choice(hard if hard and rng.random() < 0.5 else absent)
        return Question(kind, f"is there a {color} {shape}?", "no", (color, shape))
    shape = rng.choice(SHAPES)
    return Question(kind, f"how many {plural(shape)} are there?", str(scene.count(shape=shape)), (shape,))


def questions_for_scene(scene: Scene, per_kind: int = 1, *, seed: int = 0, total: int | None = None) -> list[Question]:
    """Several questions about one scene: ``per_kind`` of every kind that can be asked.

    Args:
        scene: The scene.
        per_kind: Questions of each kind (draws ``0 .. per_kind - 1``).
        seed: Seed of the draws.
        total: If given, the list is cut or filled up to exactly this length (filled with further draws of the
            kinds other than ``color``), so that every scene of a batch has the same number of questions.

    Returns:
        The questions, kind by kind (with ``scene_index=0``).
    """
    questions = [
        q for draw in range(per_kind) for kind in QUESTION_KINDS if (q := ask(scene, kind, seed=seed, draw=draw))
    ]
    if total is not None:
        draw = per_kind
        while len(questions) < total:
            kind = QUESTION_KINDS[1 + (draw - per_kind) % (len(QUESTION_KINDS) - 1)]
            questions.append(ask(scene, kind, seed=seed, draw=draw))
            draw += 1
        questions = questions[:total]
    return questions


def make_questions(
    count: int, *, split: str = "test", start: int = 0, image_size: int = 80, seed: int = 0
) -> QuestionSet:
    """One question about each of scenes ``start .. start + count - 1`` of a split, the kinds in rotation.

    Scene ``i`` is asked a question of kind ``QUESTION_KINDS[i % 4]``; where a ``color`` question cannot be
    asked (no shape occurs exactly once) it gets a ``shape`` question instead, so the kinds are balanced up
    to those few scenes.

    Args:
        count: Number of questions (and scenes), ``>= 1``.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        start: Index of the first scene.
        image_size: Side of the rendered images in pixels.
        seed: Seed of the question draws.

    Returns:
        The question set.
    """
    scenes = make_scenes(count, split=split, start=start, image_size=image_size)
    questions = []
    for i, scene in enumerate(scenes.scenes):
        kind = QUESTION_KINDS[scene.index % len(QUESTION_KINDS)]
        question = ask(scene, kind, seed=seed) or ask(scene, "shape", seed=seed)
        questions.append(dataclasses.replace(question, scene_index=i))
    return QuestionSet(scenes.images, scenes.scenes, tuple(questions))
