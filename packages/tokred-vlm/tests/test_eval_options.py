"""The options of `--model tokred` and `tokred vlm eval`, and the statistics' summary: pure Python, no lmms-eval."""

import re

import pytest

from tokred.core.errors import IncompatibleReducerError, InvalidInputError, MissingDependencyError
from tokred.vlm import ApET
from tokred.vlm.eval import require_lmms_eval
from tokred.vlm.eval.options import LOADING_KEYS, REDUCTION_KEYS, split_model_args
from tokred.vlm.eval.summary import summarize_samples
from tokred.vlm.options import ReductionOptions, parse_average, parse_layers


@pytest.mark.parametrize(
    ("text", "stages"),
    [
        ("16:32", ((16, 32),)),
        ("8:64,16:32", ((8, 64), (16, 32))),
        ("8:64;16:32", ((8, 64), (16, 32))),
        (" 8:64 ; 16:0.5 ", ((8, 64), (16, 0.5))),
    ],
)
def test_stages_parse_with_commas_or_semicolons(text, stages):
    assert parse_layers(text) == stages


@pytest.mark.parametrize("text", ["", ";", "16", "16:", ":32", "0:32", "16:0", "16:1.5", "a:b", "16:32;x"])
def test_malformed_stages_say_what_is_expected(text):
    with pytest.raises(InvalidInputError, match="LAYER:TOKENS such as 16:32"):
        parse_layers(text)


def test_the_average_is_tokens_or_a_fraction():
    assert parse_average("64") == 64 and isinstance(parse_average(64.0), int)
    assert parse_average("0.2") == pytest.approx(0.2)
    for bad in ("1", "0.9", "-3", "many", None):
        with pytest.raises(InvalidInputError, match="expected a number of tokens"):
            parse_average(bad)


def test_model_args_are_sorted_into_reduction_loading_and_stock():
    reduction, loading, stock = split_model_args(
        {
            "pretrained": "x",
            "reducer": "apet",
            "num_keep": 96,
            "layers": "16:32",
            "reducer.variant": "reference",
            "space": "llm",
            "positions": "original",
            "device": "cpu",
            "batch_size": "1",
            "max_pixels": 1000,
        },
        ("max_pixels",),
    )
    assert reduction == ReductionOptions(
        reducer="apet",
        num_keep=96,
        layers=((16, 32),),
        reducer_args={"variant": "reference"},
        space="llm",
        positions="original",
        spelling="model_args",
    )
    assert loading == {"pretrained": "x", "device": "cpu", "batch_size": "1"}
    assert stock == {"max_pixels": 1000}
    build = reduction.schedule()
    assert build is not None
    arguments = build(None)
    assert isinstance(arguments["reducer"], ApET) and arguments["reducer"].budget.num_keep == 96
    assert arguments["reducer"].variant == "reference"
    assert list(arguments["layers"]) == [16] and arguments["layers"][16].budget.num_keep == 32
    assert (arguments["space"], arguments["positions"]) == ("llm", "original")


def test_an_unknown_key_lists_the_valid_ones():
    with pytest.raises(InvalidInputError) as error:
        split_model_args({"pretrained": "x", "num_kep": 64, "max_pixels": 3}, ("use_cache",))
    message = str(error.value)
    assert "unknown model_args 'num_kep', 'max_pixels'" in message
    for key in (*LOADING_KEYS, *REDUCTION_KEYS, "reducer.<hyper-parameter>", "use_cache"):
        assert key in message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "needs pretrained="),
        ({"pretrained": "x", "num_keep": 0}, "num_keep=0: expected a positive integer"),
        ({"pretrained": "x", "num_keep": "many"}, "num_keep='many': expected a positive integer"),
        ({"pretrained": "x", "num_keep": True}, "num_keep=True"),
        ({"pretrained": "x", "keep_ratio": 1.5}, "keep_ratio=1.5: expected a fraction"),
        ({"pretrained": "x", "space": "pixels"}, "space='pixels': expected one of vision, llm"),
        ({"pretrained": "x", "positions": "left"}, "positions='left'"),
        ({"pretrained": "x", "layers": "16-32"}, "LAYER:TOKENS"),
        ({"pretrained": "x", "average": 1}, "expected a number of tokens"),
    ],
)
def test_malformed_model_args_are_named(args, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        split_model_args(args, ())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "reducer apet needs num_keep, keep_ratio or average (or reducer none"),
        ({"reducer": "none", "num_keep": 4}, "need a reducer (not reducer none)"),
        ({"num_keep": 4, "keep_ratio": 0.5}, "give one budget, not both num_keep and keep_ratio"),
        ({"average": 64, "layers": "16:32"}, "give either average or layers"),
        ({"num_keep": 4, "reducer.num_keep": 8}, "not reducer_args num_keep"),
    ],
)
def test_reduction_mistakes_are_found_before_loading(args, message):
    reduction, _, _ = split_model_args({"pretrained": "x", **args}, ())
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        reduction.schedule()


def test_budget_clashes_are_incompatible_reducer_errors():
    reduction, _, _ = split_model_args({"pretrained": "x", "num_keep": 4, "reducer.keep_ratio": 0.5}, ())
    with pytest.raises(IncompatibleReducerError):
        reduction.schedule()


def test_dense_options_build_nothing():
    reduction, _, _ = split_model_args({"pretrained": "x", "reducer": "none"}, ())
    assert reduction.dense and reduction.schedule() is None


def test_the_statistics_average_per_task():
    def sample(visual, kept, average, ms, groups=2):
        counts = {"visual_tokens": visual, "kept_tokens": kept, "average_tokens": average, "groups": groups}
        return {"token_counts": [{**counts, "prefill_ms": ms, "output_tokens": 1}]}

    samples = {
        "a": [sample(576, [96, 32], 64.0, 10.0), sample(288, [48, 16], 32.0, 30.0), sample(576, [96, 32], 64.0, 11.0)],
        "dense": [sample(10, [], None, 4.0, groups=None)],
    }
    summary = summarize_samples(samples)
    assert summary["a"] == {
        "samples": 3,
        "visual_tokens": 480.0,
        "kept_tokens": [80.0, 80 / 3],
        "average_tokens": pytest.approx(160 / 3),
        "groups": 2.0,
        "prefill_ms": 17.0,
        "prefill_ms_median": 11.0,
    }
    assert summary["dense"]["kept_tokens"] == [] and summary["dense"]["average_tokens"] is None
    assert summarize_samples({"empty": [{"doc_id": 0}]})["empty"]["visual_tokens"] is None


def test_without_the_extra_the_error_names_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # what a missing package looks like to import
    with pytest.raises(MissingDependencyError, match=re.escape("pip install 'tokred-vlm[eval]'")):
        require_lmms_eval()
