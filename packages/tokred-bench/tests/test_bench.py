"""The shared parts of `tokred bench` / `tokred demo`: measurement, tables, plots and the commands."""

import json

import pytest
import torch
from PIL import Image

from tokred.bench import (
    BenchResult,
    DemoReport,
    ReferenceSuite,
    applicable_reducers,
    peak_memory,
    time_call,
)
from tokred.bench import cli as bench_cli
from tokred.bench.report import results_table, write_suite_report
from tokred.core.cli import main


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


def test_time_call_gives_the_median_and_the_spread(monkeypatch):
    from tokred.bench import measure

    ticks = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0])  # calls of 1 s, 3 s and 2 s
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks))
    calls = []
    timing = time_call(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5
    assert (timing.median, timing.spread, timing.repeats) == (2.0, 1.0, 3)
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


def test_applicable_reducers_follow_the_scores_a_model_supplies(monkeypatch):
    from tokred.bench import measure

    class TokensOnly:
        needs_scores = None

    class CallerScores:
        needs_scores = "caller"

    class DeltaScores:
        needs_scores = "delta"

    classes = {"plain": TokensOnly, "topk": CallerScores, "delta": DeltaScores}
    monkeypatch.setattr(measure, "available_reducers", lambda: sorted(classes))
    monkeypatch.setattr(measure, "get_reducer_class", classes.__getitem__)
    assert applicable_reducers() == ["plain"]
    assert applicable_reducers(supplied_scores={"delta"}) == ["delta", "plain"]
    assert applicable_reducers(supplied_scores={"delta"}, exclude=("delta",)) == ["plain"]


def test_applicable_reducers_include_the_core_baselines():
    names = applicable_reducers()
    assert {"random", "uniform", "norm", "divprune", "tome"} <= set(names)
    assert "topk" not in names  # it ranks scores it must be given
    assert "mtr" not in names and "mtr" in applicable_reducers(supplied_scores={"delta"})


def _result(method, budget_value, accuracy):
    return BenchResult(
        "toy", method, f"{budget_value:.0%}", budget_value, accuracy, accuracy / 0.9, 1.5, 2.0, 0.25, 3.0, 8, 10
    )


def test_results_table_in_markdown_and_plain_text():
    results = [_result("dense", 1.0, 0.9), _result("apet", 0.11, 0.81)]
    table = results_table(results).splitlines()
    assert table[0].startswith("| method | budget | accuracy | retained")
    cells = [cell.strip() for cell in table[3].split("|")[1:-1]]
    assert cells == ["apet", "11%", "81.0%", "90.0%", "1.5", "2.00 ± 0.25", "3.0", "8.0"]
    plain = results_table(results, style="plain").splitlines()
    assert plain[0].split()[:3] == ["method", "budget", "accuracy"] and plain[1].startswith("------")


class ToySuite(ReferenceSuite):
    name = "toy"
    title = "Toy suite"
    budget_axis = "tokens kept"

    def __init__(self):
        self.seen = []

    def add_arguments(self, parser, command):
        parser.add_argument("--toy-level", type=int, default=1)

    def bench(self, args, progress):
        self.seen.append(("bench", args.quick, args.limit, args.toy_level, str(args.device)))
        with progress(total=2, desc="toy") as bar:
            bar.update(2)
        return [_result("dense", 1.0, 0.9), _result("apet", 0.5, 0.88), _result("apet", 0.11, 0.8)]

    def demo(self, args, out_dir, progress):
        self.seen.append(("demo", args.toy_level, args.scenes, args.eval_scenes))
        Image.new("RGB", (2, 2)).save(out_dir / "toy.png")
        Image.new("RGB", (2, 2)).save(out_dir / "toy-scene-0.png")
        record = {"image": "toy-scene-0.png", "truth": "red", "dense": "red", "reduced": {"apet": "blue"}}
        return DemoReport(
            "Toy demo", [{"scene": "0", "truth": "red"}], [out_dir / "toy.png"], ["accuracy 90%"], [record]
        )

    def check_arguments(self, args, command):
        if args.toy_level < 0:
            from tokred.core.errors import InvalidInputError

            raise InvalidInputError("--toy-level must be >= 0")


@pytest.fixture
def toy(monkeypatch):
    suite = ToySuite()
    monkeypatch.setattr(bench_cli, "load_suites", lambda: ([suite], []))
    return suite


def test_bench_writes_tables_plots_and_the_command(toy, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--quick", "--toy-level", "3", "--no-progress"]) == 0
    assert toy.seen == [("bench", True, None, 3, "cpu")]
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "results.md",
        "toy-accuracy.png",
        "toy-accuracy.svg",
        "toy-speed.png",
        "toy-speed.svg",
        "toy.json",
        "toy.md",
    ]
    record = json.loads((out / "toy.json").read_text())
    assert record["command"] == f"tokred bench --out {out} --quick --toy-level 3 --no-progress"
    assert [r["method"] for r in record["results"]] == ["dense", "apet", "apet"]
    assert set(record["results"][0]) == {
        "suite",
        "method",
        "budget",
        "budget_value",
        "accuracy",
        "retained",
        "gflops",
        "time_ms",
        "time_spread",
        "peak_memory_mb",
        "tokens",
        "examples",
    }
    rows = [[c.strip() for c in line.split("|")[1:3]] for line in (out / "results.md").read_text().splitlines()]
    assert ["apet", "11%"] in rows
    printed = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert ["apet", "50%"] in printed


def test_demo_prints_the_table_and_writes_demo_json(toy, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--scenes", "2"]) == 0
    out = capsys.readouterr().out
    assert "Toy demo" in out and "accuracy 90%" in out and f"picture: {tmp_path / 'toy.png'}" in out
    assert toy.seen == [("demo", 1, 2, 200)]
    records = json.loads((tmp_path / "demo.json").read_text())
    assert records == {
        "toy": [{"image": "toy-scene-0.png", "truth": "red", "dense": "red", "reduced": {"apet": "blue"}}]
    }
    assert (tmp_path / records["toy"][0]["image"]).is_file()


def test_mistakes_are_one_line_and_status_two(toy, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {
        "--out": ["demo", "--out", str(a_file)],
        "--toy-level must be >= 0": ["bench", "--out", str(tmp_path / "b"), "--toy-level", "-1"],
        "argument --batch-size: expected a positive integer": ["bench", "--batch-size", "0"],
        "argument --device": ["bench", "--device", "cuda:7"],
        "unrecognized arguments: --frobnicate": ["demo", "--frobnicate"],
    }
    for expected, argv in cases.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (expected, err)


def test_commands_without_suites_say_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_cli, "load_suites", lambda: ([], ["tokred: suite 'x' failed to load: boom"]))
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no reference suite is installed" in err and "boom" in err


def test_a_suite_without_a_dense_row_is_an_error(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(ToySuite, "bench", lambda self, args, progress: [_result("apet", 0.5, 0.8)])
    with pytest.raises(RuntimeError, match="no dense row first"):
        main(["bench", "--out", str(tmp_path), "--no-progress"])


def test_write_suite_report_returns_the_files(tmp_path):
    files = write_suite_report(ToySuite(), [_result("dense", 1.0, 0.9)], tmp_path, command="tokred bench")
    assert {f.name for f in files} == {
        "toy.md",
        "toy.json",
        "toy-accuracy.svg",
        "toy-accuracy.png",
        "toy-speed.svg",
        "toy-speed.png",
    }


def test_suite_interface_is_abstract():
    with pytest.raises(TypeError):
        ReferenceSuite()


def test_timing_warnings_flag_a_wide_spread_and_an_outlier():
    from tokred.bench.measure import timing_warnings

    def row(method, time_ms, spread, budget="11% tokens"):
        return BenchResult("vlm", method, budget, 0.11, 0.5, 1.0, 1.0, time_ms, spread, 1.0, 10.0, 8)

    steady = [row("dense", 10.0, 1.0, "dense"), row("a", 5.0, 0.5), row("b", 5.5, 0.4), row("c", 6.0, 0.3)]
    assert timing_warnings(steady) == []
    (wide,) = timing_warnings([*steady[:3], row("c", 6.0, 1.5)])
    assert wide.startswith("c at 11% tokens: time 6 ms ± 1.5 ms, a spread of 25% (above 20%)")
    (outlier,) = timing_warnings([*steady[:3], row("c", 40.0, 1.0)])
    assert outlier.startswith("c at 11% tokens: time 40 ms against a median of 5.5 ms") and "outlier" in outlier
