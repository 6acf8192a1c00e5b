"""``VLMSuite``: the reference LLaVA in ``tokred bench`` and ``tokred demo``.

The bench asks the bundled reference model ([`load_reference_model`][tokred.bench.reference.llava.load_reference_model])
held-out questions about pattern scenes of the ``test`` split, densely and with every applicable reducer
attached ([`tokred.vlm.attach`][tokred.vlm.attach], LLaVA's default ``space="vision"``: each image's vision features
are reduced before the projector) at 33 %, 22 % and 11 % of the visual tokens: the 192, 128 and 64 of 576 of the
LLaVA-1.5 tables. The demo answers a few questions densely and with one reducer, and draws which patches of each
image survived.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from tokred.bench.measure import applicable_reducers, peak_memory, time_call
from tokred.bench.reference.llava import encode, evaluate, load_reference_model, predict, score
from tokred.bench.reference.questions import make_questions
from tokred.bench.suite import BenchResult, DemoReport, ProgressFactory, ReferenceSuite
from tokred.core.cli.options import fraction, fraction_list, name_list
from tokred.core.errors import IncompatibleReducerError, UnknownReducerError
from tokred.core.reducer import Reducer
from tokred.core.registry import REDUCERS, create_reducer, get_reducer_class
from tokred.vlm import ApET, attach, paper_schedule

__all__ = [
    "BUDGETS",
    "DEMO_METHODS",
    "EXCLUDED_REDUCERS",
    "POSITIONS",
    "REFERENCE_METHOD",
    "TWO_STAGE_METHOD",
    "VLMSuite",
    "make_reducer",
    "method_names",
    "schedule_for",
]

BUDGETS: tuple[float, ...] = (0.33, 0.22, 0.11)
"""Fractions of each image's visual tokens kept by the bench: 192, 128 and 64 of LLaVA-1.5's 576."""

EXCLUDED_REDUCERS: tuple[str, ...] = ("topvim", "utr")
"""Registered reducers the VLM bench leaves out.

``topvim`` and ``utr`` are tokred-mamba's Vision Mamba reducers: both rank tokens by the clipped output mass
``Σ_d max(0, y_d)`` of a Mamba block, a criterion that has no meaning for CLIP vision features (and the mamba
suite measures them where it does).
"""

POSITIONS = "compact"
"""The ``positions`` the suite attaches with by default (``--vlm-positions``): LLaVA's default in
[`attach`][tokred.vlm.attach]. The reference model reads the image before the question, as LLaVA-1.5 does, so
closing the gaps of removed tokens leaves the question and the answer as close to the surviving image tokens as
in the sequences it was trained on.
"""

REFERENCE_METHOD = "apet (reference)"
"""The bench's name of ApET with ``variant="reference"`` (``apet-reference`` on the command line)."""

TWO_STAGE_METHOD = "apet (two-stage)"
"""The bench's name of ApET's paper schedule, [`paper_schedule`][tokred.vlm.paper_schedule] (``apet-two-stage``):
the budget is the visual tokens per image averaged over the decoder layers."""

DEMO_METHODS: tuple[str, ...] = ("apet", "divprune")
"""What ``tokred demo`` runs on the LLaVA by default: ApET and the best other method of the full bench."""

_FULL_QUESTIONS = 1000
_QUICK_QUESTIONS = 128


def method_names() -> list[str]:
    """The bench's reduced methods: ``"apet"``, ``"apet (reference)"``, ``"apet (two-stage)"``, the other reducers."""
    names = [n for n in applicable_reducers() if n not in EXCLUDED_REDUCERS]
    methods = []
    for name in names:
        methods.append(name)
        if name == "apet":
            methods += [REFERENCE_METHOD, TWO_STAGE_METHOD]
    return methods


def method_slug(method: str) -> str:
    """A method's name on the command line and in file names: ``"apet-reference"`` for ``"apet (reference)"``."""
    return method.replace(" (", "-").replace(")", "").replace(" ", "-")


def make_reducer(method: str, num_keep: int, *, seed: int = 0) -> Reducer:
    """The reducer of a bench method keeping ``num_keep`` tokens per image.

    Args:
        method: A name from [`method_names`][tokred.bench.suites.vlm.method_names] (``"apet (reference)"`` is
            ApET with ``variant="reference"``).
        num_keep: Visual tokens kept per image.
        seed: Seed of stochastic reducers.

    Returns:
        The reducer.
    """
    if method in ("apet", REFERENCE_METHOD):
        return ApET(num_keep=num_keep, variant="reference" if method != "apet" else "paper", seed=seed)
    extra = {"seed": seed} if get_reducer_class(method).stochastic else {}
    return create_reducer(method, num_keep=num_keep, **extra)


