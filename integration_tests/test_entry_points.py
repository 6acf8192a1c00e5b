"""Plug-ins: reducers and subcommands from other distributions, found only through entry points."""

import sys

import pytest
import torch

from tokred.core import PluginLoadError, available_reducers, create_reducer, reducer_info
from tokred.core.cli import main

from .conftest import KEEP_FIRST_SOURCE

GROUP = "tokred.reducers"


def test_entry_point_reducer_is_found_lazily(fake_distributions):
    fake_distributions.add(
        "tokred-test-plugin",
        {GROUP: {"keep_first": "tokred_test_plugin:KeepFirstReducer"}},
        {"tokred_test_plugin": KEEP_FIRST_SOURCE},
    )
    assert "keep_first" in available_reducers()
    assert "tokred_test_plugin" not in sys.modules, "listing must not import plug-ins"
    reducer = create_reducer("keep_first", num_keep=3)
    assert type(reducer).name == "keep_first"
    red = reducer(torch.randn(2, 8, 4))
    assert red.indices.tolist() == [[0, 1, 2]] * 2
    (info,) = reducer_info(["keep_first"])
    assert info.distribution == "tokred-test-plugin" and info.summary.startswith("Keep the first tokens")


def test_broken_plugin_names_itself_and_spares_the_others(fake_distributions):
    fake_distributions.add(
        "tokred-broken-plugin",
        {GROUP: {"broken": "tokred_broken_plugin:Nope"}},
        {"tokred_broken_plugin": "import module_that_does_not_exist\n"},
    )
    fake_distributions.add(
        "tokred-test-plugin",
        {GROUP: {"keep_first": "tokred_test_plugin:KeepFirstReducer"}},
        {"tokred_test_plugin": KEEP_FIRST_SOURCE},
    )
    with pytest.raises(
        PluginLoadError,
        match=r"'broken' \(tokred_broken_plugin:Nope, from distribution "
        r"tokred-broken-plugin\) failed to load: ModuleNotFoundError",
    ):
        create_reducer("broken", num_keep=2)
    assert create_reducer("keep_first", num_keep=2) is not None
    assert create_reducer("tome", num_keep=2) is not None
    infos = {info.name: info for info in reducer_info()}
    assert infos["broken"].error and "module_that_does_not_exist" in infos["broken"].error
    assert infos["keep_first"].error is None


def test_tokred_reducers_lists_plugins_and_reports_broken_ones(fake_distributions, capsys):
    fake_distributions.add(
        "tokred-broken-plugin",
        {GROUP: {"broken": "tokred_broken_plugin:Nope"}},
        {"tokred_broken_plugin": "raise RuntimeError('boom')\n"},
    )
    assert main(["reducers"]) == 1
    out = capsys.readouterr().out
    for name in ("divprune", "norm", "random", "tome", "uniform", "broken"):
        assert name in out
    assert "RuntimeError: boom" in out


def test_two_plugins_declaring_one_name_is_an_error(fake_distributions):
    fake_distributions.add(
        "tokred-plugin-a", {GROUP: {"dupe": "tokred_plugin_a:KeepFirstReducer"}}, {"tokred_plugin_a": KEEP_FIRST_SOURCE}
    )
    fake_distributions.add(
        "tokred-plugin-b", {GROUP: {"dupe": "tokred_plugin_b:KeepFirstReducer"}}, {"tokred_plugin_b": KEEP_FIRST_SOURCE}
    )
    with pytest.raises(PluginLoadError, match=r"declared by several plug-ins.*tokred-plugin-a.*tokred-plugin-b"):
        create_reducer("dupe", num_keep=2)


def test_subcommands_come_from_entry_points(fake_distributions, capsys):
    fake_distributions.add(
        "tokred-hello",
        {"tokred.commands": {"hello": "tokred_hello:register", "broken": "tokred_hello_broken:register"}},
        {
            "tokred_hello": """
                def register(subparsers):
                    parser = subparsers.add_parser("hello", help="say hello")
                    parser.add_argument("--name", default="world")
                    parser.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)
            """,
            "tokred_hello_broken": "def register(subparsers):\n    raise ValueError('bad plug-in')\n",
        },
    )
    assert main(["hello", "--name", "tokred"]) == 0
    captured = capsys.readouterr()
    assert "hello tokred" in captured.out
    assert "subcommand 'broken'" in captured.err and "bad plug-in" in captured.err
    assert main(["reducers"]) == 0
