"""The shared parts of `tokred bench` / `tokred demo`: measurement, tables, plots and the commands."""

import io
import itertools
import json
import xml.etree.ElementTree as ET

import pytest
import torch

from tokred.core.bench import (
    BenchResult,
    DemoReport,
    Progress,
    ReferenceSuite,
    applicable_reducers,
    peak_memory,
    time_call,
)
from tokred.core.bench.plots import line_chart_svg, nice_ticks
from tokred.core.bench.report import format_table, markdown_table, write_suite_report
from tokred.core.cli import main
from tokred.core.cli import suites as suites_cli
from tokred.core.visualize import save_png

SVG = "{http://www.w3.org/2000/svg}"


def test_peak_memory_counts_tensors_alive_at_once():
    def work():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a @ a  # 4 MB, both alive
        del a
        c = b.view(-1) + 1  # view: no new memory; the sum: 4 MB while b is alive
        return c.sum()

    result, peak = peak_memory(work)
    assert result.item() == pytest.approx(1001 * 1e6)
    assert peak == 2 * 4_000_000 + 4  # two 4 MB matrices alive together, plus the scalar


def test_peak_memory_leaves_out_weights_and_inputs():
    layer = torch.nn.Linear(100, 100)
    x = torch.randn(10, 100)
    _, peak = peak_memory(lambda: layer(x))
    assert peak == 10 * 100 * 4  # only the output
    _, peak = peak_memory(lambda: x.view(100, 10).t())  # views of the input
    assert peak == 0


