"""The reference LLaVA: questions, training, the bundled checkpoint and the ``vlm`` bench/demo suite."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import pytest
import torch
from tqdm import tqdm

from tokred.bench import BenchResult, reference_dir
from tokred.bench import load_card as load_reference_card
from tokred.bench.reference.llava import (
    IMAGE_TOKEN_ID,
    ModelShape,
    build_model,
    build_processor,
    encode,
    evaluate,
    load_reference_model,
    pixel_values,
    predict,
    prompt,
    to_pil,
)
from tokred.bench.reference.questions import QUESTION_KINDS, WORDS, ask, make_questions, questions_for_scene
from tokred.bench.scenes import COLORS, POSITIONS, SHAPES, make_scenes
from tokred.bench.suites.vlm import EXCLUDED_REDUCERS, VLMSuite, method_names
from tokred.bench.training.llava import (
    SMALL_HELD_OUT_QUESTIONS,
    PromptTokens,
    TrainConfig,
    attention_target,
    patch_targets,
    question_loss,
    relevant_patches,
    save_checkpoint,
    train,
)
from tokred.core.cli import main

NO_PROGRESS = functools.partial(tqdm, disable=True)


def load_card():
    return load_reference_card("llava_scenes")


def asset_path():
    return reference_dir("llava_scenes")


TINY = ModelShape(image_size=32, patch_size=8, vision_width=16, vision_layers=2, text_width=32, text_heads=2)
TINY_CONFIG = TrainConfig(
    shape=TINY, vision_steps=3, vision_batch=4, steps=20, images_per_step=4, questions_per_image=4, per_kind=1,
    warmup_steps=2, learning_rate=5e-3, log_every=100,
)  # fmt: skip


# -- questions ------------------------------------------------------------------------------------------------


def _truth(scene, question) -> str:
    """The answer of a question recomputed from the scene's ground truth."""
    if question.kind == "color":
        (shape,) = question.about
        (obj,) = [o for o in scene.objects if o.shape == shape]
        return obj.color
    if question.kind == "shape":
        return scene.at(question.about[0]).shape
    if question.kind == "exists":
        color, shape = question.about
        return "yes" if scene.count(shape=shape, color=color) else "no"
    return str(scene.count(shape=question.about[0]))


def test_questions_agree_with_the_scene_ground_truth():
    scenes = make_scenes(60, split="validation", image_size=48)
    seen = set()
    for scene in scenes.scenes:
        for question in questions_for_scene(scene, per_kind=2, seed=3):
            seen.add(question.kind)
            assert question.answer == _truth(scene, question), question
            assert question.text.endswith("?")
            if question.kind == "shape":
                assert question.about[0] in POSITIONS and question.answer in SHAPES
            if question.kind == "exists":
                assert question.about[0] in COLORS
    assert seen == set(QUESTION_KINDS)


def test_questions_are_deterministic_and_independent_of_the_batch():
    first = make_questions(12, split="test", image_size=48)
    again = make_questions(12, split="test", image_size=48)
    shifted = make_questions(4, split="test", start=8, image_size=48)
    assert [dataclasses.replace(q, scene_index=0) for q in first.questions] == [
        dataclasses.replace(q, scene_index=0) for q in again.questions
    ]
    assert [q.text for q in first.questions[8:]] == [q.text for q in shifted.questions]
    assert torch.equal(first.images[8:], shifted.images)
    assert [q.kind for q in first.questions[:4]] == list(QUESTION_KINDS)  # kinds rotate (when askable)
    assert ask(first.scenes[0], "count", seed=0) == ask(first.scenes[0], "count", seed=0)


def test_exists_questions_are_balanced():
    questions = make_questions(400, split="validation", image_size=24)
    answers = [q.answer for q in questions.questions if q.kind == "exists"]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_every_prompt_word_is_in_the_vocabulary():
    processor = build_processor(TINY)
    tokenizer = processor.tokenizer
    questions = make_questions(40, split="validation", image_size=32)
    for question in questions.questions:
        ids = tokenizer(prompt(question))["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids([question.answer]))[0] in WORDS
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "how many circles are there?"}, {"type": "image"}]}
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt("how many circles are there?")


# -- training -------------------------------------------------------------------------------------------------


def test_training_forward_is_the_models_forward():
    """The training pass (one vision pass per image) gives ``model(**processor(...))``'s logits and attention."""
    torch.manual_seed(0)
    model, processor = build_model(TINY, seed=1).eval(), build_processor(TINY)
    scenes = make_scenes(2, split="train", image_size=TINY.image_size)
    questions = [questions_for_scene(s, 1, total=3) for s in scenes.scenes]
    tokens = PromptTokens(processor, TINY.visual_tokens)
    pixels = pixel_values(scenes.images, processor)
    with torch.no_grad():
        _, logits, answer, fetch = question_loss(
            model, pixels, tokens, questions, return_logits=True, return_attention=True
        )
        texts = [prompt(q) for per in questions for q in per]
        images = [to_pil(image) for image in scenes.images.repeat_interleave(3, 0)]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        torch.testing.assert_close(inputs["pixel_values"], pixels.repeat_interleave(3, 0))
        torch.testing.assert_close(logits, model(**inputs).logits[:, -1], atol=1e-5, rtol=1e-4)
        model.set_attn_implementation("eager")
        attentions = model(**inputs, output_attentions=True).attentions  # per layer (N, H, L, L)
    ids, _ = tokens.batch(questions, torch.device("cpu"))
    assert torch.equal(ids, inputs["input_ids"])
    torch.testing.assert_close(answer, attentions[-1][:, 0, -1])
    image = ids == IMAGE_TOKEN_ID
    torch.testing.assert_close(fetch, torch.stack([attentions[0][r, 0][image[r]] for r in range(len(ids))]))