def schedule_for(method: str, model: Any, num_keep: int, *, seed: int = 0) -> dict[str, Any]:
    """The [`attach`][tokred.vlm.attach] keyword arguments of a bench method at ``num_keep`` tokens per image.

    ``"apet (two-stage)"`` is the paper schedule with ``num_keep`` as its layer average (1.5 times as many in the
    first half of the decoder, half as many after it); every other method is
    [`make_reducer`][tokred.bench.suites.vlm.make_reducer] in one stage.
    """
    if method == TWO_STAGE_METHOD:
        return paper_schedule(model, average=max(2, num_keep), seed=seed)
    return {"reducer": make_reducer(method, num_keep, seed=seed)}


class VLMSuite(ReferenceSuite):
    """The reference LLaVA on pattern scenes (see the module docstring).

    Options (``tokred bench`` and ``tokred demo``): ``--vlm-model PATH``, a checkpoint folder written by
    ``scripts/train_llava_scenes.py`` (default: the bundled one); ``--vlm-positions`` (default
    [`POSITIONS`][tokred.bench.suites.vlm.POSITIONS]); ``--vlm-reducers``; ``--vlm-keep-ratios`` (bench) or
    ``--vlm-keep-ratio`` (demo).

    Attributes:
        per_kind: After [`bench`][tokred.bench.suites.vlm.VLMSuite.bench], the accuracy per question kind of
            every row, by ``(method, budget)``.
    """

    name: ClassVar[str] = "vlm"
    title: ClassVar[str] = "LLaVA on pattern scenes"
    budget_axis: ClassVar[str] = "visual tokens kept"

    def __init__(self) -> None:
        self.per_kind: dict[tuple[str, str], dict[str, float]] = {}
        self._loaded: dict[str | None, tuple[Any, Any]] = {}

    def add_arguments(self, parser: argparse.ArgumentParser, command: Literal["bench", "demo"]) -> None:
        """Add the ``--vlm-`` options of ``bench`` or ``demo``."""
        parser.add_argument(
            "--vlm-model",
            metavar="PATH",
            default=None,
            help="LLaVA suite: reference checkpoint folder (default: the one bundled with tokred-bench)",
        )
        parser.add_argument(
            "--vlm-positions",
            choices=("original", "compact"),
            default=POSITIONS,
            help=f"LLaVA suite: positions of the kept tokens, as in attach() (default {POSITIONS}, LLaVA's)",
        )
        default = "every applicable reducer" if command == "bench" else ",".join(DEMO_METHODS)
        parser.add_argument(
            "--vlm-reducers",
            type=name_list,
            default=None,
            metavar="NAMES",
            help=f"LLaVA suite: reducers to run, comma-separated; apet-reference is ApET's released-code variant "
            f"(default: {default})",
        )
        if command == "bench":
            parser.add_argument(
                "--vlm-keep-ratios",
                type=fraction_list,
                default=None,
                metavar="RATIOS",
                help="LLaVA suite: fractions of each image's visual tokens kept, comma-separated "
                "(default 0.33,0.22,0.11; 0.11 with --quick)",
            )
        else:
            parser.add_argument(
                "--vlm-keep-ratio",
                type=fraction,
                default=0.11,
                metavar="RATIO",
                help="LLaVA suite: fraction of each image's visual tokens kept (default 0.11)",
            )

    def _methods(self, args: argparse.Namespace, command: str) -> list[str]:
        chosen = getattr(args, "vlm_reducers", None)
        if not chosen:
            return method_names() if command == "bench" else list(DEMO_METHODS)
        by_slug = {method_slug(m): m for m in method_names()}
        return [by_slug.get(name, name) for name in chosen]

    def check_arguments(self, args: argparse.Namespace, command: Literal["bench", "demo"]) -> None:
        """Every reducer asked for exists and can run on the LLaVA."""
        runnable = method_names()
        slugs = [method_slug(m) for m in runnable]
        for method in self._methods(args, command):
            if method in runnable:
                continue
            if method not in REDUCERS:  # neither a bench method nor a reducer: say what the suite runs
                close = difflib.get_close_matches(method, slugs, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise UnknownReducerError(
                    f"--vlm-reducers: unknown reducer {method!r}.{hint} The LLaVA suite runs: {', '.join(slugs)}"
                )
            raise IncompatibleReducerError(
                f"--vlm-reducers: {method!r} cannot run on the LLaVA; these can: {', '.join(slugs)}"
            )
        path = getattr(args, "vlm_model", None)
        if path is not None:
            load_reference_model(path)  # a bad folder is reported before anything runs

    # ------------------------------------------------------------------------------------------ helpers
    def _load(self, args: argparse.Namespace) -> tuple[Any, Any]:
        path = getattr(args, "vlm_model", None)
        if path not in self._loaded:
            self._loaded[path] = load_reference_model(path)
        model, processor = self._loaded[path]
        return model.to(args.device), processor

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
    def bench(self, args: argparse.Namespace, progress: ProgressFactory) -> list[BenchResult]:
        """Dense model first, then every reducer at 33 / 22 / 11 % of the visual tokens (11 % only with ``quick``).

        Accuracy is measured on the first 1000 questions of the ``test`` split (128 with ``quick``; at most
        ``limit``); GFLOPs (``FlopCounterMode``), time ([`time_call`][tokred.bench.measure.time_call]) and peak
        memory ([`peak_memory`][tokred.bench.measure.peak_memory]) of the prefill
        ``model(**inputs, logits_to_keep=1)`` on the first batch of ``batch_size`` questions, per example;
        ``tokens`` is the visual tokens kept per image. Reducers are attached with LLaVA's default space
        (``"vision"``) and ``positions=args.vlm_positions`` (default [`POSITIONS`][tokred.bench.suites.vlm.POSITIONS]).
        """
        model, processor = self._load(args)
        count = _QUICK_QUESTIONS if args.quick else _FULL_QUESTIONS
        if args.limit is not None:
            count = min(count, args.limit)
        budgets = getattr(args, "vlm_keep_ratios", None) or (BUDGETS[-1:] if args.quick else BUDGETS)
        questions = make_questions(count, split="test", image_size=self._image_size(model))
        encoded = [_to(batch, args.device) for batch in encode(questions, processor, args.batch_size)]
        probe = encoded[0]
        probe_size = len(probe["input_ids"])
        total = self._visual_tokens(model)
        positions = getattr(args, "vlm_positions", POSITIONS)
        self.per_kind = {}
        rows: list[BenchResult] = []

        def measure(method: str, budget: str, value: float, schedule: dict[str, Any] | None) -> BenchResult:
            context = attach(model, **schedule, positions=positions) if schedule else contextlib.nullcontext()
            with progress(total=len(questions), desc=f"vlm {method} {budget}", unit="q") as bar, context as handle:
                result = evaluate(model, processor, questions, encoded=encoded, on_batch=bar.update)
                run = self._prefill(model, probe)
                gflops = self._gflops(run, probe_size)
                tokens = float(total)
                if handle is not None and handle.last_stats is not None and handle.last_stats.groups:
                    tokens = handle.last_stats.average_visual_tokens
                timing = time_call(run)
                _, peak = peak_memory(run)
            self.per_kind[(method, budget)] = result.per_kind
            dense_accuracy = rows[0].accuracy if rows else result.accuracy
            # The dense row is the reference, whatever its accuracy.
            retained = result.accuracy / dense_accuracy if rows and dense_accuracy > 0 else float(not rows)
            return BenchResult(
                suite=self.name,
                method=method,
                budget=budget,
                budget_value=value,
                accuracy=result.accuracy,
                retained=retained,
                gflops=gflops,
                time_ms=timing.median / probe_size * 1000,
                time_spread=timing.spread / probe_size * 1000,
                peak_memory_mb=peak / 2**20,
                tokens=tokens,
                examples=result.examples,
            )

        rows.append(measure("dense", "dense", 1.0, None))
        for method in self._methods(args, "bench"):
            for fraction_kept in budgets:
                keep = max(1, round(fraction_kept * total))
                schedule = schedule_for(method, model, keep, seed=args.seed)
                rows.append(measure(method, f"{round(fraction_kept * 100)}% tokens", fraction_kept, schedule))
        return rows

    # ------------------------------------------------------------------------------------------ demo
    def demo(self, args: argparse.Namespace, out_dir: Path, progress: ProgressFactory) -> DemoReport:
        """Answer a few held-out questions densely and with each demo reducer; draw each image's surviving patches.

        Writes ``vlm-{reducer}.png`` per reducer: every scene with the reducer's plan for its visual tokens drawn
        over it, the question and the answers under it; and ``vlm-scene-{i}.png``, the input images of
        ``demo.json``. With ``args.speed``, also measures a prefill at LLaVA-1.5-7B's shapes
        ([`llava_prefill_speedup`][tokred.bench.speed.llava_prefill_speedup]).
        """
        from tokred.bench.visualize import draw_legend, draw_reduction, image_to_pil, tile_pictures

        model, processor = self._load(args)
        methods = self._methods(args, "demo")
        total = self._visual_tokens(model)
        keep = max(1, round(args.vlm_keep_ratio * total))
        size = self._image_size(model)
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        count = int(args.scenes)
        shown = make_questions(count, split="test", image_size=size)
        (inputs,) = [_to(batch, args.device) for batch in encode(shown, processor, count)]
        tokenizer = processor.tokenizer

        def answers(ids: torch.Tensor) -> list[str]:
            return tokenizer.convert_ids_to_tokens(ids[:, -1].tolist())

        small = int(args.eval_scenes) if args.limit is None else min(int(args.eval_scenes), int(args.limit))
        accuracy_set = make_questions(small, split="test", image_size=size)
        accuracy_batches = [_to(b, args.device) for b in encode(accuracy_set, processor, args.batch_size)]
        generate = {"max_new_tokens": 1, "do_sample": False}
        run = self._prefill(model, inputs)
        positions = getattr(args, "vlm_positions", POSITIONS)
        reduced: dict[str, dict[str, Any]] = {}
        with progress(total=(1 + len(methods)) * small, desc="vlm demo", unit="q") as bar, torch.no_grad():
            dense = answers(model.generate(**inputs, **generate))
            dense_gflops, dense_seconds = self._gflops(run, count), time_call(run).median
            dense_accuracy = score(
                accuracy_set.questions, predict(model, processor, accuracy_batches, on_batch=bar.update)
            )
            for method in methods:
                schedule = schedule_for(method, model, keep, seed=args.seed)
                with attach(model, **schedule, positions=positions, record_plans=True) as handle:
                    reduced[method] = {
                        "answers": answers(model.generate(**inputs, **generate)),
                        "plans": handle.last_plans,
                        "kept": handle.last_stats.average_visual_tokens,
                        "gflops": self._gflops(run, count),
                        "seconds": time_call(run).median,
                        "accuracy": score(
                            accuracy_set.questions, predict(model, processor, accuracy_batches, on_batch=bar.update)
                        ).accuracy,
                    }

        rows, records = [], []
        for row, (scene, question, answer) in enumerate(zip(shown.scenes, shown.questions, dense, strict=True)):
            others = {method: reduced[method]["answers"][row] for method in methods}
            rows.append(
                {"scene": f"test #{scene.index}", "question": question.text, "truth": question.answer, "dense": answer}
                | others
            )
            image_name = f"vlm-scene-{row}.png"
            image_to_pil(shown.images[row]).save(Path(out_dir) / image_name)
            records.append(
                {
                    "image": image_name,
                    "question": question.text,
                    "truth": question.answer,
                    "dense": answer,
                    "reduced": others,
                }
            )
        scale = max(1, min(4, 320 // size))  # pictures of about 300 pixels a side
        images = []
        for method in methods:
            pictures = [
                draw_reduction(
                    shown.images[row],
                    plan.reduction,
                    grid=(side, side),
                    scale=scale,
                    title=f"test #{scene.index}",
                    caption=[
                        f"Q: {question.text}",
                        f"truth: {question.answer} · dense: {dense[row]} · {method}: {reduced[method]['answers'][row]}",
                    ],
                    legend=False,
                )
                for row, (scene, question, plan) in enumerate(
                    zip(shown.scenes, shown.questions, reduced[method]["plans"], strict=True)
                )
            ]
            path = Path(out_dir) / f"vlm-{method_slug(method)}.png"
            heading = f"{self.title}, held-out: {method} keeps {keep} of {total} visual tokens, answers beside dense"
            tile_pictures(pictures, columns=3, footer=draw_legend(), title=heading).save(path)
            images.append(path)
        notes = [
            f"held-out: test questions 0..{count - 1} shown; accuracy on test questions 0..{small - 1}",
            f"dense: {total} visual tokens per image, prefill {dense_gflops:.3f} GFLOPs and "
            f"{dense_seconds / count * 1000:.2f} ms per example, accuracy {dense_accuracy.accuracy:.1%}",
        ]
        for method in methods:
            result = reduced[method]
            retained = result["accuracy"] / dense_accuracy.accuracy if dense_accuracy.accuracy else 0.0
            kept, per_example = result["kept"], result["seconds"] / count * 1000
            notes.append(
                f"{method}: keeps {kept:g} of {total} visual tokens per image ({kept / total:.0%}), prefill "
                f"{result['gflops']:.3f} GFLOPs and {per_example:.2f} ms per example, accuracy "
                f"{result['accuracy']:.1%} ({retained:.1%} of dense)"
            )
        notes.append(
            "pictures: kept patches framed, merged ones with corner marks in the colour of the token they joined, "
            "dropped ones grey; at this model's size a prefill is mostly overhead, so its time says nothing about "
            "speed (see the speed line)"
        )
        if getattr(args, "speed", False):
            from tokred.bench.speed import llava_prefill_speedup

            # One timed pair: each prefill takes seconds, and the whole demo has about a minute and a half.
            notes.append(llava_prefill_speedup(keep=64, repeats=1).line())
        title = f"{self.title}: dense vs {', '.join(methods)} at {keep} of {total} visual tokens"
        return DemoReport(title=title, rows=rows, images=images, notes=notes, records=records)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}
