"""The ``model_args`` of ``--model tokred``: the reduction, the loading, and the family's stock options.

lmms-eval splits ``--model_args`` on commas and turns numbers into ``int`` / ``float`` and ``true`` / ``false``
into ``bool`` before the model sees them; [`split_model_args`][tokred.vlm.eval.options.split_model_args] takes
them from there. Inner stages are separated by semicolons (``layers=8:64;16:32``), since a comma would end
the value, and a reducer's own hyper-parameters are prefixed with ``reducer.`` (``reducer.variant=reference``).

Examples:
    >>> from tokred.vlm.eval.options import split_model_args
    >>> reduction, loading, stock = split_model_args(
    ...     {"pretrained": "llava_scenes", "num_keep": 64, "layers": "16:32", "use_cache": True}, ("use_cache",)
    ... )
    >>> reduction.num_keep, reduction.layers, loading["pretrained"], stock
    (64, ((16, 32),), 'llava_scenes', {'use_cache': True})
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tokred.core.cli.options import open_fraction, positive_int
from tokred.core.errors import InvalidInputError
from tokred.vlm.options import ReductionOptions, parse_average, parse_layers

__all__ = ["LOADING_KEYS", "REDUCTION_KEYS", "split_model_args"]

REDUCTION_KEYS: tuple[str, ...] = (
    "reducer",
    "num_keep",
    "keep_ratio",
    "average",
    "layers",
    "space",
    "positions",
    "seed",
)
"""The reduction's ``model_args`` (those of [`attach`][tokred.vlm.attach] and of ``tokred vlm generate``),
besides ``reducer.<hyper-parameter>``."""

LOADING_KEYS: tuple[str, ...] = ("pretrained", "device", "dtype", "attn_implementation", "batch_size", "max_batch_size")
"""How the checkpoint is loaded and run; ``batch_size`` and ``max_batch_size`` come from lmms-eval's own flags."""

_PREFIX = "reducer."


def _parsed(key: str, value: Any, parse: Callable[[str], Any], expected: str) -> Any:
    # The command line's parsers, so that --num-keep 4 and num_keep=4 accept the same values.
    try:
        if isinstance(value, bool):
            raise argparse.ArgumentTypeError(expected)
        return parse(str(value))
    except argparse.ArgumentTypeError:
        raise InvalidInputError(f"model_args {key}={value!r}: expected {expected}") from None


def _positive_int(key: str, value: Any) -> int:
    return _parsed(key, value, positive_int, "a positive integer")


def _ratio(key: str, value: Any) -> float:
    return _parsed(key, value, open_fraction, "a fraction between 0 and 1, such as 0.25")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidInputError(f"model_args {key}={value!r}: expected one of {', '.join(choices)}")
    return str(value)


def split_model_args(
    model_args: Mapping[str, Any], stock_keys: Iterable[str]
) -> tuple[ReductionOptions, dict[str, Any], dict[str, Any]]:
    """Sort ``model_args`` into the reduction, the loading options and the stock class's own options.

    Args:
        model_args: The keyword arguments lmms-eval passes to the model class.
        stock_keys: The options of the family's stock lmms-eval class that tokred passes through
            (``max_frames_num``, ``min_pixels``, …).

    Returns:
        ``(reduction, loading, stock)``: the [`ReductionOptions`][tokred.vlm.options.ReductionOptions] (dense
        when ``reducer=none``), the loading options given (``pretrained``, ``device``, ``dtype``, …) and the
        stock options given.

    Raises:
        InvalidInputError: On an unknown key (the message lists the valid ones) or a malformed value.
    """
    stock_keys = tuple(stock_keys)
    reduction: dict[str, Any] = {}
    reducer_args: dict[str, Any] = {}
    loading: dict[str, Any] = {}
    stock: dict[str, Any] = {}
    unknown = []
    for key, value in model_args.items():
        if key.startswith(_PREFIX) and len(key) > len(_PREFIX):
            reducer_args[key[len(_PREFIX) :]] = value
        elif key in REDUCTION_KEYS:
            reduction[key] = value
        elif key in LOADING_KEYS:
            loading[key] = value
        elif key in stock_keys:
            stock[key] = value
        else:
            unknown.append(key)
    if unknown:
        valid = ", ".join([*LOADING_KEYS, *REDUCTION_KEYS, f"{_PREFIX}<hyper-parameter>", *stock_keys])
        raise InvalidInputError(
            f"unknown model_args {', '.join(map(repr, unknown))} for --model tokred; valid: {valid}"
        )
    if "pretrained" not in loading:
        raise InvalidInputError("model_args needs pretrained=PATH_OR_HUB_ID (a checkpoint folder, a Hub id or a name)")
    reducer = reduction.get("reducer", "apet")
    options = ReductionOptions(
        reducer=None if reducer is None else str(reducer),
        num_keep=None if reduction.get("num_keep") is None else _positive_int("num_keep", reduction["num_keep"]),
        keep_ratio=None if reduction.get("keep_ratio") is None else _ratio("keep_ratio", reduction["keep_ratio"]),
        average=None if reduction.get("average") is None else parse_average(reduction["average"]),
        layers=() if reduction.get("layers") in (None, "") else parse_layers(str(reduction["layers"])),
        reducer_args=reducer_args,
        seed=0 if reduction.get("seed") is None else int(reduction["seed"]),
        space=None if reduction.get("space") is None else _choice("space", reduction["space"], ("vision", "llm")),
        positions=None
        if reduction.get("positions") is None
        else _choice("positions", reduction["positions"], ("original", "compact")),
        spelling="model_args",
    )
    return options, loading, stock
