"""Benchmark plots with matplotlib: one line per method against the budget, the dense model as a reference line.

Every method has one colour in every plot of every run ([`method_color`][tokred.bench.plots.method_color]), the
accuracy axis always spans 0 to 100 % and the time axis starts at 0, so plots compare at a glance and do not
exaggerate small differences. [`plot_results`][tokred.bench.plots.plot_results] writes a PNG and an SVG; the SVG
is byte-identical when written again from the same results.

matplotlib is imported when a plot is drawn, not with this module, and always with the non-interactive Agg
canvas and matplotlib's default style inside an ``rc_context``: drawing a plot changes no global state of the
caller's matplotlib.

Examples:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from tokred.bench.plots import method_color, plot_results
    >>> from tokred.bench.suite import BenchResult
    >>> def row(method, value, accuracy):
    ...     return BenchResult("mamba", method, f"{value:.0%}", value, accuracy, 1.0, 1.0, 2.0, 0.1, 10.0, 20.0, 64)
    >>> results = [row("dense", 1.0, 0.9), row("apet", 0.25, 0.8), row("apet", 0.5, 0.85)]
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     paths = plot_results(results, metric="accuracy", title="accuracy", x_label="tokens kept",
    ...                          path=Path(folder) / "mamba-accuracy")
    ...     [p.name for p in paths]
    ['mamba-accuracy.png', 'mamba-accuracy.svg']
    >>> method_color("dense"), method_color("apet")
    ('#222222', '#d62728')
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokred.core.errors import InvalidInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tokred.bench.suite import BenchResult

__all__ = ["METHOD_COLORS", "method_color", "plot_results"]

METHOD_COLORS: dict[str, str] = {
    "dense": "#222222",
    "apet": "#d62728",
    "apet (reference)": "#ff7f0e",
    "mtr": "#1f77b4",
    "divprune": "#2ca02c",
    "tome": "#9467bd",
    "random": "#7f7f7f",
    "uniform": "#17becf",
    "norm": "#8c564b",
    "topvim": "#e377c2",
    "utr": "#bcbd22",
    "topk": "#393b79",
}
"""The colour of each known method (matplotlib's tab10 and a dark indigo; dense near black)."""

_OTHER_COLORS: tuple[str, ...] = (
    "#843c39",
    "#e7ba52",
    "#637939",
    "#7b4173",
    "#b15928",
    "#1b9e77",
    "#e7298a",
    "#5e3c99",
)
"""Colours of methods not in [`METHOD_COLORS`][tokred.bench.plots.METHOD_COLORS], picked by a hash of the name."""

_MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")

_METRICS: dict[str, str] = {"accuracy": "held-out accuracy", "time_ms": "time per example (ms)"}

_SIZE_INCHES = (8.0, 4.5)
_DPI = 150

# Applied over matplotlib's default style while a plot is drawn and saved.
_RC: dict[str, Any] = {
    "svg.hashsalt": "tokred-bench",
    "svg.fonttype": "path",
    "font.size": 10.0,
    "axes.titlesize": 12.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _key(method: str) -> str:
    return " ".join(method.lower().split())


def _stable_index(method: str, count: int) -> int:
    # Python's hash() of a str is salted per process; a digest gives every run the same choice.
    return int.from_bytes(hashlib.sha256(_key(method).encode("utf-8")).digest()[:8], "big") % count


def method_color(method: str) -> str:
    """The colour of a method, the same in every plot and every run.

    Args:
        method: Display name of the method (``"dense"``, ``"apet"``, ``"apet (reference)"``, …); case and
            repeated spaces do not matter.

    Returns:
        A ``"#rrggbb"`` colour: from [`METHOD_COLORS`][tokred.bench.plots.METHOD_COLORS] for a known method,
        otherwise from a fixed palette by a hash of the name.
    """
    known = METHOD_COLORS.get(_key(method))
    return known if known is not None else _OTHER_COLORS[_stable_index(method, len(_OTHER_COLORS))]


def _method_marker(method: str) -> str:
    names = list(METHOD_COLORS)
    key = _key(method)
    if key in names:
        return _MARKERS[(names.index(key) - 1) % len(_MARKERS)]
    return _MARKERS[_stable_index(method, len(_MARKERS))]


def _check(results: Sequence[BenchResult], metric: str) -> list[BenchResult]:
    if metric not in _METRICS:
        raise InvalidInputError(f"metric must be one of {', '.join(map(repr, _METRICS))}; got {metric!r}")
    rows = list(results)
    if not rows:
        raise InvalidInputError("plot_results needs at least one result")
    return rows


@contextmanager
def _style() -> Iterator[None]:
    """Matplotlib's default style with this module's settings, undone on exit."""
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        yield


def _percent(value: float, _position: object = None) -> str:
    return f"{value * 100:.1f}".rstrip("0").rstrip(".") + "%"


def _dodge(series: dict[str, list[BenchResult]], metric: str, tolerance: float, step: float) -> dict[str, list[float]]:
    """Small sideways offsets for points of different methods that would hide each other.

    At each budget, points closer than ``tolerance`` on the y axis form a group; the members of a group of ``m``
    are spread ``step`` apart around the budget, in method order. Points that stand alone are not moved.
    """
    offsets = {method: [0.0] * len(points) for method, points in series.items()}
    order = {method: i for i, method in enumerate(series)}
    at: dict[float, list[tuple[float, int, str, int]]] = {}
    for method, points in series.items():
        for i, r in enumerate(points):
            at.setdefault(r.budget_value, []).append((getattr(r, metric), order[method], method, i))
    for members in at.values():
        members.sort()
        groups: list[list[tuple[float, int, str, int]]] = []
        for member in members:
            if groups and member[0] - groups[-1][-1][0] < tolerance:
                groups[-1].append(member)
            else:
                groups.append([member])
        for group in groups:
            if len(group) > 1:
                group.sort(key=lambda m: m[1])
                for j, (_, _, method, i) in enumerate(group):
                    offsets[method][i] = (j - (len(group) - 1) / 2) * step
    return offsets


def _figure(results: Sequence[BenchResult], metric: str, title: str, x_label: str) -> Figure:
    """Draw the plot of ``metric`` against the budget and return the (unsaved) matplotlib figure."""
    rows = _check(results, metric)
    with _style():
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter

        figure = Figure(figsize=_SIZE_INCHES, dpi=_DPI, layout="constrained")
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        accuracy = metric == "accuracy"

        dense = [r for r in rows if _key(r.method) == "dense"]
        series: dict[str, list[BenchResult]] = {}
        for r in rows:
            if _key(r.method) != "dense":
                series.setdefault(r.method, []).append(r)
        series = {m: sorted(points, key=lambda r: r.budget_value) for m, points in series.items()}
        dense_value = sum(getattr(r, metric) for r in dense) / len(dense) if dense else None

        # The y axis: accuracy always 0..100 %, time from 0 to a little above the highest point or error bar.
        if accuracy:
            y_top = 1.0
        else:
            highs = [r.time_ms + max(r.time_spread, 0.0) for points in series.values() for r in points]
            if dense_value is not None:
                highs.append(dense_value)
            highs = [h for h in highs if math.isfinite(h)]
            y_top = max(highs) * 1.15 if highs and max(highs) > 0 else 1.0

        # The x axis: the budgets, padded so that markers at the ends stay inside.
        values = sorted({r.budget_value for points in series.values() for r in points})
        if values:
            low, high = values[0], values[-1]
            pad = (high - low) * 0.06 if high > low else max(abs(low) * 0.15, 0.05)
            x_limits = (low - pad, high + pad)
        else:
            x_limits = None
        span = x_limits[1] - x_limits[0] if x_limits else 1.0
        offsets = _dodge(series, metric, tolerance=0.04 * y_top, step=0.014 * span)

        handles = []
        for method, points in series.items():
            xs = [r.budget_value + dx for r, dx in zip(points, offsets[method], strict=True)]
            ys = [getattr(r, metric) for r in points]
            style = {
                "color": method_color(method),
                "marker": _method_marker(method),
                "markersize": 9,
                "markeredgecolor": "white",
                "markeredgewidth": 0.8,
                "linewidth": 2,
                "label": method,
                "clip_on": False,
                "zorder": 3,
            }
            if accuracy:
                (handle,) = ax.plot(xs, ys, **style)
            else:
                spread = [max(r.time_spread, 0.0) for r in points]
                handle = ax.errorbar(xs, ys, yerr=spread, capsize=4, elinewidth=1.2, **style)
            handles.append(handle)

        if dense_value is not None:
            text = f"dense: {_percent(dense_value)}" if accuracy else f"dense: {dense_value:.3g} ms"
            handles.append(
                ax.axhline(
                    dense_value, color=method_color("dense"), linestyle="--", linewidth=1.5, label=text, zorder=2
                )
            )

            # The label sits on the line at the end where no point is just above it.
            def crowded(x: float) -> bool:
                return any(
                    abs(r.budget_value - x) < 1e-12 and -0.03 * y_top < getattr(r, metric) - dense_value < 0.1 * y_top
                    for points in series.values()
                    for r in points
                )

            right = not (values and crowded(values[-1]) and not crowded(values[0]))
            ax.annotate(
                text,
                xy=(1.0 if right else 0.0, dense_value),
                xycoords=("axes fraction", "data"),
                xytext=(-4 if right else 4, 4),
                textcoords="offset points",
                ha="right" if right else "left",
                va="bottom",
                color=method_color("dense"),
                fontsize=9,
            )

        ax.set_ylim(0.0, y_top)
        if accuracy:
            ax.yaxis.set_major_formatter(FuncFormatter(_percent))
        if x_limits is not None:
            ax.set_xlim(*x_limits)
            if len(values) <= 8:
                ax.set_xticks(values)
            if all(0.0 <= v <= 1.0 for v in values):
                ax.xaxis.set_major_formatter(FuncFormatter(_percent))

        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(_METRICS[metric])
        ax.grid(True, color="#dddddd", linewidth=0.8, zorder=0)
        ax.set_axisbelow(True)
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, borderaxespad=0.0)
    return figure


def plot_results(
    results: Sequence[BenchResult], *, metric: str, title: str, x_label: str, path: str | PathLike[str]
) -> list[Path]:
    """Plot one suite's results against the budget and write the plot as PNG and SVG.

    One line with markers per method (x: ``budget_value``, y: ``metric``), the dense row as a labelled dashed
    horizontal line. Accuracy is shown from 0 to 100 %; time from 0 to a little above the slowest point, with
    error bars of ``time_spread``. The x axis reads in percent when every budget value lies in ``[0, 1]``.
    Markers of different methods that would hide each other at one budget are spread a little sideways, and the
    legend stands outside the axes, so every method stays visible even with a single budget.

    Args:
        results: Rows of [`BenchResult`][tokred.bench.suite.BenchResult]; the row(s) with method ``"dense"``
            become the reference line.
        metric: ``"accuracy"`` or ``"time_ms"``.
        title: Title of the plot.
        x_label: Label of the x axis (the suite's budget axis, such as ``"visual tokens kept"``).
        path: Where to write; the suffix is replaced by ``.png`` and ``.svg``. The folder is created if missing.

    Returns:
        ``[png_path, svg_path]``.

    Raises:
        InvalidInputError: If ``metric`` is unknown or ``results`` is empty.
    """
    base = Path(path)
    png, svg = base.with_suffix(".png"), base.with_suffix(".svg")
    figure = _figure(results, metric, title, x_label)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        with _style():
            figure.savefig(png, format="png", dpi=_DPI, metadata={"Software": None})
            figure.savefig(svg, format="svg", metadata={"Date": None})
    finally:
        figure.clear()
    return [png, svg]
