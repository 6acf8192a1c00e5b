"""Templated one-word questions about pattern scenes, with answers from the scene's ground truth.

Five kinds of question ([`QUESTION_KINDS`][tokred.bench.reference.questions.QUESTION_KINDS]) about the
objects of a [pattern scene][tokred.bench.scenes], each with one template:

| kind | template | answer |
| --- | --- | --- |
| ``color`` | ``what color is the {pattern} object?`` | a colour; asked when that pattern is unique |
| ``pattern`` | ``what pattern is the {color} object?`` | a pattern; asked when that colour is unique |
| ``exists`` | ``is there a {color} {pattern} object?`` | ``yes`` / ``no``, drawn half and half |
| ``count`` | ``how many {color} objects are there?`` | a digit ``0`` .. ``3`` |
| ``position`` | ``is the {color} object left or right of the {color} object?`` | ``left`` / ``right`` |

Every question is about salient content: a colour or a pattern over thousands of pixels. ``position`` is asked
only about two objects of unique colours whose centres lie at least a fifth of the image apart horizontally.
Negative ``exists`` questions are half the time *hard*: the colour or the pattern occurs in the scene, but not
together.

Questions are deterministic: the question of a scene depends only on the scene (its split seed and index), the
kind and the ``seed`` given here, never on which other scenes are asked about.

Examples:
    >>> from tokred.bench.reference.questions import make_questions
    >>> qs = make_questions(5, split="test", image_size=64)
    >>> qs.images.shape, len(qs)
    (torch.Size([5, 3, 64, 64]), 5)
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokred.bench.scenes import COLORS, MAX_OBJECTS, PATTERNS, Scene, SceneObject, make_scenes
from tokred.core.errors import InvalidInputError

__all__ = [
    "ANSWERS",
    "QUESTION_KINDS",
    "WORDS",
    "Question",
    "QuestionSet",
    "ask",
    "make_questions",
    "questions_for_scene",
]

QUESTION_KINDS: tuple[str, ...] = ("color", "pattern", "exists", "count", "position")
"""The kinds of question, in the order [`make_questions`][tokred.bench.reference.questions.make_questions]
rotates through them."""

ANSWERS: tuple[str, ...] = (*COLORS, *PATTERNS, "yes", "no", *(str(n) for n in range(MAX_OBJECTS + 1)), "left", "right")
"""Every possible answer word."""

_PROMPT_WORDS = ("user", "assistant", ":", "?", "what", "color", "is", "the", "pattern", "object", "objects")
_PROMPT_WORDS += ("there", "a", "how", "many", "are", "or", "of")

WORDS: tuple[str, ...] = tuple(dict.fromkeys([*_PROMPT_WORDS, *ANSWERS]))
"""Every word a prompt or an answer uses (the reference tokenizer's vocabulary, besides special tokens)."""

_MIN_SEPARATION = 0.2


@dataclass(frozen=True)
class Question:
    """One question about one scene.

    Attributes:
        kind: One of [`QUESTION_KINDS`][tokred.bench.reference.questions.QUESTION_KINDS].
        text: The question, e.g. ``"what color is the striped object?"``.
        answer: The one-word answer, e.g. ``"red"``.
        objects: Indices (into ``scene.objects``) of the objects that hold the answer: the named object for
            ``color`` and ``pattern``, the matching ones for ``exists`` and ``count`` (none for a ``no`` or a
            ``0``), the two compared for ``position``.
        scene_index: Position of the scene in the
            [`QuestionSet`][tokred.bench.reference.questions.QuestionSet] it belongs to (0 for a lone
            question).
    """

    kind: str
    text: str
    answer: str
    objects: tuple[int, ...] = ()
    scene_index: int = 0


@dataclass(frozen=True)
class QuestionSet:
    """Rendered scenes and one question per scene.

    Attributes:
        images: fp32 ``(N, 3, H, W)`` in ``[0, 1]``, one image per question.
        masks: bool ``(N, MAX_OBJECTS, H, W)``, the objects' visible pixels.
        scenes: The ground truth of each image.
        questions: The questions; ``questions[i]`` is about ``images[i]``.
    """

    images: torch.Tensor
    masks: torch.Tensor
    scenes: tuple[Scene, ...]
    questions: tuple[Question, ...]

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, count: int) -> QuestionSet:
        """The first ``count`` questions (all of them if ``count`` is larger)."""
        return QuestionSet(self.images[:count], self.masks[:count], self.scenes[:count], self.questions[:count])


def _rng(scene: Scene, kind: str, seed: int, draw: int) -> random.Random:
    # An integer seed from (split seed, scene index, kind, seed, draw): stable across runs and machines.
    value = (((scene.seed * 1_000_003 + scene.index) * 31 + QUESTION_KINDS.index(kind)) * 7919 + seed) * 101 + draw
    return random.Random(value)


def _unique(scene: Scene, attribute: str) -> list[int]:
    """Indices of the objects whose ``attribute`` no other object of the scene shares."""
    values = [getattr(o, attribute) for o in scene.objects]
    return [i for i, value in enumerate(values) if values.count(value) == 1]


