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
from tokred.bench.reference.questions import QUESTION_KINDS, WORDS, Question, make_questions, questions_for_scene
from tokred.bench.scenes import COLORS, PATTERNS, make_scenes
from tokred.bench.suites.vlm import EXCLUDED_REDUCERS, VLMSuite, method_names
from tokred.bench.training.llava import (
    SMALL_HELD_OUT_QUESTIONS,
    PromptTokens,
    TrainConfig,
    attention_target,
    color_word_positions,
    keyword_target,
    patch_owners,
    patch_targets,
    question_loss,
    relevant_patches,
    save_checkpoint,
    train,
    write_card,
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


# -- prompt and vocabulary -----------------------------------------------------------------------------------


def test_every_prompt_word_is_in_the_vocabulary():
    processor = build_processor(TINY)
    tokenizer = processor.tokenizer
    questions = make_questions(40, split="validation", image_size=32)
    for question in questions.questions:
        ids = tokenizer(prompt(question))["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids([question.answer]))[0] in WORDS
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "how many red objects are there?"}, {"type": "image"}]}
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt(
        "how many red objects are there?"
    )


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
        _, logits, answer, first = question_loss(
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
    torch.testing.assert_close(answer, attentions[-1][:, :2, -1])  # heads 0 and 1 at the answer position
    torch.testing.assert_close(first, attentions[0][:, 0])  # head 0 of the first layer, every position
    last_image = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[-1])
    assert last_image < ids.shape[1] - 3  # the question follows the image


def test_auxiliary_targets_follow_the_scene():
    shape = ModelShape(image_size=48, patch_size=8)
    scenes = make_scenes(4, split="test", image_size=48)
    targets = patch_targets(scenes, shape)  # (4, 36, 3)
    owners = patch_owners(scenes, shape)  # (4, 36)
    coverage = scenes.patch_coverage(8)
    for b, scene in enumerate(scenes.scenes):
        full = coverage[b, 0] == 1  # patches wholly inside the target
        assert full.any()
        assert (owners[b][full] == 0).all()
        assert (targets[b, full, 0] == 1 + list(COLORS).index(scene.target.color)).all()
        assert (targets[b, full, 1] == 1 + PATTERNS.index(scene.target.pattern)).all()
        empty = coverage[b].sum(0) == 0
        assert (owners[b][empty] == -1).all() and (targets[b, empty, :2] == 0).all()
    assert targets[0, 0, 2] == 0 and targets[0, 5, 2] == 3  # the patch's column quarter, left to right
    scene = scenes.scenes[0]
    yes = next(q for q in questions_for_scene(scene, per_kind=3) if q.kind == "exists" and q.answer == "yes")
    relevant = relevant_patches(owners[0], yes)
    assert torch.equal(relevant, torch.isin(owners[0], torch.tensor(yes.objects)))


def _prompt_layout(rows: int, length: int = 40):
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1:, 0] = 0  # left padding: <s> at position 1 from the second row on
    image = torch.zeros(rows, length, dtype=torch.bool)
    image[:, 3:39] = True  # the 36 patches of a 48-px scene
    return mask, image


def test_the_answer_position_is_taught_where_the_answer_lies():
    shape = ModelShape(image_size=48, patch_size=8)
    scenes = make_scenes(40, split="test", image_size=48)
    owners = patch_owners(scenes, shape)
    b = next(i for i, s in enumerate(scenes.scenes) if len(s.objects) >= 2)
    scene = scenes.scenes[b]
    kinds = {q.kind: q for q in questions_for_scene(scene, per_kind=4)}
    count = dataclasses.replace(kinds["count"], answer="2", objects=(0, 1))
    position = dataclasses.replace(kinds["exists"], kind="position", answer="left", objects=(1, 0))
    no = dataclasses.replace(kinds["exists"], answer="no", objects=())
    asked = [kinds["color"], count, position, no]
    mask, image = _prompt_layout(len(asked), length=46)
    color_words = torch.zeros_like(image)
    color_words[:, [41, 44]] = True  # "is the red object left or right of the blue object?"
    target = attention_target(owners[b : b + 1], [asked], mask, image)  # (4, 2, 46)
    torch.testing.assert_close(target.sum(-1), torch.ones(4, 2))
    patches = [torch.nonzero(owners[b] == i).squeeze(1) + 3 for i in range(2)]
    (named,) = asked[0].objects
    assert torch.equal(torch.nonzero(target[0, 0]).squeeze(1), patches[named])  # the named object, evenly
    for head in (0, 1):  # a count: a quarter of the mass per counted object, the rest on <s>
        assert target[1, head, patches[0]].sum() == pytest.approx(0.25)
        assert target[1, head, patches[1]].sum() == pytest.approx(0.25)
        assert target[1, head, 1] == pytest.approx(0.5)
    assert target[2, 0, patches[1]].sum() == pytest.approx(1) and target[2, 1, patches[0]].sum() == pytest.approx(1)
    assert target[3, 0, 1] == 1 and target[3, 1, 1] == 1  # nothing holds the answer: <s>
    # The other recipe for a comparison: the question's first and second colour word, everything else unchanged.
    words = attention_target(owners[b : b + 1], [asked], mask, image, color_words, position_target="color_words")
    assert words[2, 0, 41] == 1 and words[2, 1, 44] == 1
    assert torch.equal(words[[0, 1, 3]], target[[0, 1, 3]])
    with pytest.raises(ValueError, match="position_target"):
        attention_target(owners[b : b + 1], [asked], mask, image, position_target="words")
    with pytest.raises(ValueError, match="color_words"):
        attention_target(owners[b : b + 1], [asked], mask, image, position_target="color_words")


