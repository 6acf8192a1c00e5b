"""The tokred command line."""

import json

import pytest

from tokred.core.cli import build_parser, main


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
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_parser_loads_without_problems():
    _, problems = build_parser()
    assert problems == []