def _matching(scene: Scene, test: Callable[[SceneObject], bool]) -> tuple[int, ...]:
    return tuple(i for i, o in enumerate(scene.objects) if test(o))


def ask(scene: Scene, kind: str, *, seed: int = 0, draw: int = 0) -> Question | None:
    """One question of the given kind about ``scene``, or None where the kind cannot be asked.

    ``color`` needs an object with a unique pattern, ``pattern`` one with a unique colour, ``position`` two
    objects of unique colours far enough apart; ``exists`` and ``count`` can always be asked.

    Args:
        scene: The scene.
        kind: One of [`QUESTION_KINDS`][tokred.bench.reference.questions.QUESTION_KINDS].
        seed: Seed of the question draw.
        draw: Index of the draw, to ask several questions of one kind about the same scene.

    Returns:
        The question (with ``scene_index=0``), or None.

    Raises:
        InvalidInputError: On an unknown kind.
    """
    if kind not in QUESTION_KINDS:
        raise InvalidInputError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")
    rng = _rng(scene, kind, seed, draw)
    objects = scene.objects
    if kind in ("color", "pattern"):
        # Ask for one attribute of the object named by the other, which must be unique in the scene.
        named = "pattern" if kind == "color" else "color"
        options = _unique(scene, named)
        if not options:
            return None
        i = rng.choice(options)
        text = f"what {kind} is the {getattr(objects[i], named)} object?"
        return Question(kind, text, getattr(objects[i], kind), (i,))
    if kind == "exists":
        present = sorted({(o.color, o.pattern) for o in objects})
        if rng.random() < 0.5:
            color, pattern = rng.choice(present)
            answer = "yes"
        else:
            absent = [(c, p) for c in COLORS for p in PATTERNS if (c, p) not in present]
            hard = [(c, p) for c, p in absent if scene.count(color=c) or scene.count(pattern=p)]
            color, pattern = rng.choice(hard if hard and rng.random() < 0.5 else absent)
            answer = "no"
        held = _matching(scene, lambda o: (o.color, o.pattern) == (color, pattern))
        return Question(kind, f"is there a {color} {pattern} object?", answer, held)
    if kind == "count":
        # Half the time a colour of the scene, else any colour (often a 0).
        color = rng.choice([o.color for o in objects]) if rng.random() < 0.5 else rng.choice(list(COLORS))
        held = _matching(scene, lambda o: o.color == color)
        return Question(kind, f"how many {color} objects are there?", str(len(held)), held)
    pairs = [
        (i, j)
        for i in _unique(scene, "color")
        for j in _unique(scene, "color")
        if i != j and abs(objects[i].center[0] - objects[j].center[0]) >= _MIN_SEPARATION
    ]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    first, second = objects[i], objects[j]
    answer = "left" if first.center[0] < second.center[0] else "right"
    return Question(kind, f"is the {first.color} object left or right of the {second.color} object?", answer, (i, j))


def questions_for_scene(scene: Scene, per_kind: int = 1, *, seed: int = 0, total: int | None = None) -> list[Question]:
    """Several questions about one scene: ``per_kind`` of every kind that can be asked.

    Args:
        scene: The scene.
        per_kind: Questions of each kind (draws ``0 .. per_kind - 1``).
        seed: Seed of the draws.
        total: If given, the list is cut or filled up to exactly this length (filled with further draws of
            ``exists`` and ``count``, which can always be asked), so that every scene of a batch has the same
            number of questions.

    Returns:
        The questions, kind by kind (with ``scene_index=0``).
    """
    questions = [
        q for draw in range(per_kind) for kind in QUESTION_KINDS if (q := ask(scene, kind, seed=seed, draw=draw))
    ]
    if total is not None:
        draw = per_kind
        while len(questions) < total:
            kind = ("exists", "count")[(draw - per_kind) % 2]
            questions.append(ask(scene, kind, seed=seed, draw=draw))  # type: ignore[arg-type]  # always askable
            draw += 1
        questions = questions[:total]
    return questions


def make_questions(
    count: int, *, split: str = "test", start: int = 0, image_size: int = 128, seed: int = 0
) -> QuestionSet:
    """One question about each of scenes ``start .. start + count - 1`` of a split, the kinds in rotation.

    Scene ``i`` is asked a question of kind ``QUESTION_KINDS[i % 5]``; where that kind cannot be asked, the next
    kind in the rotation that can be is asked instead (``exists`` always can).

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
        first = scene.index % len(QUESTION_KINDS)
        for step in range(len(QUESTION_KINDS)):
            question = ask(scene, QUESTION_KINDS[(first + step) % len(QUESTION_KINDS)], seed=seed)
            if question is not None:
                break
        questions.append(dataclasses.replace(question, scene_index=i))
    return QuestionSet(scenes.images, scenes.masks, scenes.scenes, tuple(questions))
