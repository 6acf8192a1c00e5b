"""``VLMSuite``: the reference LLaVA in ``tokred bench`` and ``tokred demo``.

The bench asks the shipped reference model (:func:`~tokred.vlm.reference.model.load_reference_model`) held-out
questions about procedural scenes of the ``test`` split, densely and with every applicable reducer attached
(:func:`tokred.vlm.attach`, LLaVA's default ``space="vision"``: each image's vision features are reduced
before the projector) at 50 %, 25 % and 11 % of the visual tokens. The demo answers a few questions densely and
with one reducer, and draws which patches of each image survived.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from tokred.core.bench import (
    BenchResult,
    DemoReport,
    Progress,
    ReferenceSuite,
    applicable_reducers,
    peak_memory,
    time_call,
)
from tokred.core.reducer import Reducer
from tokred.core.registry import create_reducer, get_reducer_class
from tokred.vlm.apet import ApET
from tokred.vlm.attachment import attach
from tokred.vlm.reference.model import encode, evaluate, load_reference_model, predict, score
from tokred.vlm.reference.questions import make_questions

__all__ = ["BUDGETS", "EXCLUDED_REDUCERS", "POSITIONS", "VLMSuite", "make_reducer", "method_names"]

BUDGETS: tuple[float, ...] = (0.5, 0.25, 0.11)
"""Fractions of each image's visual tokens kept by the bench."""

EXCLUDED_REDUCERS: tuple[str, ...] = ("topvim", "utr")
"""Registered reducers the VLM bench leaves out.

``topvim`` and ``utr`` are tokred-mamba's Vision Mamba reducers: both rank tokens by the clipped output mass
``Σ_d max(0, y_d)`` of a Mamba block, a criterion that has no meaning for CLIP vision features (and the mamba
suite measures them where it does).
"""

POSITIONS = "original"
"""The ``positions`` the suite attaches with by default (``--vlm-positions``).

The reference model reads the question *before* the image (its prompt is ``"user: {question} <image>"``, then
``"assistant:"``), so closing the gaps of removed tokens (``"compact"``, the LLaVA default of :func:`attach`,
made for LLaVA-1.5's image-first prompts) moves the answer position up to 89 positions closer to the question
than in any sequence the model has seen, and its RoPE attention breaks down for every reducer alike
(``docs/vlm/reference-model.md`` has the figures). ``"original"`` keeps every token's position.
"""

_FULL_QUESTIONS = 1000
_QUICK_QUESTIONS = 128
_DEMO_ACCURACY_QUESTIONS = 200


def method_names() -> list[str]:
    """The bench's reduced methods, in order: ``"apet"``, ``"apet (reference)"``, then the other reducers."""
    names = [n for n in applicable_reducers() if n not in EXCLUDED_REDUCERS]
    methods = []
    for name in names:
        methods.append(name)
        if name == "apet":
            methods.append("apet (reference)")
    return methods


def make_reducer(method: str, num_keep: int, *, seed: int = 0) -> Reducer:
    """The reducer of a bench method keeping ``num_keep`` tokens per image.

    Args:
        method: A name from :func:`method_names` (``"apet (reference)"`` is ApET with ``variant="reference"``).
        num_keep: Visual tokens kept per image.
        seed: Seed of stochastic reducers.

    Returns:
        The reducer.
    """
    if method in ("apet", "apet (reference)"):
        return ApET(num_keep=num_keep, variant="reference" if method != "apet" else "paper", seed=seed)
    parameters = inspect.signature(get_reducer_class(method).__init__).parameters
    extra = {"seed": seed} if "seed" in parameters else {}
    return create_reducer(method, num_keep=num_keep, **extra)


def _slug(method: str) -> str:
    return method.replace(" (", "-").replace(")", "").replace(" ", "-")


