"""The reference Vim: the shipped weights and card, the training code, and the ``tokred bench``/``demo`` suite."""

import argparse
import json

import pytest
import torch
from PIL import Image

from tokred.core.bench import BenchResult, DemoReport, Progress, applicable_reducers, load_suites
from tokred.core.scenes import NUM_CLASSES, make_scenes
from tokred.mamba import attach, count_flops, create_model
from tokred.mamba.flops import token_counts
from tokred.mamba.ops import selective_scan_reference
from tokred.mamba.reference import load_reference_card, load_reference_vim, reference_asset
from tokred.mamba.reference._scan import trainable_selective_scan, training_scan
from tokred.mamba.reference.suite import MambaSuite, patch_token_index
from tokred.mamba.reference.train import (
    PATCH_CLASSES,
    TrainConfig,
    build_model,
    evaluate,
    export_reference,
    patch_labels,
    train,
)


@pytest.fixture(scope="module")
def card():
    return load_reference_card()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_reference_vim()


# ---------------------------------------------------------------------------------------------- the asset
def test_asset_is_small_fp16_and_loads_safely(card):
    path = reference_asset("vim_scenes.pt")
    assert path.stat().st_size <= 4 * 2**20
    assert card["weights"]["bytes"] == path.stat().st_size
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {tensor.dtype for tensor in state.values()} == {torch.float16}
    assert card["model"] == "vim_scenes"
    for key in ("config", "held_out", "held_out_small", "training", "versions"):
        assert key in card
    assert card["training"]["threads"] >= 1 and card["training"]["wall_time_s"] > 0
    assert "scripts/train_vim_scenes.py" in card["training"]["command"]


def test_loaded_model_is_fp32_eval_and_matches_the_card(model, card):
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    config = card["config"]
    assert (model.img_size, model.patch_size, model.embed_dim, model.depth) == (
        config["img_size"],
        config["patch_size"],
        config["embed_dim"],
        config["depth"],
    )
    assert model.num_classes == NUM_CLASSES and model.cls_position == "middle"
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]


def test_asset_reaches_its_recorded_held_out_accuracy(model, card):
    small = card["held_out_small"]
    assert small["split"] == "test"
    scenes = make_scenes(small["scenes"], split="test")
    accuracy = evaluate(model, scenes.images, scenes.labels, batch_size=100)
    # The same computation as when the card was written; a different CPU may flip a borderline scene.
    assert accuracy == pytest.approx(small["accuracy"], abs=1.5 / small["scenes"])
    assert card["held_out"]["accuracy"] > 0.5  # far above chance (1/24): the model really learnt the task


