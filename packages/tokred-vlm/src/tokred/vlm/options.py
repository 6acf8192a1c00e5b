"""What a user asks of a reduction, checked once for every front end: the command line and lmms-eval.

``tokred vlm generate``, ``tokred vlm eval`` and the ``tokred`` model of lmms-eval take the same options — a
reducer, a budget (``num_keep``, ``keep_ratio`` or the paper's layer-averaged ``average``), inner stages
(``layers``), ``space`` and ``positions`` — spelled as command-line flags or as lmms-eval ``model_args``.
[`ReductionOptions`][tokred.vlm.options.ReductionOptions] holds them;
[`ReductionOptions.schedule`][tokred.vlm.options.ReductionOptions.schedule] checks them before any model is
loaded and returns what [`attach`][tokred.vlm.attach] needs once the model is there. The text forms are parsed
by [`parse_average`][tokred.vlm.options.parse_average] and [`parse_layers`][tokred.vlm.options.parse_layers].

Examples:
    >>> from tokred.vlm.options import ReductionOptions, parse_layers
    >>> parse_layers("16:32")
    ((16, 32),)
    >>> options = ReductionOptions(reducer="apet", num_keep=96, layers=parse_layers("16:32"))
    >>> options.dense
    False
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokred.core.errors import IncompatibleReducerError, InvalidInputError

__all__ = ["ReductionOptions", "parse_average", "parse_layers"]

Stage = tuple[int, "int | float"]


def _positive_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _fraction(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < 1 else None


def parse_average(text: str | float) -> int | float:
    """The paper's average budget: visual tokens per group (an integer ``>= 2``) or a fraction in ``(0, 2/3]``.

    Args:
        text: ``"64"``, ``64``, ``"0.2"``…

    Returns:
        An ``int`` number of tokens or a ``float`` fraction.

    Raises:
        InvalidInputError: On anything else, saying what is expected.
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InvalidInputError(f"expected a number of tokens such as 64, or a fraction; got {text!r}") from None
    if value.is_integer() and value >= 2:
        return int(value)
    if 0 < value <= 2 / 3:
        return value
    raise InvalidInputError(
        f"expected a number of tokens of at least 2 (such as 64) or a fraction up to 2/3 (such as 0.2); got {text!r}"
    )


def parse_layers(text: str) -> tuple[Stage, ...]:
    """Inner stages ``L:K`` separated by commas or semicolons: after decoder layer ``L``, keep ``K`` per group.

    ``K`` is a number of tokens or a fraction of what is left. Semicolons exist for lmms-eval, whose
    ``model_args`` are split on commas: ``layers=8:64;16:32``.

    Args:
        text: ``"16:32"``, ``"8:64,16:32"``, ``"8:64;16:32"``, ``"16:0.33"``.

    Returns:
        ``((L, K), ...)`` in the order given.

    Raises:
        InvalidInputError: On a malformed stage or an empty text.
    """
    stages: list[Stage] = []
    for part in (p.strip() for p in str(text).replace(";", ",").split(",")):
        if not part:
            continue
        layer, _, budget = part.partition(":")
        value = _positive_int(layer)
        amount: int | float | None = _positive_int(budget) if budget.strip().isdigit() else _fraction(budget)
        if value is None or amount is None:
            raise InvalidInputError(
                f"expected LAYER:TOKENS such as 16:32 (or 16:0.33 for a fraction of what is left); got {part!r}"
            )
        stages.append((value, amount))
    if not stages:
        raise InvalidInputError(f"expected LAYER:TOKENS such as 16:32; got {text!r}")
    return tuple(stages)


_CLI_SPELLING = {
    "num_keep": "--num-keep",
    "keep_ratio": "--keep-ratio",
    "average": "--average",
    "layers": "--layers",
    "reducer_args": "--reducer-arg",
    "reducer": "--reducer",
}


