"""Argument types and options the ``tokred`` subcommands share, so the same thing has the same flag everywhere.

Every command that runs a model takes ``--device``; every command that attaches a reducer takes ``--reducer``,
``--reducer-arg KEY=VALUE`` and ``--seed``; lists are comma-separated (``--mamba-flops-cuts 0.2,0.3``). A bad
value is refused by the parser with one line naming the flag.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any

__all__ = [
    "add_device_argument",
    "add_reducer_arguments",
    "fraction",
    "fraction_list",
    "key_value",
    "name_list",
    "open_fraction",
    "positive_int",
    "torch_device",
]


def positive_int(text: str) -> int:
    """An int ``>= 1``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def fraction(text: str) -> float:
    """A number in ``(0, 1]`` (a fraction of tokens kept)."""
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], such as 0.25; got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A number in ``(0, 1)`` (a fraction of FLOPs saved)."""
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), such as 0.3; got {text!r}")
    return value


def fraction_list(text: str) -> tuple[float, ...]:
    """Comma-separated fractions in ``(0, 1)``, such as ``0.2,0.3,0.4``."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.2,0.3,0.4; got {text!r}")
    values = []
    for part in parts:
        value = _float(part)
        if not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1); got {part!r} in {text!r}")
        values.append(value)
    return tuple(values)


def name_list(text: str) -> tuple[str, ...]:
    """Comma-separated names, such as ``apet,tome``."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names such as apet,tome; got {text!r}")
    return names


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; the value is a Python literal (``16``, ``0.5``, ``true``, ``None``) or else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    lowered = raw.strip().lower()
    if lowered in ("true", "false", "none"):
        return key, {"true": True, "false": False, "none": None}[lowered]
    try:
        return key, ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        return key, raw


def torch_device(text: str) -> Any:
    """A ``torch.device`` that exists here: ``cpu``, ``cuda``, ``cuda:1``, ``mps``."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1; got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use --device cpu")
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (default ``cpu``)."""
    parser.add_argument(
        "--device",
        type=torch_device,
        default="cpu",
        metavar="DEVICE",
        help="torch device the model runs on: cpu, cuda, cuda:1, mps (default: cpu)",
    )


def add_reducer_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, default: str | None) -> None:
    """``--reducer NAME``, ``--reducer-arg KEY=VALUE`` (repeatable) and ``--seed``."""
    shown = default if default is not None else "none: the dense model"
    parser.add_argument(
        "--reducer",
        default=default,
        metavar="NAME",
        help=f"registered reducer (see `tokred reducers`), or 'none' for the dense model (default: {shown})",
    )
    parser.add_argument(
        "--reducer-arg",
        action="append",
        default=[],
        type=key_value,
        metavar="KEY=VALUE",
        help="a hyper-parameter of the reducer, e.g. num_basis=16 or target_ratio=0.5; repeatable",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of stochastic reducers such as random (default 0)")
