"""Questions about pattern scenes: answers from the ground truth, determinism, balance, the refusals."""

import dataclasses
from collections import Counter

import pytest

from tokred.bench.reference.questions import (
    ANSWERS,
    QUESTION_KINDS,
    WORDS,
    ask,
    make_questions,
    questions_for_scene,
)
from tokred.bench.scenes import COLORS, PATTERNS, make_scenes
from tokred.core.errors import InvalidInputError


def _truth(scene, question) -> str:
    """The answer recomputed from the scene's ground truth and the question's words alone."""
    words = question.text.rstrip("?").split()
    if question.kind == "color":
        (obj,) = [o for o in scene.objects if o.pattern == words[4]]
        return obj.color
    if question.kind == "pattern":
        (obj,) = [o for o in scene.objects if o.color == words[4]]
        return obj.pattern
    if question.kind == "exists":
        return "yes" if scene.count(color=words[3], pattern=words[4]) else "no"
    if question.kind == "count":
        return str(scene.count(color=words[2]))
    (first,) = [o for o in scene.objects if o.color == words[2]]
    (second,) = [o for o in scene.objects if o.color == words[-2]]
    return "left" if first.center[0] < second.center[0] else "right"


def test_questions_agree_with_the_scene_ground_truth():
    scenes = make_scenes(150, split="validation", image_size=32)
    seen = Counter()
    for scene in scenes.scenes:
        for question in questions_for_scene(scene, per_kind=2, seed=3):
            seen[question.kind] += 1
            assert question.answer == _truth(scene, question), question
            assert question.answer in ANSWERS and question.text.endswith("?")
            held = [scene.objects[i] for i in question.objects]
            if question.kind in ("color", "pattern"):
                (obj,) = held
                assert question.answer in (obj.color, obj.pattern)
            if question.kind == "exists":
                assert bool(held) == (question.answer == "yes")
            if question.kind == "count":
                assert len(held) == int(question.answer)
            if question.kind == "position":
                first, second = held
                assert abs(first.center[0] - second.center[0]) >= 0.2
    assert set(seen) == set(QUESTION_KINDS)


def test_questions_are_deterministic_and_independent_of_the_batch():
    first = make_questions(12, split="test", image_size=32)
    again = make_questions(12, split="test", image_size=32)
    shifted = make_questions(4, split="test", start=8, image_size=32)
    assert first.questions == again.questions
    assert [dataclasses.replace(q, scene_index=0) for q in first.questions[8:]] == [
        dataclasses.replace(q, scene_index=0) for q in shifted.questions
    ]
    assert [q.scene_index for q in first.questions] == list(range(12))
    assert ask(first.scenes[0], "count", seed=0) == ask(first.scenes[0], "count", seed=0)
    assert ask(first.scenes[0], "count", seed=0, draw=1) is not None


def test_kinds_rotate_and_answers_are_balanced():
    questions = make_questions(1000, split="validation", image_size=32)
    kinds = Counter(q.kind for q in questions.questions)
    assert all(kinds[kind] >= 80 for kind in QUESTION_KINDS)  # position is the rarest: it needs two objects
    exists = [q.answer for q in questions.questions if q.kind == "exists"]
    assert 0.4 < exists.count("yes") / len(exists) < 0.6
    position = [q.answer for q in questions.questions if q.kind == "position"]
    assert 0.35 < position.count("left") / len(position) < 0.65
    colors = Counter(q.answer for q in questions.questions if q.kind == "color")
    assert set(colors) == set(COLORS)
    patterns = Counter(q.answer for q in questions.questions if q.kind == "pattern")
    assert set(patterns) == set(PATTERNS)


def test_the_vocabulary_holds_every_word_and_answer():
    questions = make_questions(300, split="train", image_size=32)
    for question in questions.questions:
        assert set(question.text.replace("?", " ?").split()) <= set(WORDS)
        assert question.answer in WORDS
    assert len(set(WORDS)) == len(WORDS)


def test_an_impossible_kind_gives_none_and_an_unknown_kind_is_refused():
    single = next(s for s in make_scenes(50, split="test", image_size=32).scenes if len(s.objects) == 1)
    assert ask(single, "position") is None
    with pytest.raises(InvalidInputError, match="unknown question kind 'size'"):
        ask(single, "size")
