"""Benchmark tables (Markdown, JSON) and plots (SVG) in an output folder, the same for every suite."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from tokred.core.bench.plots import line_chart_svg
from tokred.core.bench.suite import BenchResult, ReferenceSuite

__all__ = ["format_table", "markdown_table", "write_suite_report"]

_COLUMNS = ("method", "budget", "accuracy", "retained", "GFLOPs", "ms / example", "peak MiB", "tokens")


def _cells(result: BenchResult) -> list[str]:
    return [
        result.method,
        result.budget,
        f"{result.accuracy * 100:.1f}%",
        f"{result.retained * 100:.1f}%",
        f"{result.gflops:.4g}",
        f"{result.time_ms:.2f}",
        f"{result.peak_memory_mb:.1f}",
        f"{result.tokens:.1f}",
    ]


def markdown_table(results: Sequence[BenchResult]) -> str:
    """A Markdown table of benchmark rows: method, budget, accuracy, retained, GFLOPs, time, memory, tokens."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(_COLUMNS) - 2)) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in results]
    return "\n".join(lines) + "\n"


def format_table(rows: Sequence[Mapping[str, str]]) -> str:
    """An aligned plain-text table of rows that share their keys (the keys are the headers)."""
    if not rows:
        return ""
    headers = list(rows[0])
    for row in rows:
        if list(row) != headers:
            raise ValueError(f"every row needs the columns {headers}; got {list(row)}")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def _series(
    results: Sequence[BenchResult], value: str
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    series: dict[str, list[tuple[float, float]]] = {}
    references: dict[str, float] = {}
    for r in results:
        y = getattr(r, value)
        if r.method == "dense":
            references["dense"] = y
        else:
            series.setdefault(r.method, []).append((r.budget_value, y))
    return series, references


def write_suite_report(
    suite: ReferenceSuite, results: Sequence[BenchResult], out_dir: Path, *, command: str
) -> list[Path]:
    """Write one suite's results to ``out_dir``: ``{name}.md``, ``{name}.json`` and two SVG plots.

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
    percent_axis = all(0.0 <= r.budget_value <= 1.0 for r in results)
    accuracy, dense_accuracy = _series(results, "accuracy")
    speed, dense_speed = _series(results, "time_ms")
    files = {
        f"{name}-accuracy.svg": line_chart_svg(
            accuracy,
            title=f"{suite.title}: accuracy",
            x_label=suite.budget_axis,
            y_label="held-out accuracy",
            references=dense_accuracy,
            x_percent=percent_axis,
            y_percent=True,
        ),
        f"{name}-speed.svg": line_chart_svg(
            speed,
            title=f"{suite.title}: time",
            x_label=suite.budget_axis,
            y_label="ms per example",
            references=dense_speed,
            x_percent=percent_axis,
        ),
        f"{name}.md": f"## {suite.title}\n\n`{command}`\n\n{markdown_table(results)}\n"
        f"![accuracy]({name}-accuracy.svg)\n![time]({name}-speed.svg)\n",
        f"{name}.json": json.dumps(
            {"suite": name, "title": suite.title, "command": command, "results": [r.to_dict() for r in results]},
            indent=2,
        )
        + "\n",
    }
    written = []
    for filename, text in files.items():
        path = out_dir / filename
        path.write_text(text)
        written.append(path)
    return written
