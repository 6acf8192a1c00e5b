"""The tokred command line."""

import json

import pytest

from tokred.core.cli import build_parser, format_table, main


def test_reducers_table_has_one_line_per_reducer(capsys):
    assert main(["reducers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert {"divprune", "norm", "random", "tome", "uniform"} <= set(rows)
    assert "bipartite soft matching" in rows["tome"]


def test_reducers_json(capsys):
    assert main(["reducers", "--json"]) == 0
    listed = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
    assert listed["norm"]["distribution"] == "tokred-core"
    assert listed["norm"]["target"] == "tokred.core.reducers.norm:NormReducer"


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "reducers" in capsys.readouterr().out


def test_unknown_subcommand_exits_with_usage_error():
    assert main(["frobnicate"]) == 2


def test_parser_loads_without_problems():
    _, problems = build_parser()
    assert problems == []


def test_reducers_table_is_aligned_under_its_headers(capsys):
    assert main(["reducers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "package", "description"]
    assert set(lines[1].replace(" ", "")) == {"-"}, "a rule under the headers"
    package_column = lines[0].index("package")
    assert all(line[package_column - 2 : package_column] == "  " for line in lines[2:])


def test_format_table_plain_and_markdown():
    rows = [["dense", "93.0%", "3.10"], ["apet", "63.9%", "12.25"]]
    plain = format_table(["method", "accuracy", "ms"], rows)
    assert plain.splitlines() == [
        "method  accuracy     ms",
        "------  --------  -----",
        "dense      93.0%   3.10",
        "apet       63.9%  12.25",
    ]
    markdown = format_table(["method", "accuracy", "ms"], rows, style="markdown")
    assert markdown.splitlines()[:2] == ["| method | accuracy |    ms |", "| ------ | -------: | ----: |"]
    assert format_table(["a"], []) == "a\n-\n"
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        format_table(["a", "b"], [["only one"]])
    with pytest.raises(ValueError, match="style"):
        format_table(["a"], [["x"]], style="html")


def test_a_bad_argument_is_one_line_and_status_two(capsys):
    assert main(["reducers", "--jsn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tokred reducers: unrecognized arguments: --jsn (see tokred reducers --help)"]


def test_a_bad_value_is_one_line_naming_the_subcommand(capsys):
    assert main(["frobnicate"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tokred: argument COMMAND: invalid choice: 'frobnicate'") and "(see tokred --help)" in line