def test_the_colour_words_of_a_comparison_are_found_in_order():
    shape = ModelShape(image_size=48, patch_size=8)
    processor = build_processor(shape)
    tokens = PromptTokens(processor, shape.visual_tokens)
    asked = Question("position", "is the red object left or right of the blue object?", "left", (0, 1))
    other = Question("count", "how many green objects are there?", "1", (0,))
    ids, _ = tokens.batch([[asked, other]], torch.device("cpu"))
    found = color_word_positions(ids, processor.tokenizer)
    words = [processor.tokenizer.convert_ids_to_tokens(ids[r, found[r]].tolist()) for r in range(2)]
    assert words == [["red", "blue"], ["green"]]
    assert not found[ids == IMAGE_TOKEN_ID].any()


def test_the_question_words_are_taught_to_find_their_objects():
    shape = ModelShape(image_size=48, patch_size=8)
    scenes = make_scenes(1, split="test", image_size=48)
    scene, owners = scenes.scenes[0], patch_owners(scenes, shape)
    processor = build_processor(shape)
    tokens = PromptTokens(processor, shape.visual_tokens)
    absent = next(c for c in COLORS if not scene.count(color=c))
    asked = [
        dataclasses.replace(questions_for_scene(scene)[0], text=f"how many {scene.target.color} objects are there?"),
        dataclasses.replace(questions_for_scene(scene)[0], text=f"how many {absent} objects are there?"),
    ]
    ids, _ = tokens.batch([asked], torch.device("cpu"))
    rows, positions, target = keyword_target(scenes, owners, [asked], ids, processor.tokenizer)
    assert rows.tolist() == [0, 1]
    words = processor.tokenizer.convert_ids_to_tokens(ids[rows, positions].tolist())
    assert words == [scene.target.color, absent]
    places = torch.nonzero(ids[0] == IMAGE_TOKEN_ID).squeeze(1)
    same = [i for i, o in enumerate(scene.objects) if o.color == scene.target.color]
    expected = places[torch.isin(owners[0], torch.tensor(same))]
    assert torch.equal(torch.nonzero(target[0]).squeeze(1), expected)
    first = int((ids[1] != 0).long().argmax())
    assert target[1, first] == 1  # an absent colour: all on <s>


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_training_is_deterministic_and_lowers_the_loss():
    first = train(TINY_CONFIG)
    second = train(TINY_CONFIG)
    assert first.losses == second.losses
    a, b = _state(first.model), _state(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(first.losses) == TINY_CONFIG.steps
    assert sum(first.losses[:3]) / 3 > 3.3  # about ln(41): the vocabulary's uniform guess
    assert sum(first.losses[-3:]) / 3 < sum(first.losses[:3]) / 3 - 0.5
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
    assert [r.budget_value for r in rows[1:4]] == [0.33, 0.22, 0.11]
    assert [r.tokens for r in rows[1:4]] == [5, 4, 2]


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


def test_the_chat_template_puts_the_image_first_whatever_the_order():
    processor = build_processor(TINY)
    question = "what color is the striped object?"
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


def test_a_written_card_records_where_the_answer_forms(tiny_checkpoint, tmp_path):
    result = train(TINY_CONFIG)
    folder = save_checkpoint(result.model, result.processor, tmp_path / "llava")
    card = write_card(folder, result, command="pytest", probe_questions=(60, 30))
    probe = card["diagnostics"]["probe"]
    assert len(probe["accuracy_after_layer"]) == TINY.text_layers
    assert all(0.0 <= value <= 1.0 for value in probe["accuracy_after_layer"])
    evidence = card["diagnostics"]["evidence_patches"]
    assert evidence["of"] == TINY.visual_tokens
    assert set(evidence["mean_by_kind"]) <= set(QUESTION_KINDS) and "color" in evidence["mean_by_kind"]
    assert json.loads((folder / "card.json").read_text()) == json.loads(json.dumps(card))


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
