"""``MambaSuite``: the reference Vim in ``tokred bench`` and ``tokred demo``.

The bench measures the dense ``vim_scenes`` model and every reducer it can run (those of
[`applicable_reducers`][tokred.bench.measure.applicable_reducers] for the scores a Vim supplies: MTR reads the
blocks' Δ, the others only the tokens) at FLOPs cuts of 20, 30 and 40 %, each through
[`tokred.mamba.attach`][tokred.mamba.attach] with the same schedule (``r`` tokens after every second block, 1, 3,
…, 13, solved per cut: MTR's), so that the methods differ only in which tokens they merge or drop. Accuracy is
measured on the ``test`` split of [`tokred.bench.scenes`][tokred.bench.scenes], never seen in
training or model selection.

Columns of a bench row: ``budget`` names the target cut and ``budget_value`` is the cut the solved schedule
achieves (0.405 for 40 %, the same for every reducer); ``gflops`` counts one image in the one-direction
convention of [`count_flops`][tokred.mamba.count_flops] with the handle's schedule; ``time_ms`` is the median wall
time of one batch's forward divided by the batch size; ``peak_memory_mb`` that batch's peak memory; ``tokens``
the mean, over the 16 blocks, of the tokens each block processes (197 for the dense model: 196 patches and the
class token).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any, Literal

import torch
from torch import nn

from tokred.bench.measure import applicable_reducers, peak_memory, time_call
from tokred.bench.scenes import SceneSet, label_name, make_scenes
from tokred.bench.suite import BenchResult, DemoReport, ProgressFactory, ReferenceSuite
from tokred.core.cli.options import fraction_list, name_list, open_fraction
from tokred.core.errors import IncompatibleReducerError
from tokred.core.registry import REDUCERS, get_reducer_class
from tokred.mamba import attach, count_flops, create_model
from tokred.mamba.flops import token_counts
from tokred.mamba.scores import SUPPLIED_SCORES

__all__ = [
    "BENCH_SCENES",
    "DEMO_REDUCERS",
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
DEMO_REDUCERS: tuple[str, ...] = ("mtr", "uniform")
"""What ``tokred demo`` runs on the Vim by default: MTR and the best other reducer of the full bench."""
_CONVENTION: Literal["one_direction"] = "one_direction"


def load_reference_vim() -> nn.Module:
    """The reference Vim with its bundled weights, in eval mode."""
    return create_model("vim_scenes", pretrained=True).eval()


def patch_token_index(model: nn.Module) -> list[int]:
    """Index of each patch (row-major) among the model's tokens: the class token sits at ``model.cls_index``."""
    return [p if p < model.cls_index else p + 1 for p in range(model.num_patches)]


