"""Benchmark plots with matplotlib: fixed colours, honest axes, PNG and deterministic SVG files."""

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from tokred.bench.plots import METHOD_COLORS, _figure, method_color, plot_results
from tokred.bench.suite import BenchResult
from tokred.core.errors import InvalidInputError

KNOWN = (
    "dense",
    "apet",
    "apet (reference)",
    "mtr",
    "divprune",
    "tome",
    "random",
    "uniform",
    "norm",
    "topvim",
    "utr",
    "topk",
)


def _row(method, value, accuracy, time_ms=2.0, spread=0.1):
    budget = "dense" if method == "dense" else f"{value:.0%} tokens"
    return BenchResult("mamba", method, budget, value, accuracy, accuracy / 0.9, 1.0, time_ms, spread, 10.0, 20.0, 64)


def _results(budgets=(0.11, 0.33)):
    rows = [_row("dense", 1.0, 0.9, time_ms=4.0)]
    for i, method in enumerate(("apet", "tome", "divprune")):
        rows += [_row(method, b, 0.5 + 0.1 * i + b, time_ms=1.0 + b + i * 0.1, spread=0.05) for b in budgets]
    return rows


def _marker_lines(ax):
    return [line for line in ax.get_lines() if line.get_marker() not in (None, "", " ", "None")]


def test_method_colours_are_fixed_distinct_and_stable():
    colors = [method_color(m) for m in KNOWN]
    assert len(set(colors)) == len(KNOWN)
    assert all(c.startswith("#") and len(c) == 7 for c in colors)
    assert method_color("dense") in ("#000000", "#222222", "#333333")
    assert method_color("APET") == method_color("apet") == METHOD_COLORS["apet"]
    assert set(METHOD_COLORS) == set(KNOWN)
    # an unknown method gets a colour from a digest of its name, the same in every process (no salted hash)
    assert method_color("my new method") == method_color("My  New method") == "#5e3c99"


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, tokred.bench.plots, tokred.bench.visualize; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("metric", ["accuracy", "time_ms"])
def test_plot_results_writes_a_png_and_a_deterministic_svg(tmp_path, metric):
    labels = {"title": "Vim on scenes", "x_label": "tokens kept"}
    paths = plot_results(_results(), metric=metric, path=tmp_path / "a" / "p", **labels)
    png, svg = paths
    assert paths == [tmp_path / "a" / "p.png", tmp_path / "a" / "p.svg"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as picture:
        assert picture.size == (1200, 675)
    root = ET.fromstring(svg.read_bytes())
    assert root.tag.endswith("svg")
    first_svg, first_png = svg.read_bytes(), png.read_bytes()
    assert plot_results(_results(), metric=metric, path=tmp_path / "a" / "p.x", **labels) == paths
    assert svg.read_bytes() == first_svg and png.read_bytes() == first_png


def test_the_accuracy_axis_spans_0_to_100_percent():
    figure = _figure(_results(), "accuracy", "accuracy", "tokens kept")
    (ax,) = figure.axes
    assert ax.get_ylim() == (0.0, 1.0)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "0%" and labels[-1] == "100%"
    assert all(label.endswith("%") for label in (t.get_text() for t in ax.get_xticklabels()))


def test_the_time_axis_starts_at_0_above_every_point_and_has_error_bars():
    rows = _results()
    figure = _figure(rows, "time_ms", "time", "tokens kept")
    (ax,) = figure.axes
    low, high = ax.get_ylim()
    assert low == 0.0 and high > max(r.time_ms + r.time_spread for r in rows)
    assert high < 1.5 * max(r.time_ms + r.time_spread for r in rows)
    assert len(ax.containers) == 3  # one errorbar container per method


def test_one_budget_per_method_still_draws_one_marker_per_method():
    figure = _figure(_results(budgets=(0.25,)), "accuracy", "quick", "tokens kept")
    (ax,) = figure.axes
    lines = _marker_lines(ax)
    assert sorted(line.get_label() for line in lines) == ["apet", "divprune", "tome"]
    assert all(len(line.get_xdata()) == 1 and line.get_markersize() >= 6 for line in lines)
    assert {line.get_color() for line in lines} == {method_color(m) for m in ("apet", "divprune", "tome")}
    low, high = ax.get_xlim()
    assert low < 0.25 < high
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()][:3] == ["apet", "tome", "divprune"]


def test_dense_is_a_labelled_dashed_reference_line():
    figure = _figure(_results(), "accuracy", "accuracy", "tokens kept")
    (ax,) = figure.axes
    dense = [line for line in ax.get_lines() if line.get_label().startswith("dense")]
    assert len(dense) == 1 and dense[0].get_linestyle() == "--"
    assert list(dense[0].get_ydata()) == [0.9, 0.9]
    assert any(text.get_text() == "dense: 90%" for text in ax.texts)


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="metric"):
        plot_results(_results(), metric="gflops", title="t", x_label="x", path=tmp_path / "p")
    with pytest.raises(InvalidInputError, match="at least one"):
        plot_results([], metric="accuracy", title="t", x_label="x", path=tmp_path / "p")


def test_plotting_leaves_the_callers_matplotlib_settings_alone(tmp_path):
    import matplotlib

    with matplotlib.rc_context({"lines.linewidth": 7.0, "axes.facecolor": "black"}):
        before = dict(matplotlib.rcParams)
        plot_results(_results(), metric="time_ms", title="t", x_label="x", path=tmp_path / "p")
        figure = _figure(_results(), "accuracy", "t", "x")
        assert dict(matplotlib.rcParams) == before
    # the plot itself uses its own style, not the caller's
    (ax,) = figure.axes
    assert ax.get_facecolor()[:3] == (1.0, 1.0, 1.0)