class VLMSuite(ReferenceSuite):
    """The reference LLaVA on procedural scenes (see the module docstring).

    Options (``tokred bench`` and ``tokred demo``): ``--vlm-model PATH``, a checkpoint folder written by
    ``scripts/train_llava_scenes.py`` (default: the shipped one); ``--vlm-positions`` (default
    :data:`POSITIONS`). ``tokred demo`` only: ``--vlm-scenes``, ``--vlm-reducer``, ``--vlm-keep``.

    Attributes:
        per_kind: After :meth:`bench`, the accuracy per question kind of every row, by ``(method, budget)``.
    """

    name: ClassVar[str] = "vlm"
    title: ClassVar[str] = "LLaVA on procedural scenes"
    budget_axis: ClassVar[str] = "visual tokens kept"

    def __init__(self) -> None:
        self.per_kind: dict[tuple[str, str], dict[str, float]] = {}
        self._loaded: dict[str | None, tuple[Any, Any]] = {}

    def add_arguments(self, parser: argparse.ArgumentParser, command: Literal["bench", "demo"]) -> None:
        """Add ``--vlm-model``, ``--vlm-positions`` (both) and ``--vlm-scenes``, ``--vlm-reducer``, ``--vlm-keep``."""
        parser.add_argument(
            "--vlm-model",
            metavar="PATH",
            default=None,
            help="VLM suite: reference checkpoint folder (default: the one shipped with tokred-vlm)",
        )
        parser.add_argument(
            "--vlm-positions",
            choices=("original", "compact"),
            default=POSITIONS,
            help=f"VLM suite: positions of the kept tokens, as in attach() (default {POSITIONS}: the model reads "
            "the question before the image, and compact positions move the answer away from it)",
        )
        if command != "demo":
            return
        parser.add_argument(
            "--vlm-scenes", type=int, default=6, metavar="N", help="VLM demo: held-out scenes to show (default 6)"
        )
        parser.add_argument(
            "--vlm-reducer",
            default="apet",
            choices=[_slug(m) for m in method_names()],
            help="VLM demo: reducer to compare with the dense model (default apet)",
        )
        parser.add_argument(
            "--vlm-keep",
            type=float,
            default=0.11,
            metavar="FRACTION",
            help="VLM demo: fraction of each image's visual tokens kept (default 0.11)",
        )

    # ------------------------------------------------------------------------------------------ helpers
    def _load(self, args: argparse.Namespace) -> tuple[Any, Any]:
        path = getattr(args, "vlm_model", None)
        if path not in self._loaded:
            self._loaded[path] = load_reference_model(path)
        return self._loaded[path]

    @staticmethod
    def _visual_tokens(model: Any) -> int:
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    @staticmethod
    def _image_size(model: Any) -> int:
        return model.config.vision_config.image_size

    @staticmethod
    def _prefill(model: Any, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(**inputs, logits_to_keep=1)

        return run

    @staticmethod
    def _gflops(run: Callable[[], Any], batch: int) -> float:
        with FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops() / batch / 1e9

    # ------------------------------------------------------------------------------------------ bench
    def bench(self, args: argparse.Namespace, progress: Progress) -> list[BenchResult]:
        """Dense model first, then every reducer at 50 / 25 / 11 % of the visual tokens (11 % only with ``quick``).

        Accuracy is measured on the first 1000 questions of the ``test`` split (128 with ``quick``; at most
        ``limit``); GFLOPs (``FlopCounterMode``), time (``time_call``) and peak memory (``peak_memory``) of the
        prefill ``model(**inputs, logits_to_keep=1)`` on the first batch of ``batch_size`` questions, per
        example; ``tokens`` is the visual tokens kept per image. Reducers are attached with LLaVA's default space
        (``"vision"``) and ``positions=args.vlm_positions`` (default :data:`POSITIONS`).
        """
        model, processor = self._load(args)
        count = _QUICK_QUESTIONS if args.quick else _FULL_QUESTIONS
        if args.limit is not None:
            count = max(1, min(count, args.limit))
        budgets = BUDGETS[-1:] if args.quick else BUDGETS
        questions = make_questions(count, split="test", image_size=self._image_size(model))
        encoded = encode(questions, processor, max(1, args.batch_size))
        probe = encoded[0]
        probe_size = len(probe["input_ids"])
        total = self._visual_tokens(model)
        positions = getattr(args, "vlm_positions", POSITIONS)
        self.per_kind = {}

        def measure(method: str, budget: str, value: float, reducer: Reducer | None) -> BenchResult:
            context = attach(model, reducer, positions=positions) if reducer is not None else contextlib.nullcontext()
            with progress.task(f"vlm {method} {budget}", total=len(questions)) as bar, context as handle:
                result = evaluate(model, processor, questions, encoded=encoded, on_batch=bar.update)
                run = self._prefill(model, probe)
                gflops = self._gflops(run, probe_size)
                tokens = float(total)
                if handle is not None and handle.last_prefill is not None and handle.last_prefill.groups:
                    tokens = handle.last_prefill.kept_visual_tokens / handle.last_prefill.groups
                seconds = time_call(run)
                _, peak = peak_memory(run)
            self.per_kind[(method, budget)] = result.per_kind
            dense_accuracy = rows[0].accuracy if rows else result.accuracy
            return BenchResult(
                suite=self.name,
                method=method,
                budget=budget,
                budget_value=value,
                accuracy=result.accuracy,
                retained=result.accuracy / dense_accuracy if dense_accuracy > 0 else 0.0,
                gflops=gflops,
                time_ms=seconds / probe_size * 1000,
                peak_memory_mb=peak / 2**20,
                tokens=tokens,
                examples=result.examples,
            )

        rows: list[BenchResult] = []
        rows.append(measure("dense", "dense", 1.0, None))
        for method in method_names():
            for fraction in budgets:
                keep = max(1, round(fraction * total))
                reducer = make_reducer(method, keep, seed=args.seed)
                rows.append(measure(method, f"{round(fraction * 100)}% tokens", fraction, reducer))
        return rows

    # ------------------------------------------------------------------------------------------ demo
    def demo(self, args: argparse.Namespace, out_dir: Path, progress: Progress) -> DemoReport:
        """Answer a few held-out questions densely and with one reducer; draw each image's surviving patches.

        Writes ``vlm-{reducer}.png``: every scene, and beside it the reducer's plan for its visual tokens
        (kept patches framed, merged ones tinted by the token they joined, dropped ones dark).
        """
        from tokred.core.visualize import draw_reduction, save_png, tile_images

        model, processor = self._load(args)
        methods = {_slug(m): m for m in method_names()}
        method = methods.get(args.vlm_reducer, args.vlm_reducer)
        if not 0 < args.vlm_keep <= 1:
            raise ValueError(f"--vlm-keep must be a fraction in (0, 1]; got {args.vlm_keep}")
        total = self._visual_tokens(model)
        keep = max(1, round(args.vlm_keep * total))
        size = self._image_size(model)
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        count = max(1, args.vlm_scenes)
        if args.limit is not None:
            count = max(1, min(count, args.limit))
        shown = make_questions(count, split="test", image_size=size)
        (inputs,) = encode(shown, processor, count)
        tokenizer = processor.tokenizer

        def answers(ids: torch.Tensor) -> list[str]:
            return tokenizer.convert_ids_to_tokens(ids[:, -1].tolist())

        small = _DEMO_ACCURACY_QUESTIONS
        if args.limit is not None:
            small = max(1, min(small, args.limit))
        accuracy_set = make_questions(small, split="test", image_size=size)
        accuracy_batches = encode(accuracy_set, processor, max(1, args.batch_size))
        generate = {"max_new_tokens": 1, "do_sample": False}
        run = self._prefill(model, inputs)
        with progress.task("vlm demo", total=2 * (count + small)) as bar, torch.no_grad():
            dense = answers(model.generate(**inputs, **generate))
            dense_gflops, dense_seconds = self._gflops(run, count), time_call(run)
            bar.update(count)
            dense_accuracy = score(
                accuracy_set.questions, predict(model, processor, accuracy_batches, on_batch=bar.update)
            )
            reducer = make_reducer(method, keep, seed=args.seed)
            positions = getattr(args, "vlm_positions", POSITIONS)
            with attach(model, reducer, positions=positions, record_plans=True) as handle:
                reduced = answers(model.generate(**inputs, **generate))
                plans = handle.last_plans
                kept = handle.last_prefill.kept_visual_tokens / handle.last_prefill.groups
                reduced_gflops, reduced_seconds = self._gflops(run, count), time_call(run)
                bar.update(count)
                reduced_accuracy = score(
                    accuracy_set.questions, predict(model, processor, accuracy_batches, on_batch=bar.update)
                )

        rows = [
            {
                "scene": f"test #{scene.index}",
                "question": question.text,
                "truth": question.answer,
                "dense": answer,
                method: other,
            }
            for scene, question, answer, other in zip(shown.scenes, shown.questions, dense, reduced, strict=True)
        ]
        scale = max(1, min(4, 320 // size))  # 320-pixel pictures of the 80-pixel scenes
        pictures = []
        for image, plan in zip(shown.images, plans, strict=True):
            plain = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
            pictures.append(plain.repeat_interleave(scale, 0).repeat_interleave(scale, 1))
            pictures.append(draw_reduction(image, plan.reduction, grid=(side, side), scale=scale))
        path = save_png(tile_images(pictures, columns=2), Path(out_dir) / f"vlm-{_slug(method)}.png")
        notes = [
            f"{method} keeps {kept:g} of {total} visual tokens per image ({kept / total:.0%}); "
            f"plans drawn in {path.name}: kept patches framed, merged ones tinted, dropped ones dark",
            f"prefill per example: dense {dense_gflops:.3f} GFLOPs, {dense_seconds / count * 1000:.2f} ms; "
            f"{method} {reduced_gflops:.3f} GFLOPs, {reduced_seconds / count * 1000:.2f} ms",
            f"accuracy on {small} held-out questions (test split): dense {dense_accuracy.accuracy:.1%}, "
            f"{method} {reduced_accuracy.accuracy:.1%}",
        ]
        title = f"{self.title}: dense vs {method} at {keep} of {total} visual tokens"
        return DemoReport(title=title, rows=rows, images=[path], notes=notes)
