"""The reference Vim: the bundled weights and card, the training code, and the ``tokred bench``/``demo`` suite."""

import argparse
import functools
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tqdm import tqdm

from tokred.bench import (
    BenchResult,
    DemoReport,
    applicable_reducers,
    load_card,
    load_suites,
    reference_dir,
)
from tokred.bench.scenes import COLORS, NUM_CLASSES, label_name, make_scenes
from tokred.bench.suites.mamba import MambaSuite, patch_token_index
from tokred.bench.training.vim import (
    PATCH_CLASSES,
    TrainConfig,
    augment,
    aux_weight,
    build_model,
    evaluate,
    export_reference,
    patch_labels,
    train,
)
from tokred.bench.visualize import image_to_pil
from tokred.core.cli import main
from tokred.mamba import attach, count_flops, create_model
from tokred.mamba.flops import token_counts
from tokred.mamba.scores import SUPPLIED_SCORES

NO_PROGRESS = functools.partial(tqdm, disable=True)


@pytest.fixture(scope="module")
def card():
    return load_card("vim_scenes")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return create_model("vim_scenes", pretrained=True).eval()


# ---------------------------------------------------------------------------------------------- the asset
def test_asset_is_small_fp16_and_loads_safely(card):
    path = reference_dir("vim_scenes") / "vim_scenes.pt"
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
    assert model.class_names == tuple(label_name(i) for i in range(NUM_CLASSES))


def test_asset_reaches_its_recorded_held_out_accuracy(model, card):
    small = card["held_out_small"]
    assert small["split"] == "test"
    scenes = make_scenes(small["scenes"], split="test")
    accuracy = evaluate(model, scenes.images, scenes.labels, batch_size=100)
    # The same computation as when the card was written; a different CPU may flip a borderline scene.
    assert accuracy == pytest.approx(small["accuracy"], abs=1.5 / small["scenes"])
    assert card["held_out"]["accuracy"] > 0.5  # far above chance (1/24): the model really learnt the task