def test_auxiliary_targets_follow_the_scene():
    shape = ModelShape(image_size=48, patch_size=8)
    scene = make_scenes(1, split="test", start=5, image_size=48).scenes[0]
    targets = patch_targets([scene], shape)[0]  # (36, 4)
    side = 6
    for obj in scene.objects:
        centre = int(obj.center[1] // 8) * side + int(obj.center[0] // 8)
        assert targets[centre, 2] == 1
        assert targets[centre, 1] == 1 + SHAPES.index(obj.shape)
        assert targets[centre, 0] == 1 + list(COLORS).index(obj.color)
    assert targets[:, 2].sum() == len(scene.objects)
    assert targets[0, 3] == 0 and targets[-1, 3] == 8  # the patch's own grid cell
    question = ask(scene, "count", seed=0)
    relevant = relevant_patches(scene, question, shape)
    assert int(relevant.sum()) == int(question.answer)
    mask = torch.ones(1, 40, dtype=torch.long)
    image = torch.zeros(1, 40, dtype=torch.bool)
    image[0, 2:38] = True
    target = attention_target([scene], [[question]], mask, image, shape)
    assert target.sum().item() == pytest.approx(1.0)
    assert target[0, 0].item() == pytest.approx(1 - int(question.answer) / 6)  # the rest on <s>


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_training_is_deterministic_and_lowers_the_loss():
    first = train(TINY_CONFIG)
    second = train(TINY_CONFIG)
    assert first.losses == second.losses
    a, b = _state(first.model), _state(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(first.losses) == TINY_CONFIG.steps
    assert sum(first.losses[:3]) / 3 > 3.5  # about ln(49): the vocabulary's uniform guess
    assert sum(first.losses[-3:]) / 3 < sum(first.losses[:3]) / 3 - 0.8
    assert not first.model.training


# -- the shipped checkpoint -----------------------------------------------------------------------------------


def test_asset_is_small_and_complete():
    folder = asset_path()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json", "card.json"} <= names
    assert any(name.startswith("tokenizer") for name in names)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 5 * 2**20
    card = load_card()
    assert card["held_out"]["split"] == "test" and card["held_out"]["questions"] == 1000
    assert card["training"]["threads"] >= 1 and card["training"]["command"].startswith("uv run python scripts/")


def test_asset_loads_offline_and_reaches_its_recorded_accuracy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    card = load_card()
    model, processor = load_reference_model()
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    shape = card["config"]
    assert model.config.vision_config.image_size == shape["image_size"]
    questions = make_questions(SMALL_HELD_OUT_QUESTIONS, split="test", image_size=shape["image_size"])
    result = evaluate(model, processor, questions, batch_size=64)
    recorded = card["held_out"]["small"]
    assert recorded["questions"] == SMALL_HELD_OUT_QUESTIONS
    # Bit-for-bit equal on the machine that wrote the card; a float flip elsewhere moves at most a question or two.
    assert abs(result.accuracy - recorded["accuracy"]) <= 2 / SMALL_HELD_OUT_QUESTIONS
    assert result.accuracy > 0.5  # far above every per-kind prior


# -- the suite ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    result = train(TINY_CONFIG)
    return save_checkpoint(result.model, result.processor, tmp_path_factory.mktemp("tiny") / "llava")


def _args(checkpoint, **extra) -> argparse.Namespace:
    values = {
        "quick": True,
        "limit": 6,
        "batch_size": 4,
        "seed": 0,
        "vlm_model": str(checkpoint),
        "device": torch.device("cpu"),
    }
    return argparse.Namespace(**{**values, **extra})


def test_suite_is_registered():
    from importlib import metadata

    (entry,) = [ep for ep in metadata.entry_points(group="tokred.suites") if ep.name == "vlm"]
    suite = entry.load()()
    assert isinstance(suite, VLMSuite) and suite.name == "vlm" and suite.budget_axis == "visual tokens kept"


def test_bench_rows_are_well_formed(tiny_checkpoint):
    suite = VLMSuite()
    rows = suite.bench(_args(tiny_checkpoint), NO_PROGRESS)
    assert all(isinstance(r, BenchResult) for r in rows)
    assert rows[0].method == "dense" and rows[0].retained == 1.0 and rows[0].tokens == TINY.visual_tokens
    methods = [r.method for r in rows[1:]]
    assert methods == method_names() and "apet (reference)" in methods
    assert not set(EXCLUDED_REDUCERS) & set(methods)
    keep = round(0.11 * TINY.visual_tokens)
    for row in rows[1:]:
        assert row.budget == "11% tokens" and row.budget_value == 0.11
        assert row.tokens == keep  # the reduced prefill processed exactly the stated visual tokens
        assert row.examples == 6
        assert row.gflops < rows[0].gflops and row.time_ms > 0 and row.peak_memory_mb > 0
        assert row.retained == pytest.approx(row.accuracy / rows[0].accuracy) if rows[0].accuracy else True
    assert set(suite.per_kind[("dense", "dense")]) <= set(QUESTION_KINDS)


def test_bench_full_budgets(tiny_checkpoint):
    rows = VLMSuite().bench(_args(tiny_checkpoint, quick=False, limit=4), NO_PROGRESS)
    assert [r.budget_value for r in rows[1:4]] == [0.5, 0.25, 0.11]
    assert [r.tokens for r in rows[1:4]] == [8, 4, 2]


def test_demo_writes_the_plans(tiny_checkpoint, tmp_path):
    suite = VLMSuite()
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser, "demo")
    args = parser.parse_args(["--vlm-model", str(tiny_checkpoint), "--vlm-reducers", "tome"])
    extra = {"quick": True, "limit": 8, "batch_size": 8, "seed": 0, "device": torch.device("cpu")}
    args = argparse.Namespace(**vars(args), **extra, scenes=3, eval_scenes=8)
    report = suite.demo(args, tmp_path, NO_PROGRESS)
    assert len(report.rows) == 3 and list(report.rows[0]) == ["scene", "question", "truth", "dense", "tome"]
    (picture,) = report.images
    assert picture == tmp_path / "vlm-tome.png" and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("keeps 2 of 16 visual tokens" in note for note in report.notes)
    questions = make_questions(3, split="test", image_size=TINY.image_size)
    assert [row["truth"] for row in report.rows] == [q.answer for q in questions.questions]
    assert [r["question"] for r in report.records] == [q.text for q in questions.questions]
    assert all(set(r["reduced"]) == {"tome"} and (tmp_path / r["image"]).is_file() for r in report.records)


def test_unknown_reducers_are_refused_before_running(tiny_checkpoint):
    suite = VLMSuite()
    with pytest.raises(LookupError, match=r"unknown reducer 'apte'\. Did you mean 'apet'"):
        suite.check_arguments(_args(tiny_checkpoint, vlm_reducers=("apte",)), "bench")
    with pytest.raises(ValueError, match="'mtr' cannot run on the LLaVA"):
        suite.check_arguments(_args(tiny_checkpoint, vlm_reducers=("mtr",)), "bench")
    suite.check_arguments(_args(tiny_checkpoint, vlm_reducers=("apet-reference", "tome")), "bench")
    with pytest.raises(LookupError, match=r"Did you mean 'apet-two-stage'\? The LLaVA suite runs: apet, apet-ref"):
        suite.check_arguments(_args(tiny_checkpoint, vlm_reducers=("apet-two-stag",)), "bench")


def test_the_chat_template_asks_question_first_whatever_the_order():
    processor = build_processor(TINY)
    question = "what color is the circle?"
    for content in (
        [{"type": "image"}, {"type": "text", "text": question}],
        [{"type": "text", "text": question}, {"type": "image"}],
    ):
        messages = [{"role": "user", "content": content}]
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered == prompt(question)
    bundled = (asset_path() / "chat_template.jinja").read_text()
    assert bundled == processor.chat_template


def test_the_cli_answers_as_the_model_does_in_python(tmp_path, capsys):
    torch.set_num_threads(1)
    model, processor = load_reference_model()
    questions = make_questions(4, split="test", image_size=model.config.vision_config.image_size)
    expected = predict(model, processor, encode(questions, processor, 4))
    for question, image, answer in zip(questions.questions, questions.images, expected, strict=True):
        path = tmp_path / "scene.png"
        to_pil(image).save(path)
        argv = ["vlm", "generate", "--model", "llava_scenes", "--prompt", question.text, "--max-new-tokens", "1"]
        assert main([*argv, "--reducer", "none", str(path)]) == 0
        printed = capsys.readouterr().out.splitlines()[0].strip()
        assert printed == answer, (question.text, printed, answer)


def test_card_records_what_produced_it():
    card = json.loads((asset_path() / "card.json").read_text())
    assert card["model"] == "LlavaForConditionalGeneration"
    assert card["config"]["visual_tokens"] == (card["config"]["image_size"] // card["config"]["patch_size"]) ** 2
    assert set(card["held_out"]["per_kind"]) == set(QUESTION_KINDS)
    assert {"torch", "transformers", "python"} <= set(card["versions"])
    assert card["training"]["wall_time_s"] > 0 and card["training"]["device"] == "cpu"
    assert card["training"]["config"]["threads"] == card["training"]["threads"]


def test_encoded_batches_are_left_padded():
    processor = build_processor(TINY)
    questions = make_questions(5, split="test", image_size=TINY.image_size)
    (batch,) = encode(questions, processor, 8)
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert bool((batch["attention_mask"][:, -1] == 1).all())  # every prompt ends at the last column
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == 5 * TINY.visual_tokens