@dataclass(frozen=True)
class ReductionOptions:
    """A reducer, its budget and where it runs, as a user asked for them.

    Attributes:
        reducer: A registered reducer name (``"apet"``), or ``None`` / ``"none"`` for the dense model.
        num_keep: Visual tokens kept per image, crop or frame.
        keep_ratio: Fraction of each group's tokens kept.
        average: The paper's two-stage schedule ([`paper_schedule`][tokred.vlm.paper_schedule]): visual tokens
            per group averaged over the decoder layers (an ``int``), or that share of each group (a ``float``).
        layers: Inner stages ``((L, K), ...)``: after decoder layer ``L`` reduce again to ``K`` tokens per group
            (a ``float``: a fraction of what is left), with the same reducer.
        reducer_args: The reducer's other hyper-parameters.
        seed: Seed of a stochastic reducer that was not given one in ``reducer_args``.
        space: ``"vision"`` or ``"llm"``; the family's default when ``None``.
        positions: ``"original"`` or ``"compact"``; the family's default when ``None``.
        spelling: How error messages name the options: ``"cli"`` (``--num-keep``) or ``"model_args"``
            (``num_keep``).
    """

    reducer: str | None = "apet"
    num_keep: int | None = None
    keep_ratio: float | None = None
    average: int | float | None = None
    layers: tuple[Stage, ...] = ()
    reducer_args: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    space: str | None = None
    positions: str | None = None
    spelling: str = "cli"

    @property
    def dense(self) -> bool:
        """Whether no reducer is asked for."""
        return self.reducer is None or self.reducer.lower() == "none"

    def _name(self, key: str) -> str:
        return _CLI_SPELLING[key] if self.spelling == "cli" else key

    def schedule(self) -> Callable[[Any], dict[str, Any]] | None:
        """Check the options and return, as a function of the loaded model, the keyword arguments of ``attach``.

        Every mistake is found here, before anything is loaded; the paper schedule needs the model's depth, so
        the arguments are made from the model.

        Returns:
            ``None`` for a dense run; else ``build(model) -> {"reducer": ..., "layers": ..., "space": ...,
            "positions": ...}``.

        Raises:
            InvalidInputError: On a budget without a reducer, a reducer without a budget, two budgets, or
                ``average`` together with ``layers``.
            IncompatibleReducerError: On a budget given among the reducer's hyper-parameters, or a reducer that
                cannot run in a vision-language model.
            UnknownReducerError: On an unregistered reducer name.
        """
        n = self._name
        budgets = [key for key in ("num_keep", "keep_ratio", "average") if getattr(self, key) is not None]
        extra = dict(self.reducer_args)
        if self.dense:
            if budgets or extra or self.layers:
                raise InvalidInputError(
                    f"{n('num_keep')} / {n('keep_ratio')} / {n('average')} / {n('layers')} / {n('reducer_args')} "
                    f"need a reducer (not {n('reducer')} none)"
                )
            return None
        if len(budgets) > 1:
            raise InvalidInputError(f"give one budget, not both {n(budgets[0])} and {n(budgets[1])}")
        if self.average is not None and self.layers:
            raise InvalidInputError(
                f"{n('average')} sets the inner stage itself; give either {n('average')} or {n('layers')}"
            )
        if not budgets:
            raise InvalidInputError(
                f"{n('reducer')} {self.reducer} needs {n('num_keep')}, {n('keep_ratio')} or {n('average')} "
                f"(or {n('reducer')} none for a dense run)"
            )
        clash = sorted({"num_keep", "keep_ratio", "num_remove"} & extra.keys())
        if clash:
            raise IncompatibleReducerError(
                f"give the budget with {n('num_keep')} or {n('keep_ratio')}, not {n('reducer_args')} {clash[0]}"
            )
        from tokred.core import create_reducer, get_reducer_class
        from tokred.vlm.attachment import _check_reducer
        from tokred.vlm.schedules import paper_schedule

        reducer_name = self.reducer
        assert reducer_name is not None
        if get_reducer_class(reducer_name).stochastic and "seed" not in extra:
            extra["seed"] = self.seed
        where = {"space": self.space, "positions": self.positions}
        if self.average is not None:
            _check_reducer(create_reducer(reducer_name, num_keep=2, **extra))  # a wrong option fails before loading
            key = "average" if isinstance(self.average, int) else "average_ratio"
            average = self.average
            return lambda model: {
                **paper_schedule(model, reducer=reducer_name, **{key: average}, **extra),
                **where,
            }
        budget = {"num_keep": self.num_keep} if self.num_keep is not None else {"keep_ratio": self.keep_ratio}
        reducer = create_reducer(reducer_name, **budget, **extra)
        _check_reducer(reducer)  # before minutes of loading, not after
        layers = {}
        for layer, amount in self.layers:
            inner = {"num_keep": amount} if isinstance(amount, int) else {"keep_ratio": amount}
            layers[layer] = create_reducer(reducer_name, **inner, **extra)
        return lambda model: {"reducer": reducer, "layers": layers or None, **where}
