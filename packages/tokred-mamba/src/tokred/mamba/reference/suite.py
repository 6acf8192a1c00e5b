"""``tokred bench`` and ``tokred demo`` for tokred-mamba: the reference Vim on held-out procedural scenes.

The bench measures the dense ``vim_scenes`` model and every reducer it can run (those of
:func:`~tokred.core.bench.applicable_reducers` with ``scores_from_model=True``: MTR, ToP-ViM and UTR read the
blocks' Δ, the others only the tokens) at FLOPs cuts of 20, 30 and 40 %, each through
:func:`tokred.mamba.attach` with the same schedule (``r`` tokens after blocks 1, 3, 5, 7, 9, solved per cut),
so that the methods differ only in which tokens they merge or drop. Accuracy is measured on the ``test``
split of :mod:`tokred.core.scenes`, never seen in training or model selection.

Columns of a bench row: ``budget`` names the target cut and ``budget_value`` is the cut the solved schedule
achieves (0.405 for 40 %, the same for every reducer); ``gflops`` counts one image in the one-direction convention of
:func:`~tokred.mamba.count_flops` with the handle's schedule; ``time_ms`` is the median wall time of one
batch's forward divided by the batch size; ``peak_memory_mb`` that batch's peak memory; ``tokens`` the mean,
over the 12 blocks, of the tokens each block processes (65 for the dense model: 64 patches and the class
token).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any, Literal

import torch
from torch import nn

from tokred.core.bench import BenchResult, DemoReport, Progress, ReferenceSuite, applicable_reducers, time_call
from tokred.core.bench import peak_memory as measure_peak_memory
from tokred.core.registry import get_reducer_class
from tokred.core.scenes import SceneSet, label_name, make_scenes
from tokred.core.visualize import draw_reduction, save_png, tile_images
from tokred.mamba.flops import count_flops, token_counts
from tokred.mamba.reduction import attach
from tokred.mamba.reference.model import load_reference_vim

__all__ = [
    "BENCH_SCENES",
    "FLOPS_CUTS",
    "QUICK_SCENES",
    "MambaSuite",
    "accuracy",
    "patch_token_index",
]

FLOPS_CUTS: tuple[float, ...] = (0.2, 0.3, 0.4)
"""FLOPs cuts of the full bench (the MTR paper's); ``--quick`` runs only the last."""
BENCH_SCENES = 1000
"""Held-out ``test`` scenes of the full bench."""
QUICK_SCENES = 128
"""Held-out ``test`` scenes of ``--quick``."""
_CONVENTION: Literal["one_direction"] = "one_direction"


def patch_token_index(model: nn.Module) -> list[int]:
    """Index of each patch (row-major) among the model's tokens: the class token sits at ``model.cls_index``."""
    return [p if p < model.cls_index else p + 1 for p in range(model.num_patches)]


@torch.no_grad()
def accuracy(
    model: nn.Module,
    scenes: SceneSet,
    *,
    batch_size: int,
    on_batch: Callable[[], None] | None = None,
) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy of ``model`` on the scenes' targets, and its predictions ``(B,)``.

    Args:
        model: An eval-mode classifier of ``(B, 3, H, W)`` images.
        scenes: The scenes, with their labels.
        batch_size: Images per forward pass.
        on_batch: Called after each batch (progress).
    """
    predictions = []
    for start in range(0, len(scenes), batch_size):
        predictions.append(model(scenes.images[start : start + batch_size]).argmax(-1))
        if on_batch is not None:
            on_batch()
    predicted = torch.cat(predictions)
    return float((predicted == scenes.labels).float().mean()), predicted


def _reducer_config(name: str, seed: int) -> dict[str, Any]:
    """``seed=`` for reducers that take one (``random``), nothing for the others."""
    parameters = inspect.signature(get_reducer_class(name).__init__).parameters
    return {"seed": seed} if "seed" in parameters else {}


def _cuts(text: str) -> tuple[float, ...]:
    try:
        cuts = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions such as 0.2,0.3,0.4; got {text!r}"
        ) from error
    if not cuts or not all(0.0 < cut < 1.0 for cut in cuts):
        raise argparse.ArgumentTypeError(f"FLOPs cuts must lie in (0, 1); got {text!r}")
    return cuts


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _upscale(image: torch.Tensor, scale: int) -> torch.Tensor:
    """``(3, H, W)`` in ``[0, 1]`` → uint8 ``(H·scale, W·scale, 3)``, nearest neighbour."""
    picture = image.clamp(0, 1).permute(1, 2, 0).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return (picture * 255).round().to(torch.uint8)


class MambaSuite(ReferenceSuite):
    """The reference Vim (``vim_scenes``) classifying the target object of held-out procedural scenes.

    Options (``tokred bench``): ``--mamba-cuts`` (FLOPs cuts, default 0.2,0.3,0.4; 0.4 with ``--quick``) and
    ``--mamba-reducers`` (default: every applicable one). ``tokred demo``: ``--mamba-scenes`` (6),
    ``--mamba-reducer`` (``mtr``; comma-separated for several), ``--mamba-flops-cut`` (0.4) and
    ``--mamba-eval-scenes`` (200 held-out scenes for the accuracy note).
    """

    name = "mamba"
    title = "Vim on procedural scenes"
    budget_axis = "FLOPs cut"

    def __init__(self, model_loader: Callable[[], nn.Module] = load_reference_vim) -> None:
        self._model_loader = model_loader
        self._model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        """The eval-mode reference model, loaded on first use."""
        if self._model is None:
            self._model = self._model_loader().eval()
        return self._model

    def add_arguments(self, parser: argparse.ArgumentParser, command: Literal["bench", "demo"]) -> None:
        """Add the ``--mamba-`` options of ``bench`` or ``demo``."""
        if command == "bench":
            parser.add_argument(
                "--mamba-cuts",
                type=_cuts,
                default=None,
                metavar="CUTS",
                help="FLOPs cuts to measure, comma-separated (default 0.2,0.3,0.4; 0.4 with --quick)",
            )
            parser.add_argument(
                "--mamba-reducers",
                type=_names,
                default=None,
                metavar="NAMES",
                help="reducers to measure, comma-separated (default: every reducer a Vim can run)",
            )
        else:
            parser.add_argument("--mamba-scenes", type=int, default=6, help="held-out scenes to show (default 6)")
            parser.add_argument(
                "--mamba-reducer",
                type=_names,
                default=("mtr",),
                metavar="NAMES",
                help="reducer to compare with the dense model; comma-separated for several (default mtr)",
            )
            parser.add_argument(
                "--mamba-flops-cut", type=float, default=0.4, help="FLOPs cut of the reduced runs (default 0.4)"
            )
            parser.add_argument(
                "--mamba-eval-scenes",
                type=int,
                default=200,
                help="held-out scenes for the accuracy note under the table (default 200)",
            )

    # ----------------------------------------------------------------------------------------------- bench
    def _row(
        self,
        method: str,
        budget: str,
        budget_value: float,
        scenes: SceneSet,
        args: argparse.Namespace,
        progress: Progress,
        schedule: dict[int, int],
        dense_accuracy: float | None,
    ) -> BenchResult:
        model = self.model
        batch_size = max(1, int(args.batch_size))
        batches = -(-len(scenes) // batch_size)
        with progress.task(f"mamba: {method} {budget}", total=batches + 2) as bar:
            acc, _ = accuracy(model, scenes, batch_size=batch_size, on_batch=bar.update)
            first = scenes.images[:batch_size]
            with torch.no_grad():
                seconds = time_call(lambda: model(first))
                bar.update()
                _, peak = measure_peak_memory(lambda: model(first))
                bar.update()
        return BenchResult(
            suite=self.name,
            method=method,
            budget=budget,
            budget_value=budget_value,
            accuracy=acc,
            retained=1.0 if dense_accuracy is None else (acc / dense_accuracy if dense_accuracy else 0.0),
            gflops=count_flops(model, convention=_CONVENTION, schedule=schedule) / 1e9,
            time_ms=1000.0 * seconds / len(first),
            peak_memory_mb=peak / 2**20,
            tokens=fmean(token_counts(model, schedule=schedule)),
            examples=len(scenes),
        )

    def bench(self, args: argparse.Namespace, progress: Progress) -> list[BenchResult]:
        """Dense row first, then every reducer at every FLOPs cut, on held-out ``test`` scenes.

        ``--quick``: 128 scenes and the 40 % cut only; ``--limit`` caps the scenes.
        """
        quick = bool(getattr(args, "quick", False))
        count = QUICK_SCENES if quick else BENCH_SCENES
        if getattr(args, "limit", None) is not None:
            count = max(1, min(count, int(args.limit)))
        cuts = getattr(args, "mamba_cuts", None) or (FLOPS_CUTS[-1:] if quick else FLOPS_CUTS)
        reducers = getattr(args, "mamba_reducers", None) or applicable_reducers(scores_from_model=True)
        seed = int(getattr(args, "seed", 0))
        model = self.model
        scenes = make_scenes(count, split="test", image_size=model.img_size)

        dense = self._row("dense", "dense", 0.0, scenes, args, progress, {}, None)
        results = [dense]
        dense_flops = count_flops(model, convention=_CONVENTION, schedule={})
        for name in reducers:
            for cut in cuts:
                try:
                    handle = attach(model, name, flops_cut=cut, **_reducer_config(name, seed))
                except Exception as error:  # a reducer that cannot run on a Vim is reported, not fatal
                    print(f"tokred bench: mamba: skipping {name} at {cut:.0%}: {error}", file=sys.stderr)
                    continue
                with handle:
                    schedule = handle.schedule
                    achieved = 1.0 - count_flops(model, convention=_CONVENTION, schedule=schedule) / dense_flops
                    results.append(
                        self._row(
                            name,
                            f"{cut:.0%} FLOPs cut",
                            achieved,
                            scenes,
                            args,
                            progress,
                            schedule,
                            dense.accuracy,
                        )
                    )
        return results

    # ------------------------------------------------------------------------------------------------ demo
    def demo(self, args: argparse.Namespace, out_dir: Path, progress: Progress) -> DemoReport:
        """Classify a few held-out scenes dense and reduced; draw what each reducer kept, merged and dropped.

        Writes ``mamba-{reducer}.png`` per reducer into ``out_dir``: one row per scene, the scene beside the
        composed plan of its forward pass (:func:`tokred.core.visualize.draw_reduction`).
        """
        model = self.model
        out_dir = Path(out_dir)
        reducers: Sequence[str] = getattr(args, "mamba_reducer", None) or ("mtr",)
        cut = float(getattr(args, "mamba_flops_cut", 0.4))
        shown = max(1, int(getattr(args, "mamba_scenes", 6)))
        eval_count = max(1, int(getattr(args, "mamba_eval_scenes", 200)))
        if getattr(args, "limit", None) is not None:
            eval_count = max(1, min(eval_count, int(args.limit)))
        seed = int(getattr(args, "seed", 0))
        batch_size = max(1, int(getattr(args, "batch_size", 32)))

        scenes = make_scenes(shown, split="test", image_size=model.img_size)
        evaluation = make_scenes(eval_count, split="test", image_size=model.img_size)
        grid = model.grid_size
        patch_tokens = patch_token_index(model)
        dense_flops = count_flops(model, convention=_CONVENTION, schedule={})
        dense_tokens = token_counts(model, schedule={})

        steps = 2 + 2 * len(reducers)
        with progress.task("mamba: demo", total=steps) as bar:
            with torch.no_grad():
                dense_pred = model(scenes.images).argmax(-1)
                dense_time = time_call(lambda: model(scenes.images), repeats=3) / shown
            bar.update()
            dense_acc, _ = accuracy(model, evaluation, batch_size=batch_size)
            bar.update()
            columns: dict[str, torch.Tensor] = {}
            notes = [
                f"held-out split: test scenes 0..{shown - 1} shown; accuracy on test scenes 0..{eval_count - 1}",
                f"dense: {dense_tokens[0]} tokens in every block, {dense_flops / 1e9:.3f} GFLOPs, "
                f"{1000 * dense_time:.2f} ms per image, accuracy {dense_acc:.1%}",
            ]
            images = []
            for name in reducers:
                with attach(model, name, flops_cut=cut, track=True, **_reducer_config(name, seed)) as handle:
                    with torch.no_grad():
                        columns[name] = model(scenes.images).argmax(-1)
                        plan = handle.last_plan
                        reduced_time = time_call(lambda: model(scenes.images), repeats=3) / shown
                    bar.update()
                    reduced_acc, _ = accuracy(model, evaluation, batch_size=batch_size)
                    bar.update()
                    schedule = handle.schedule
                counts = token_counts(model, schedule=schedule)
                flops = count_flops(model, convention=_CONVENTION, schedule=schedule)
                notes.append(
                    f"{name} at a {cut:.0%} FLOPs cut (schedule {schedule}): {counts[0]} → {counts[-1]} tokens, "
                    f"{fmean(counts):.1f} per block on average, {flops / 1e9:.3f} GFLOPs "
                    f"({1 - flops / dense_flops:.1%} fewer), {1000 * reduced_time:.2f} ms per image, "
                    f"accuracy {reduced_acc:.1%} ({reduced_acc / dense_acc if dense_acc else 0.0:.1%} of dense)"
                )
                pictures = []
                for row in range(shown):
                    pictures.append(_upscale(scenes.images[row], 4))
                    pictures.append(
                        draw_reduction(scenes.images[row], plan, grid, row=row, patch_tokens=patch_tokens, scale=4)
                    )
                images.append(save_png(tile_images(pictures, columns=2), out_dir / f"mamba-{name}.png"))
        notes.append(
            "pictures: each scene beside what its forward kept (white frame), merged (tinted with its cluster's "
            "colour) or dropped (dark)"
        )

        def verdict(prediction: int, truth: int) -> str:
            return label_name(prediction) + ("" if prediction == truth else " ✗")

        rows = []
        for row, scene in enumerate(scenes.scenes):
            truth = scene.label
            entry = {"scene": f"test #{scene.index}", "truth": label_name(truth)}
            entry["dense"] = verdict(int(dense_pred[row]), truth)
            for name in reducers:
                entry[name] = verdict(int(columns[name][row]), truth)
            rows.append(entry)
        return DemoReport(title=self.title, rows=rows, images=images, notes=notes)
