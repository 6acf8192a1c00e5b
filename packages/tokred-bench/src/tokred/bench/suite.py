"""The interface between ``tokred bench`` / ``tokred demo`` and the reference suites.

A suite is a trained reference model with its held-out task. tokred-bench ships two (``vlm``: the small LLaVA,
``mamba``: the small Vim), found through the ``tokred.suites`` entry-point group, so another package can add one.
``tokred bench`` runs the ``bench`` of every suite and writes one table, one JSON file and two plots per suite;
``tokred demo`` runs their ``demo``, prints their tables and writes their pictures and ``demo.json``.
"""

from __future__ import annotations

import abc
import argparse
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

__all__ = ["SUITE_ENTRY_POINT_GROUP", "BenchResult", "DemoReport", "ProgressFactory", "ReferenceSuite", "load_suites"]

SUITE_ENTRY_POINT_GROUP = "tokred.suites"
"""Entry-point group of the reference suites: ``name = "module:SuiteClass"``."""


class ProgressFactory(Protocol):
    """Makes one progress bar: ``progress(total=..., desc=..., unit=...)`` returns a ``tqdm`` bar.

    A context manager with ``update(n)``; the commands pass a factory that draws nothing under ``--no-progress``.
    """

    def __call__(self, *, total: int, desc: str, unit: str = "it") -> Any:
        """A new bar of ``total`` steps."""


@dataclass(frozen=True)
class BenchResult:
    """One row of a benchmark: one method at one budget on one suite's held-out split.

    Attributes:
        suite: Name of the suite (``"vlm"``, ``"mamba"``).
        method: Display name of the method: ``"dense"``, ``"apet"``, ``"apet (reference)"``, ``"mtr"``, …
        budget: Display name of the budget: ``"dense"``, ``"11% tokens"``, ``"40% FLOPs cut"``.
        budget_value: The budget as a number, the x axis of the plots (the suite's ``budget_axis``).
        accuracy: Fraction of held-out examples answered correctly, in ``[0, 1]``.
        retained: ``accuracy`` divided by the dense model's accuracy.
        gflops: Forward (or prefill) GFLOPs per example.
        time_ms: Forward (or prefill) wall time per example in milliseconds (median of repeats).
        time_spread: Half the range of the repeats around ``time_ms``, in milliseconds per example.
        peak_memory_mb: Peak memory of one batch's forward in MiB (see
            [`peak_memory`][tokred.bench.measure.peak_memory]).
        tokens: Mean number of visual tokens per example that the reduced part of the model processes.
        examples: Number of held-out examples behind ``accuracy``.
    """

    suite: str
    method: str
    budget: str
    budget_value: float
    accuracy: float
    retained: float
    gflops: float
    time_ms: float
    time_spread: float
    peak_memory_mb: float
    tokens: float
    examples: int

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return asdict(self)


@dataclass
class DemoReport:
    """What one suite's demo shows: a table, notes under it, the pictures it wrote, and its ``demo.json`` records.

    Attributes:
        title: Heading printed above the table.
        rows: Table rows; every row has the same keys, which become the column headers.
        images: Pictures written, printed with their paths.
        notes: Lines printed under the table (accuracy on the small split, what the budget means, …).
        records: One JSON-ready dict per example shown, for ``demo.json``: ``"image"`` (the file name of the
            saved input picture, relative to the output folder), ``"truth"``, ``"dense"`` (the dense model's
            answer), ``"reduced"`` (each reducer's answer, by name), and what else the suite asks (``"question"``).
    """

    title: str
    rows: list[dict[str, str]]
    images: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)


class ReferenceSuite(abc.ABC):
    """A trained reference model with its held-out task, as ``tokred bench`` and ``tokred demo`` run it.

    Subclasses set the class attributes, may add command-line options (prefixed with ``--{name}-`` so suites
    never collide) and implement [`bench`][tokred.bench.suite.ReferenceSuite.bench] and
    [`demo`][tokred.bench.suite.ReferenceSuite.demo]. Both receive the parsed arguments, which always carry
    ``quick`` (bool), ``limit`` (int or None: most held-out examples to use), ``batch_size`` (int), ``seed``
    (int) and ``device`` (a ``torch.device``), besides the suite's own options.

    Attributes:
        name: Short lower-case name (``"vlm"``, ``"mamba"``): the ``--only`` choice and the file-name prefix.
        title: Human-readable title of the suite, used as the heading of its tables.
        budget_axis: Label of the budget axis in plots and tables (``"visual tokens kept"``, ``"FLOPs cut"``).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    budget_axis: ClassVar[str]

    def add_arguments(self, parser: argparse.ArgumentParser, command: Literal["bench", "demo"]) -> None:  # noqa: B027
        """Add this suite's options to the ``bench`` or ``demo`` parser (none by default)."""

    @abc.abstractmethod
    def bench(self, args: argparse.Namespace, progress: ProgressFactory) -> list[BenchResult]:
        """Measure the dense model and every applicable reducer at the suite's budgets.

        Returns:
            One [`BenchResult`][tokred.bench.BenchResult] per (method, budget), the dense row first.
        """

    @abc.abstractmethod
    def demo(self, args: argparse.Namespace, out_dir: Path, progress: ProgressFactory) -> DemoReport:
        """Run a handful of held-out examples with and without reduction; write pictures to ``out_dir``."""

    def check_arguments(self, args: argparse.Namespace, command: Literal["bench", "demo"]) -> None:  # noqa: B027
        """Refuse impossible values of this suite's options before anything runs (unknown reducers, bad cuts).

        Raises:
            TokredError: With what to pass instead; the command prints it as one line and exits with status 2.
        """


def load_suites() -> tuple[list[ReferenceSuite], list[str]]:
    """Instantiate the suite of every installed package, sorted by name.

    Returns:
        The suites and a list of messages for entry points that failed to load (a broken suite never takes
        the others down).
    """
    suites: dict[str, ReferenceSuite] = {}
    problems = []
    for ep in sorted(metadata.entry_points(group=SUITE_ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in suites:
            continue
        try:
            suite = ep.load()()
        except Exception as exc:  # report and go on with the others
            problems.append(f"tokred: suite {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}")
            continue
        if not isinstance(suite, ReferenceSuite):
            problems.append(f"tokred: suite {ep.name!r} ({ep.value}) is not a ReferenceSuite")
            continue
        suites[ep.name] = suite
    return list(suites.values()), problems