def test_time_call_is_the_median():
    calls = []
    seconds = time_call(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and 0 <= seconds < 0.1
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


def test_applicable_reducers_leave_out_score_only_ones(monkeypatch):
    from tokred.core.bench import measure

    class TokensOnly:
        requires_scores = False

    class NeedsScores:
        requires_scores = True

    class ModelScores:
        requires_scores = True

        def scores_from_block(self, block):
            return None

    classes = {"plain": TokensOnly, "topk": NeedsScores, "delta": ModelScores}
    monkeypatch.setattr(measure, "available_reducers", lambda: sorted(classes))
    monkeypatch.setattr(measure, "get_reducer_class", classes.__getitem__)
    assert applicable_reducers() == ["plain"]
    assert applicable_reducers(scores_from_model=True) == ["delta", "plain"]
    assert applicable_reducers(scores_from_model=True, exclude=("delta",)) == ["plain"]


def test_applicable_reducers_include_the_core_baselines():
    names = applicable_reducers()
    assert {"random", "uniform", "norm", "divprune", "tome"} <= set(names)
    assert "topk" not in names  # it ranks scores it must be given


def test_nice_ticks_cover_the_range():
    for low, high in [(0.11, 1.0), (0.0, 0.4), (3.2, 97.0), (0.5, 0.5), (-2.0, 7.0)]:
        ticks = nice_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high
        steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
        assert len(steps) == 1 and 2 <= len(ticks) <= 12


def test_line_chart_is_valid_svg_with_one_line_per_series():
    svg = line_chart_svg(
        {"apet": [(0.5, 0.9), (0.11, 0.7), (0.25, 0.8)], "random": [(0.11, 0.4), (0.5, 0.85)]},
        title="a < b",
        x_label="kept",
        y_label="accuracy",
        references={"dense": 0.95},
        x_percent=True,
        y_percent=True,
    )
    root = ET.fromstring(svg)
    assert len(root.findall(f"{SVG}polyline")) == 2
    assert len(root.findall(f"{SVG}circle")) == 5 + 2  # points plus legend markers
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "a < b" in texts and "dense" in texts and "50%" in texts
    # points are drawn left to right in x order, higher accuracy higher up
    first = root.findall(f"{SVG}polyline")[0].get("points").split()
    xy = [tuple(map(float, p.split(","))) for p in first]
    assert xy[0][0] < xy[1][0] < xy[2][0] and xy[0][1] > xy[1][1] > xy[2][1]
    with pytest.raises(ValueError, match="at least one"):
        line_chart_svg({}, title="t", x_label="x", y_label="y")
    with pytest.raises(ValueError, match="finite"):
        line_chart_svg({"a": [(0.0, float("nan"))]}, title="t", x_label="x", y_label="y")


def _result(method, budget_value, accuracy):
    return BenchResult(
        "toy", method, f"{budget_value:.0%}", budget_value, accuracy, accuracy / 0.9, 1.5, 2.0, 3.0, 8, 10
    )


def test_tables():
    results = [_result("dense", 1.0, 0.9), _result("apet", 0.11, 0.81)]
    table = markdown_table(results).splitlines()
    assert table[0].startswith("| method | budget | accuracy | retained")
    assert table[3] == "| apet | 11% | 81.0% | 90.0% | 1.5 | 2.00 | 3.0 | 8.0 |"
    text = format_table([{"a": "x", "bb": "long value"}, {"a": "yyy", "bb": "z"}]).splitlines()
    assert text == ["a    bb", "---  ----------", "x    long value", "yyy  z"]
    with pytest.raises(ValueError, match="columns"):
        format_table([{"a": "1"}, {"b": "2"}])


class ToySuite(ReferenceSuite):
    name = "toy"
    title = "Toy suite"
    budget_axis = "tokens kept"

    def __init__(self):
        self.seen = []

    def add_arguments(self, parser, command):
        parser.add_argument("--toy-level", type=int, default=1)

    def bench(self, args, progress):
        self.seen.append(("bench", args.quick, args.limit, args.toy_level))
        with progress.task("toy", total=2) as bar:
            bar.update(2)
        return [_result("dense", 1.0, 0.9), _result("apet", 0.5, 0.88), _result("apet", 0.11, 0.8)]

    def demo(self, args, out_dir, progress):
        self.seen.append(("demo", args.toy_level))
        path = save_png(torch.zeros(2, 2, 3, dtype=torch.uint8), out_dir / "toy.png")
        return DemoReport("Toy demo", [{"scene": "0", "truth": "red"}], [path], ["accuracy 90%"])


@pytest.fixture
def toy(monkeypatch):
    suite = ToySuite()
    monkeypatch.setattr(suites_cli, "load_suites", lambda: ([suite], []))
    return suite


def test_bench_writes_tables_plots_and_the_command(toy, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--quick", "--toy-level", "3", "--no-progress"]) == 0
    assert toy.seen == [("bench", True, None, 3)]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["results.md", "toy-accuracy.svg", "toy-speed.svg", "toy.json", "toy.md"]
    record = json.loads((out / "toy.json").read_text())
    assert record["command"] == f"tokred bench --out {out} --quick --toy-level 3 --no-progress"
    assert [r["method"] for r in record["results"]] == ["dense", "apet", "apet"]
    assert "| apet | 11% |" in (out / "results.md").read_text()
    ET.fromstring((out / "toy-accuracy.svg").read_text())
    assert "| apet | 50% |" in capsys.readouterr().out


def test_demo_prints_the_table_and_the_pictures(toy, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Toy demo" in out and "accuracy 90%" in out and f"picture: {tmp_path / 'toy.png'}" in out
    assert toy.seen == [("demo", 1)]


def test_commands_without_suites_say_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(suites_cli, "load_suites", lambda: ([], ["tokred: suite 'x' failed to load: boom"]))
    assert main(["demo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "install one of them" in err and "boom" in err


def test_a_suite_without_a_dense_row_is_an_error(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(ToySuite, "bench", lambda self, args, progress: [_result("apet", 0.5, 0.8)])
    with pytest.raises(RuntimeError, match="no dense row first"):
        main(["bench", "--out", str(tmp_path), "--no-progress"])


def test_write_suite_report_returns_the_files(tmp_path):
    files = write_suite_report(ToySuite(), [_result("dense", 1.0, 0.9)], tmp_path, command="tokred bench")
    assert {f.name for f in files} == {"toy.md", "toy.json", "toy-accuracy.svg", "toy-speed.svg"}


def test_progress_writes_one_line_per_finished_task_when_not_a_terminal():
    stream = io.StringIO()
    with Progress(stream=stream).task("scoring", total=4) as bar:
        for _ in range(4):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "scoring" in lines[0] and "4/4" in lines[0]
    silent = io.StringIO()
    with Progress(enabled=False, stream=silent).task("x", total=2) as bar:
        bar.update(5)
    assert silent.getvalue() == "" and bar.done == 2


def test_suite_interface_is_abstract():
    with pytest.raises(TypeError):
        ReferenceSuite()
