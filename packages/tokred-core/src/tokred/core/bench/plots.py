"""Line charts as standalone SVG: one line per method against the budget, no plotting library needed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

__all__ = ["PALETTE", "line_chart_svg", "nice_ticks"]

PALETTE: tuple[str, ...] = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
"""Line colours, in the order series are drawn (the familiar tab10 colours)."""


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]`` (steps of 1, 2 or 5 times a power of ten)."""
    if not math.isfinite(low) or not math.isfinite(high):
        raise ValueError(f"tick range must be finite; got {low}, {high}")
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _format(value: float) -> str:
    return f"{value:.10g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def line_chart_svg(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    references: Mapping[str, float] | None = None,
    x_percent: bool = False,
    y_percent: bool = False,
    width: int = 720,
    height: int = 420,
) -> str:
    """Draw lines with markers, a legend and optional horizontal reference lines, as an SVG document.

    Args:
        series: ``{name: [(x, y), …]}``; points are sorted by ``x``.
        title: Chart title.
        x_label: Label of the x axis.
        y_label: Label of the y axis.
        references: ``{name: y}`` drawn as dashed horizontal lines across the chart (the dense model).
        x_percent: Show x tick labels as percentages of 1.
        y_percent: Show y tick labels as percentages of 1.
        width: Width in pixels.
        height: Height in pixels.

    Returns:
        The SVG text.

    Raises:
        ValueError: If there is nothing to draw or a value is not finite.
    """
    references = dict(references or {})
    points = [p for values in series.values() for p in values]
    if not points and not references:
        raise ValueError("line_chart_svg needs at least one point or reference line")
    xs = [x for x, _ in points] or [0.0, 1.0]
    ys = [y for _, y in points] + list(references.values())
    if not all(math.isfinite(v) for v in xs + ys):
        raise ValueError("line_chart_svg: every x and y must be finite")
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    legend_width = 190
    left, right, top, bottom = 70, width - legend_width, 40, height - 55

    def sx(x: float) -> float:
        return left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)

    def sy(y: float) -> float:
        return bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)

    def label(value: float, percent: bool) -> str:
        return f"{value * 100:.0f}%" if percent else _format(value)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{(left + right) / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
    ]
    for y in y_ticks:
        out.append(f'<line x1="{left}" x2="{right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{escape(label(y, y_percent))}</text>')
    for x in x_ticks:
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{bottom}" stroke="#f0f0f0"/>')
        out.append(f'<text x="{sx(x):.1f}" y="{bottom + 16}" text-anchor="middle">{escape(label(x, x_percent))}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#555"/>')
    out.append(f'<text x="{(left + right) / 2}" y="{height - 14}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(
        f'<text transform="translate(18 {(top + bottom) / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(y_label)}</text>"
    )
    legend_y = top + 8
    for name, y in references.items():
        out.append(
            f'<line x1="{left}" x2="{right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#000" stroke-dasharray="6 4"/>'
        )
        out.append(
            f'<line x1="{right + 16}" x2="{right + 40}" y1="{legend_y}" y2="{legend_y}" stroke="#000" '
            'stroke-dasharray="6 4"/>'
        )
        out.append(f'<text x="{right + 46}" y="{legend_y + 4}">{escape(name)}</text>')
        legend_y += 20
    for i, (name, values) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        ordered = sorted(values)
        if len(ordered) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ordered)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in ordered:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"/>')
        out.append(
            f'<line x1="{right + 16}" x2="{right + 40}" y1="{legend_y}" y2="{legend_y}" stroke="{color}" '
            'stroke-width="2"/>'
        )
        out.append(f'<circle cx="{right + 28}" cy="{legend_y}" r="3.5" fill="{color}"/>')
        out.append(f'<text x="{right + 46}" y="{legend_y + 4}">{escape(name)}</text>')
        legend_y += 20
    out.append("</svg>")
    return "\n".join(out) + "\n"