@torch.no_grad()
def accuracy(
    model: nn.Module,
    scenes: SceneSet,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy of ``model`` on the scenes' targets, and its predictions ``(B,)``.

    Args:
        model: An eval-mode classifier of ``(B, 3, H, W)`` images.
        scenes: The scenes, with their labels.
        batch_size: Images per forward pass.
        device: Where the images go (the model's device).
        on_batch: Called with the number of images after each batch (progress).
    """
    predictions = []
    for start in range(0, len(scenes), batch_size):
        batch = scenes.images[start : start + batch_size].to(device)
        predictions.append(model(batch).argmax(-1).cpu())
        if on_batch is not None:
            on_batch(len(batch))
    predicted = torch.cat(predictions)
    return float((predicted == scenes.labels).float().mean()), predicted


def _reducer_config(name: str, seed: int) -> dict[str, Any]:
    """``seed=`` for stochastic reducers (``random``), nothing for the others."""
    return {"seed": seed} if get_reducer_class(name).stochastic else {}


class MambaSuite(ReferenceSuite):
    """The reference Vim (``vim_scenes``) classifying the target object of held-out pattern scenes.

    Options: ``--mamba-reducers`` (bench: every applicable reducer; demo: ``DEMO_REDUCERS``), ``--mamba-flops-cuts``
    (bench: 0.2,0.3,0.4; 0.4 with ``--quick``) and ``--mamba-flops-cut`` (demo: 0.4).
    """

    name = "mamba"
    title = "Vim on pattern scenes"
    budget_axis = "FLOPs cut"

    def __init__(self, model_loader: Callable[[], nn.Module] = load_reference_vim) -> None:
        self._model_loader = model_loader
        self._model: nn.Module | None = None

    def model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The eval-mode reference model on ``device``, loaded on first use."""
        if self._model is None:
            self._model = self._model_loader().eval()
        return self._model.to(device)

    def add_arguments(self, parser: argparse.ArgumentParser, command: Literal["bench", "demo"]) -> None:
        """Add the ``--mamba-`` options of ``bench`` or ``demo``."""
        default = "every reducer a Vim can run" if command == "bench" else ",".join(DEMO_REDUCERS)
        parser.add_argument(
            "--mamba-reducers",
            type=name_list,
            default=None,
            metavar="NAMES",
            help=f"Vim suite: reducers to run, comma-separated (default: {default})",
        )
        if command == "bench":
            parser.add_argument(
                "--mamba-flops-cuts",
                type=fraction_list,
                default=None,
                metavar="CUTS",
                help="Vim suite: FLOPs cuts to measure, comma-separated (default 0.2,0.3,0.4; 0.4 with --quick)",
            )
        else:
            parser.add_argument(
                "--mamba-flops-cut",
                type=open_fraction,
                default=0.4,
                metavar="CUT",
                help="Vim suite: fraction of the FLOPs the reduced runs save (default 0.4)",
            )

    def _reducers(self, args: argparse.Namespace, command: str) -> Sequence[str]:
        chosen = getattr(args, "mamba_reducers", None)
        if chosen:
            return chosen
        return applicable_reducers(supplied_scores=SUPPLIED_SCORES) if command == "bench" else DEMO_REDUCERS

    def check_arguments(self, args: argparse.Namespace, command: Literal["bench", "demo"]) -> None:
        """Every reducer asked for exists and can run on a Vim."""
        runnable = applicable_reducers(supplied_scores=SUPPLIED_SCORES)
        for name in getattr(args, "mamba_reducers", None) or ():
            REDUCERS.get(name)  # an unknown name raises, listing the known ones
            if name not in runnable:
                raise IncompatibleReducerError(
                    f"--mamba-reducers: {name!r} cannot run on a Vision Mamba model (it needs scores the model does "
                    f"not supply); these can: {', '.join(runnable)}"
                )

    # ----------------------------------------------------------------------------------------------- bench
    def _row(
        self,
        method: str,
        budget: str,
        budget_value: float,
        scenes: SceneSet,
        args: argparse.Namespace,
        progress: ProgressFactory,
        schedule: dict[int, int],
        dense_accuracy: float | None,
    ) -> BenchResult:
        model = self.model(args.device)
        batch_size = int(args.batch_size)
        with progress(total=len(scenes), desc=f"mamba {method} {budget}", unit="img") as bar:
            acc, _ = accuracy(model, scenes, batch_size=batch_size, device=args.device, on_batch=bar.update)
        first = scenes.images[:batch_size].to(args.device)
        with torch.no_grad():
            timing = time_call(lambda: model(first))
            _, peak = peak_memory(lambda: model(first))
        return BenchResult(
            suite=self.name,
            method=method,
            budget=budget,
            budget_value=budget_value,
            accuracy=acc,
            retained=1.0 if dense_accuracy is None else (acc / dense_accuracy if dense_accuracy else 0.0),
            gflops=count_flops(model, convention=_CONVENTION, schedule=schedule) / 1e9,
            time_ms=1000.0 * timing.median / len(first),
            time_spread=1000.0 * timing.spread / len(first),
            peak_memory_mb=peak / 2**20,
            tokens=fmean(token_counts(model, schedule=schedule)),
            examples=len(scenes),
        )

    def bench(self, args: argparse.Namespace, progress: ProgressFactory) -> list[BenchResult]:
        """Dense row first, then every reducer at every FLOPs cut, on held-out ``test`` scenes.

        ``--quick``: 128 scenes and the 40 % cut only; ``--limit`` caps the scenes.
        """
        quick = bool(getattr(args, "quick", False))
        count = QUICK_SCENES if quick else BENCH_SCENES
        if args.limit is not None:
            count = min(count, int(args.limit))
        cuts = getattr(args, "mamba_flops_cuts", None) or (FLOPS_CUTS[-1:] if quick else FLOPS_CUTS)
        model = self.model(args.device)
        scenes = make_scenes(count, split="test", image_size=model.img_size)

        dense = self._row("dense", "dense", 0.0, scenes, args, progress, {}, None)
        results = [dense]
        dense_flops = count_flops(model, convention=_CONVENTION, schedule={})
        for name in self._reducers(args, "bench"):
            for cut in cuts:
                with attach(model, name, flops_cut=cut, **_reducer_config(name, args.seed)) as handle:
                    schedule = handle.schedule
                    achieved = 1.0 - count_flops(model, convention=_CONVENTION, schedule=schedule) / dense_flops
                    results.append(
                        self._row(
                            name, f"{cut:.0%} FLOPs cut", achieved, scenes, args, progress, schedule, dense.accuracy
                        )
                    )
        return results

    # ------------------------------------------------------------------------------------------------ demo
    def demo(self, args: argparse.Namespace, out_dir: Path, progress: ProgressFactory) -> DemoReport:
        """Classify a few held-out scenes dense and reduced; draw what each reducer kept, merged and dropped.

        Writes ``mamba-{reducer}.png`` per reducer into ``out_dir`` (every scene beside the composed plan of its
        forward pass, [`draw_reduction`][tokred.bench.visualize.draw_reduction]) and ``mamba-scene-{i}.png``,
        the input images of ``demo.json``. With ``args.speed``, also measures a Vim-S forward at the same cut
        ([`vim_forward_speedup`][tokred.bench.speed.vim_forward_speedup]).
        """
        from tokred.bench.visualize import draw_legend, draw_reduction, image_to_pil, tile_pictures

        device = args.device
        model = self.model(device)
        out_dir = Path(out_dir)
        reducers = self._reducers(args, "demo")
        cut = float(args.mamba_flops_cut)
        shown = int(args.scenes)
        eval_count = int(args.eval_scenes) if args.limit is None else min(int(args.eval_scenes), int(args.limit))
        batch_size = int(args.batch_size)

        scenes = make_scenes(shown, split="test", image_size=model.img_size)
        evaluation = make_scenes(eval_count, split="test", image_size=model.img_size)
        inputs = scenes.images.to(device)
        grid = model.grid_size
        patch_tokens = patch_token_index(model)
        dense_flops = count_flops(model, convention=_CONVENTION, schedule={})
        dense_tokens = token_counts(model, schedule={})

        with progress(total=(1 + len(reducers)) * eval_count, desc="mamba demo", unit="img") as bar:
            with torch.no_grad():
                dense_pred = model(inputs).argmax(-1).cpu()
                dense_time = time_call(lambda: model(inputs)).median / shown
            dense_acc, _ = accuracy(model, evaluation, batch_size=batch_size, device=device, on_batch=bar.update)
            columns: dict[str, torch.Tensor] = {}
            notes = [
                f"held-out split: test scenes 0..{shown - 1} shown; accuracy on test scenes 0..{eval_count - 1}",
                f"dense: {dense_tokens[0]} tokens in every block, {dense_flops / 1e9:.3f} GFLOPs, "
                f"{1000 * dense_time:.2f} ms per image, accuracy {dense_acc:.1%}",
            ]
            images = []
            for name in reducers:
                config = _reducer_config(name, args.seed)
                with attach(model, name, flops_cut=cut, record_plans=True, **config) as handle:
                    with torch.no_grad():
                        columns[name] = model(inputs).argmax(-1).cpu()
                        plans = handle.last_plans
                        reduced_time = time_call(lambda: model(inputs)).median / shown
                    reduced_acc, _ = accuracy(
                        model, evaluation, batch_size=batch_size, device=device, on_batch=bar.update
                    )
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
                for row, scene in enumerate(scenes.scenes):
                    truth, dense_answer = label_name(scene.label), label_name(int(dense_pred[row]))
                    caption = [
                        f"truth: {truth}",
                        f"dense: {dense_answer} · {name}: {label_name(int(columns[name][row]))}",
                    ]
                    pictures.append(
                        draw_reduction(
                            scenes.images[row],
                            plans[row].reduction,
                            grid,
                            patch_tokens=patch_tokens,
                            scale=4,
                            title=f"test #{scene.index}",
                            caption=caption,
                            legend=False,
                        )
                    )
                path = out_dir / f"mamba-{name}.png"
                heading = (
                    f"{self.title}, held-out: {name} at a {cut:.0%} FLOPs cut "
                    f"({counts[0]} to {counts[-1]} tokens), answers beside the dense model's"
                )
                tile_pictures(pictures, columns=3, footer=draw_legend(), title=heading).save(path)
                images.append(path)
        notes.append(
            "pictures: each scene's patches as its forward left them: kept (white frame), a kept token that "
            "absorbed others (thick frame in its colour), merged into it (corner marks in that colour), dropped (grey)"
        )
        if getattr(args, "speed", False):
            from tokred.bench.speed import vim_forward_speedup

            # One timed pair after the warm-up: the demo has about a minute and a half in all.
            notes.append(vim_forward_speedup(flops_cut=cut, repeats=1).line())

        rows, records = [], []
        for row, scene in enumerate(scenes.scenes):
            truth = scene.label
            entry = {"scene": f"test #{scene.index}", "truth": label_name(truth)}
            entry["dense"] = _verdict(int(dense_pred[row]), truth)
            for name in reducers:
                entry[name] = _verdict(int(columns[name][row]), truth)
            rows.append(entry)
            image_name = f"mamba-scene-{row}.png"
            image_to_pil(scenes.images[row]).save(out_dir / image_name)
            records.append(
                {
                    "image": image_name,
                    "truth": label_name(truth),
                    "dense": label_name(int(dense_pred[row])),
                    "reduced": {name: label_name(int(columns[name][row])) for name in reducers},
                }
            )
        return DemoReport(title=self.title, rows=rows, images=images, notes=notes, records=records)


def _verdict(prediction: int, truth: int) -> str:
    return label_name(prediction) + ("" if prediction == truth else " ✗")
