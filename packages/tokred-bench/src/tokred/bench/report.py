"""Benchmark tables (Markdown, JSON) and plots (PNG, SVG) in an output folder, the same for every suite."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokred.bench.plots import plot_results
from tokred.bench.suite import BenchResult, ReferenceSuite
from tokred.core.cli.tables import format_table

__all__ = ["COLUMNS", "result_cells", "results_table", "write_suite_report"]

COLUMNS = ("method", "budget", "accuracy", "retained", "GFLOPs", "ms / example", "peak MiB", "tokens")
"""The columns of every results table."""


def result_cells(result: BenchResult) -> list[str]:
    """One row of a results table: accuracy and retention in percent, time as median ± spread."""
    return [
        result.method,
        result.budget,
        f"{result.accuracy * 100:.1f}%",
        f"{result.retained * 100:.1f}%",
        f"{result.gflops:.4g}",
        f"{result.time_ms:.2f} ± {result.time_spread:.2f}",
        f"{result.peak_memory_mb:.1f}",
        f"{result.tokens:.1f}",
    ]


def results_table(results: Sequence[BenchResult], *, style: str = "markdown") -> str:
    """The results as a table, ``"markdown"`` (for the report files) or ``"plain"`` (for the terminal)."""
    return format_table(COLUMNS, [result_cells(r) for r in results], style=style)  # type: ignore[arg-type]


def write_suite_report(
    suite: ReferenceSuite, results: Sequence[BenchResult], out_dir: Path, *, command: str
) -> list[Path]:
    """Write one suite's results to ``out_dir``: ``{name}.md``, ``{name}.json`` and two plots, PNG and SVG each.

    The plots are accuracy against the budget and time per example against the budget, one line per method,
    the dense model as a dashed reference line.

    Args:
        suite: The suite that produced the results.
        results: Its rows, the dense row first.
        out_dir: Output folder (created if missing).
        command: The command line that produced the results, recorded in the Markdown and JSON files.

    Returns:
        The files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    name = suite.name
    written = plot_results(
        results,
        metric="accuracy",
        title=f"{suite.title}: accuracy",
        x_label=suite.budget_axis,
        path=out_dir / f"{name}-accuracy",
    )
    written += plot_results(
        results,
        metric="time_ms",
        title=f"{suite.title}: time",
        x_label=suite.budget_axis,
        path=out_dir / f"{name}-speed",
    )
    files = {
        f"{name}.md": f"## {suite.title}\n\n`{command}`\n\n{results_table(results)}\n"
        f"![accuracy]({name}-accuracy.svg)\n![time]({name}-speed.svg)\n",
        f"{name}.json": json.dumps(
            {"suite": name, "title": suite.title, "command": command, "results": [r.to_dict() for r in results]},
            indent=2,
        )
        + "\n",
    }
    for filename, text in files.items():
        path = out_dir / filename
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