# ------------------------------------------------------------------------------------------- training code
def test_trainable_scan_matches_the_reference_and_its_gradients():
    torch.manual_seed(0)
    batch, channels, length, state = 2, 5, 9, 3
    inputs = {
        "u": torch.randn(batch, channels, length, dtype=torch.float64),
        "delta": torch.randn(batch, channels, length, dtype=torch.float64),
        "A": -torch.rand(channels, state, dtype=torch.float64) - 0.5,
        "B": torch.randn(batch, state, length, dtype=torch.float64),
        "C": torch.randn(batch, state, length, dtype=torch.float64),
        "D": torch.randn(channels, dtype=torch.float64),
        "z": torch.randn(batch, channels, length, dtype=torch.float64),
        "delta_bias": torch.randn(channels, dtype=torch.float64),
    }
    for tensor in inputs.values():
        tensor.requires_grad_(True)
    ours = trainable_selective_scan(**inputs, delta_softplus=True)
    reference = selective_scan_reference(**inputs, delta_softplus=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights).sum(), list(inputs.values()))
    expected = torch.autograd.grad((reference * weights).sum(), list(inputs.values()))
    for name, got, want in zip(inputs, grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


def test_training_scan_gives_the_library_gradients_and_restores_it():
    from tokred.mamba.layers import mixer

    original = mixer.selective_scan
    torch.manual_seed(0)
    model = create_model("vim_test", depth=2, embed_dim=16, d_state=4)
    images = torch.rand(2, 3, 64, 64)
    library = torch.autograd.grad(model(images).square().sum(), list(model.parameters()))
    with training_scan():
        assert mixer.selective_scan is not original
        ours = torch.autograd.grad(model(images).square().sum(), list(model.parameters()))
    assert mixer.selective_scan is original
    for got, want in zip(ours, library, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


TINY = {"embed_dim": 16, "depth": 2, "d_state": 4}


def test_training_is_deterministic():
    config = TrainConfig(steps=3, batch_size=4, warmup_steps=1, val_scenes=4, eval_every=2, model_overrides=TINY)
    first, second = train(config), train(config)
    assert first.best_step == second.best_step
    assert [r["loss"] for r in first.history] == [r["loss"] for r in second.history]
    for (key, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    initial = build_model(config).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in first.model.state_dict().items())


def test_training_lowers_the_loss():
    # A fixed set of 8 scenes seen every step: the loss on it must fall.
    config = TrainConfig(
        steps=20, batch_size=8, train_scenes=8, lr=5e-3, warmup_steps=2, val_scenes=8, eval_every=0,
        model_overrides=TINY,
    )  # fmt: skip
    result = train(config)
    total = [r["loss"] for r in result.history]
    classification = [r["class_loss"] for r in result.history]
    assert total[-1] < 0.8 * total[0]
    assert classification[-1] < 0.8 * classification[0]
    assert result.threads == 1


def test_patch_labels_name_target_distractors_and_background():
    scenes = make_scenes(3, split="train")
    labels = patch_labels(scenes, 8)
    assert labels.shape == (3, 64)
    assert int(labels.min()) >= 0 and int(labels.max()) == PATCH_CLASSES - 1
    for row, scene in enumerate(scenes.scenes):
        present = set(labels[row].tolist())
        assert scene.label in present  # the large target covers patches
        assert present <= {scene.label, PATCH_CLASSES - 1} | {o.label + NUM_CLASSES for o in scene.objects[1:]}
        cx, cy = scene.target.center
        if scene.target.shape != "cross":  # a cross's centre patch is solid; so are the others'
            assert labels[row, int(cy // 8) * 8 + int(cx // 8)] == scene.label


def test_export_writes_fp16_weights_and_a_card_that_reloads(tmp_path):
    config = TrainConfig(steps=1, batch_size=2, warmup_steps=1, val_scenes=4, eval_every=0, model_overrides=TINY)
    result = train(config)
    weights, card_path = export_reference(result, tmp_path, command="pytest", held_out=6, small_held_out=3)
    card = json.loads(card_path.read_text())
    state = torch.load(weights, weights_only=True)
    assert all(t.dtype == torch.float16 for t in state.values())
    assert card["held_out"]["scenes"] == 6 and card["held_out_small"]["scenes"] == 3
    assert card["config"]["depth"] == 2 and card["training"]["command"] == "pytest"
    model = create_model("vim_scenes", **TINY)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    scenes = make_scenes(6, split="test")
    assert evaluate(model, scenes.images, scenes.labels) == pytest.approx(card["held_out"]["accuracy"])


# ------------------------------------------------------------------------------------------------ the suite
def test_suite_is_registered():
    suites, problems = load_suites()
    assert any(isinstance(s, MambaSuite) for s in suites), problems


def _args(**extra):
    return argparse.Namespace(quick=True, limit=12, batch_size=12, seed=0, **extra)


def test_bench_rows_are_well_formed(model):
    suite = MambaSuite(model_loader=lambda: model)
    reducers = applicable_reducers(scores_from_model=True)
    results = suite.bench(_args(mamba_cuts=None, mamba_reducers=None), Progress(enabled=False))
    assert all(isinstance(r, BenchResult) for r in results)
    dense, reduced = results[0], results[1:]
    assert dense.method == "dense" and dense.retained == 1.0 and dense.budget_value == 0.0
    assert dense.tokens == model.num_tokens == 65 and dense.examples == 12
    assert dense.gflops == pytest.approx(count_flops(model, schedule={}) / 1e9)
    assert {r.method for r in reduced} == set(reducers) >= {"mtr", "topvim", "utr", "random", "tome"}
    for row in reduced:
        assert row.budget == "40% FLOPs cut" and row.examples == 12
        with attach(model, row.method, flops_cut=0.4) as handle:
            schedule = handle.schedule
        assert row.gflops == pytest.approx(count_flops(model, schedule=schedule) / 1e9)
        assert row.budget_value == pytest.approx(1 - row.gflops / dense.gflops)
        assert row.tokens == pytest.approx(sum(token_counts(model, schedule=schedule)) / model.depth)
        assert row.tokens < dense.tokens and row.gflops < dense.gflops
        assert row.retained == pytest.approx(row.accuracy / dense.accuracy)
        assert 0.0 <= row.accuracy <= 1.0 and row.time_ms > 0 and row.peak_memory_mb > 0
    assert model.token_reduction is None  # every reducer was detached


def test_bench_options_choose_cuts_and_reducers(model):
    suite = MambaSuite(model_loader=lambda: model)
    args = _args(mamba_cuts=(0.2, 0.3), mamba_reducers=("random",))
    args.limit = 4
    results = suite.bench(args, Progress(enabled=False))
    assert [(r.method, r.budget) for r in results] == [
        ("dense", "dense"),
        ("random", "20% FLOPs cut"),
        ("random", "30% FLOPs cut"),
    ]
    assert results[1].gflops > results[2].gflops


def test_demo_writes_pictures_and_a_table(model, tmp_path):
    suite = MambaSuite(model_loader=lambda: model)
    args = _args(mamba_scenes=2, mamba_reducer=("mtr", "tome"), mamba_flops_cut=0.4, mamba_eval_scenes=12)
    report = suite.demo(args, tmp_path, Progress(enabled=False))
    assert isinstance(report, DemoReport) and report.title == MambaSuite.title
    assert [p.name for p in report.images] == ["mamba-mtr.png", "mamba-tome.png"]
    for path in report.images:
        with Image.open(path) as picture:  # two scenes, each beside its plan, 4x upscaled, 4 px padding
            assert picture.size == (4 + 2 * (256 + 4), 4 + 2 * (256 + 4))
    assert len(report.rows) == 2
    assert list(report.rows[0]) == ["scene", "truth", "dense", "mtr", "tome"]
    assert report.rows[0]["scene"] == "test #0"
    assert any("GFLOPs" in note for note in report.notes)


def test_patch_token_index_skips_the_middle_class_token(model):
    index = patch_token_index(model)
    assert len(index) == 64 and model.cls_index not in index
    assert index[model.cls_index - 1] == model.cls_index - 1 and index[model.cls_index] == model.cls_index + 1