def test_the_model_is_found_by_name_without_importing_anything_first():
    code = (
        "import sys; from tokred.mamba import available_models, create_model; "
        "assert 'tokred.bench' not in sys.modules; assert 'vim_scenes' in available_models(); "
        "assert 'tokred.bench' not in sys.modules, 'listing must not import'; "
        "m = create_model('vim_scenes', pretrained=True); print(m.model_name, len(m.class_names))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["vim_scenes", "24"]


def test_the_cli_answers_as_the_model_does_in_python(model, tmp_path, capsys):
    scenes = make_scenes(6, split="test")
    with torch.no_grad():
        expected = [label_name(int(i)) for i in model(scenes.images).argmax(-1)]
    paths = []
    for row in range(6):
        path = tmp_path / f"scene-{row}.png"
        image_to_pil(scenes.images[row]).save(path)
        paths.append(str(path))
    assert main(["mamba", "classify", "--model", "vim_scenes", "--top-k", "1", *paths]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    answers = [line.split("\t")[1].rsplit(":", 1)[0] for line in lines]
    assert answers == expected, "the PNG through the CLI must be prepared as the model was trained"


TINY = {"embed_dim": 16, "depth": 2, "d_state": 4, "img_size": 32}


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


def test_export_writes_fp16_weights_and_a_card_that_reloads(tmp_path):
    config = TrainConfig(steps=1, batch_size=2, warmup_steps=1, val_scenes=4, eval_every=0, model_overrides=TINY)
    result = train(config)
    weights, card_path = export_reference(
        result, tmp_path, command="pytest", held_out=6, small_held_out=3, probe_scenes=(30, 10)
    )
    card = json.loads(card_path.read_text())
    state = torch.load(weights, weights_only=True)
    assert all(t.dtype == torch.float16 for t in state.values())
    assert card["held_out"]["scenes"] == 6 and card["held_out_small"]["scenes"] == 3
    assert card["config"]["depth"] == 2 and card["training"]["command"] == "pytest"
    probe = card["diagnostics"]["probe"]
    assert len(probe["accuracy_after_block"]) == 2 and probe["train_scenes"] == 30
    assert set(card["diagnostics"]["accuracy_by"]) == {"color", "pattern", "objects"}
    model = create_model("vim_scenes", **TINY)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    scenes = make_scenes(6, split="test", image_size=32)
    assert evaluate(model, scenes.images, scenes.labels) == pytest.approx(card["held_out"]["accuracy"])


def test_training_on_pattern_scenes_with_augmentation_is_deterministic():
    config = TrainConfig(
        augment=True, aux_anneal=0.5, steps=3, batch_size=4, warmup_steps=1, val_scenes=4,
        eval_every=0, model_overrides={**TINY, "drop_path_rate": 0.1},
    )  # fmt: skip
    first, second = train(config), train(config)
    assert [r["loss"] for r in first.history] == [r["loss"] for r in second.history]
    for (key, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    # Annealed: auxiliary losses at step 0, only the class-token loss from step 0.5 · 3 on.
    assert first.history[0]["loss"] > first.history[0]["class_loss"]
    assert first.history[2]["loss"] == first.history[2]["class_loss"]


def test_auxiliary_weights_fall_linearly_to_zero():
    assert [aux_weight(TrainConfig(steps=10, aux_anneal=0.5), s) for s in (0, 1, 4, 5, 9)] == pytest.approx(
        [1, 0.8, 0.2, 0, 0]
    )
    assert aux_weight(TrainConfig(steps=10, aux_anneal=None), 9) == 1.0


def test_augmentation_moves_images_and_masks_together():
    scenes = make_scenes(16, split="train", image_size=64)
    out = augment(scenes, torch.Generator().manual_seed(0))
    assert out.scenes == scenes.scenes and out.images.shape == scenes.images.shape
    assert not torch.equal(out.images, scenes.images)
    again = augment(scenes, torch.Generator().manual_seed(0))
    assert torch.equal(out.images, again.images) and torch.equal(out.masks, again.masks)
    for image, mask, scene in zip(out.images, out.masks[:, 0], out.scenes, strict=True):
        reference = torch.tensor(COLORS[scene.target.color])
        cosine = torch.nn.functional.cosine_similarity(image[:, mask].T, reference[None], dim=1)
        assert mask.float().mean() > 0.15 and cosine.median() > 0.98  # the moved mask still covers the target


def test_patch_labels_of_pattern_scenes_come_from_the_masks():
    scenes = make_scenes(6, split="train", image_size=64)
    labels = patch_labels(scenes, 8)
    covered = scenes.patch_coverage(8)  # (B, K, P)
    for row, scene in enumerate(scenes.scenes):
        assert (labels[row][covered[row, 0] == 1] == scene.label).all()
        assert (labels[row][covered[row].sum(0) == 0] == PATCH_CLASSES - 1).all()
        for k, obj in enumerate(scene.objects[1:], 1):
            assert (labels[row][covered[row, k] == 1] == obj.label + NUM_CLASSES).all()


def test_the_card_of_a_pattern_model_counts_the_targets_patches(tmp_path):
    config = TrainConfig(
        steps=1, batch_size=2, warmup_steps=1, val_scenes=4, eval_every=0,
        model_overrides=TINY,
    )  # fmt: skip
    _, card_path = export_reference(
        train(config), tmp_path, command="pytest", held_out=8, small_held_out=4, probe_scenes=(30, 10)
    )
    diagnostics = json.loads(card_path.read_text())["diagnostics"]
    held_out = make_scenes(8, split="test", image_size=32)
    half = (held_out.patch_coverage(8)[:, 0] >= 0.5).sum(-1)
    assert diagnostics["target_patches"] == {
        "what": "patches of 8 px the target covers at least half of",
        "of": 16,
        "mean": round(float(half.float().mean()), 1),
        "min": int(half.min()),
        "max": int(half.max()),
    }
    assert set(diagnostics["accuracy_by"]) == {"color", "pattern", "objects"}


# ------------------------------------------------------------------------------------------------ the suite
def test_suite_is_registered():
    suites, problems = load_suites()
    assert any(isinstance(s, MambaSuite) for s in suites), problems


def _args(**extra):
    defaults = {"quick": True, "limit": 12, "batch_size": 12, "seed": 0, "device": torch.device("cpu")}
    return argparse.Namespace(**{**defaults, **extra})


def test_bench_rows_are_well_formed(model):
    suite = MambaSuite(model_loader=lambda: model)
    reducers = applicable_reducers(supplied_scores=SUPPLIED_SCORES)
    results = suite.bench(_args(mamba_flops_cuts=None, mamba_reducers=None), NO_PROGRESS)
    assert all(isinstance(r, BenchResult) for r in results)
    dense, reduced = results[0], results[1:]
    assert dense.method == "dense" and dense.retained == 1.0 and dense.budget_value == 0.0
    assert dense.tokens == model.num_tokens == 197 and dense.examples == 12
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
        assert 0.0 <= row.accuracy <= 1.0 and row.time_ms > 0 and row.time_spread >= 0 and row.peak_memory_mb > 0
    assert model.token_reduction is None  # every reducer was detached


def test_bench_options_choose_cuts_and_reducers(model):
    suite = MambaSuite(model_loader=lambda: model)
    args = _args(mamba_flops_cuts=(0.2, 0.3), mamba_reducers=("random",), limit=4)
    results = suite.bench(args, NO_PROGRESS)
    assert [(r.method, r.budget) for r in results] == [
        ("dense", "dense"),
        ("random", "20% FLOPs cut"),
        ("random", "30% FLOPs cut"),
    ]
    assert results[1].gflops > results[2].gflops


def test_unknown_or_impossible_reducers_are_refused_before_running():
    suite = MambaSuite(model_loader=lambda: pytest.fail("nothing may load"))
    with pytest.raises(LookupError, match=r"unknown reducer 'mrt'\. Did you mean 'mtr'"):
        suite.check_arguments(_args(mamba_reducers=("mrt",)), "bench")
    with pytest.raises(ValueError, match="'topk' cannot run on a Vision Mamba model"):
        suite.check_arguments(_args(mamba_reducers=("topk",)), "demo")


def test_demo_writes_pictures_inputs_records_and_a_table(model, tmp_path):
    suite = MambaSuite(model_loader=lambda: model)
    args = _args(scenes=2, eval_scenes=12, mamba_reducers=("mtr", "tome"), mamba_flops_cut=0.4)
    report = suite.demo(args, tmp_path, NO_PROGRESS)
    assert isinstance(report, DemoReport) and report.title == MambaSuite.title
    assert [p.name for p in report.images] == ["mamba-mtr.png", "mamba-tome.png"]
    for path in report.images:
        with Image.open(path) as picture:  # two scenes side by side, each 4x upscaled with its text
            assert picture.width > 2 * 256 and picture.height > 256
    assert len(report.rows) == 2
    assert list(report.rows[0]) == ["scene", "truth", "dense", "mtr", "tome"]
    assert report.rows[0]["scene"] == "test #0"
    assert any("GFLOPs" in note for note in report.notes)
    assert [set(r) for r in report.records] == [{"image", "truth", "dense", "reduced"}] * 2
    first = report.records[0]
    assert set(first["reduced"]) == {"mtr", "tome"}
    with Image.open(tmp_path / first["image"]) as saved:
        pixels = torch.frombuffer(bytearray(saved.convert("RGB").tobytes()), dtype=torch.uint8).view(112, 112, 3)
    scene = make_scenes(1, split="test").images[0]
    assert torch.equal(pixels.permute(2, 0, 1), (scene * 255).round().to(torch.uint8)), "the input image, as is"


def test_patch_token_index_skips_the_middle_class_token(model):
    index = patch_token_index(model)
    assert len(index) == 196 and model.cls_index not in index
    assert index[model.cls_index - 1] == model.cls_index - 1 and index[model.cls_index] == model.cls_index + 1
