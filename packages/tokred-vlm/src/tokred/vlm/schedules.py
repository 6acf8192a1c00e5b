"""The paper's two-stage token budgets, worked out for a model: ``attach(model, **paper_schedule(model, average=64))``.

ApET reports every budget as an *average over the decoder layers*: "64 tokens" on LLaVA-1.5-7B is 96 visual
tokens per image through decoder layers 1–16, then ApET again on the language model's hidden states, keeping
32 for layers 17–32. The released scripts follow one rule, which [`paper_schedule`][tokred.vlm.schedules.paper_schedule]
applies to any model: the first stage keeps 1.5 times the average, an inner stage after half of the decoder
layers keeps 0.5 times the average, so the layer average is the requested one (192 → 288 and 96, 128 → 192
and 64, 64 → 96 and 32; Qwen2.5-VL's 30% → 10% after layer 14 of 28 is an average of 20%).
"""

from __future__ import annotations

from typing import Any

from tokred.core import create_reducer
from tokred.core.errors import InvalidInputError
from tokred.core.reducer import Reducer

__all__ = ["FIRST_STAGE_FACTOR", "INNER_STAGE_FACTOR", "paper_schedule"]

FIRST_STAGE_FACTOR = 1.5
"""What the first stage keeps, as a multiple of the layer-averaged budget."""

INNER_STAGE_FACTOR = 0.5
"""What the inner stage keeps from half of the decoder layers on, as a multiple of the layer-averaged budget."""


def paper_schedule(
    model: Any,
    *,
    average: int | None = None,
    average_ratio: float | None = None,
    reducer: str = "apet",
    layer: int | None = None,
    **reducer_config: Any,
) -> dict[str, Any]:
    """The keyword arguments of [`attach`][tokred.vlm.attach] for the paper's two-stage schedule on ``model``.

    Examples:
        ```python
        from tokred.vlm import attach, paper_schedule

        schedule = paper_schedule(model, average=64)  # LLaVA-1.5-7B: 96 per image, then 32 after layer 16
        with attach(model, **schedule) as handle:
            model.generate(**inputs, max_new_tokens=32)
        print(handle.last_stats.average_visual_tokens)  # 64.0 per image

        attach(model, **paper_schedule(model, average_ratio=0.2))  # Qwen2.5-VL: 30%, then 10% after layer 14
        ```

    Args:
        model: The model the schedule is for (its decoder's depth sets the layer).
        average: Visual tokens per image, crop or frame, averaged over the decoder layers (the paper's 64, 128,
            192); the first stage keeps ``round(1.5 * average)`` of each group and the inner stage
            ``round(0.5 * average)``.
        average_ratio: The same as a fraction of each group's tokens, for dynamic-resolution models: the first
            stage keeps ``1.5 * average_ratio`` of each group, the inner stage a third of what is left. At most
            2/3.
        reducer: A registered reducer name for both stages (ApET by default).
        layer: The first decoder layer of the inner stage; default half of the decoder's layers (16 of 32 for
            LLaVA-1.5-7B, 14 of 28 for Qwen2.5-VL-7B).
        **reducer_config: Hyper-parameters of both stages' reducers (``num_basis=10``, ``variant="paper"``).

    Returns:
        ``{"reducer": first_stage, "layers": {layer: inner_stage}}``.

    Raises:
        InvalidInputError: Unless exactly one of ``average`` and ``average_ratio`` is given, in range, or if the
            decoder has fewer than two layers.
    """
    num_layers = len(model.get_decoder().layers)
    if num_layers < 2:
        raise InvalidInputError(f"a two-stage schedule needs a decoder of at least 2 layers; this one has {num_layers}")
    if (average is None) == (average_ratio is None):
        raise InvalidInputError(
            "give exactly one of average (visual tokens per image, e.g. average=64) and average_ratio (a fraction "
            "of each image's tokens, e.g. average_ratio=0.2)"
        )
    inner_layer = num_layers // 2 if layer is None else layer
    if average is not None:
        if isinstance(average, bool) or not isinstance(average, int) or average < 2:
            raise InvalidInputError(f"average must be an integer number of tokens of at least 2, got {average!r}")
        first: Reducer = create_reducer(reducer, num_keep=round(FIRST_STAGE_FACTOR * average), **reducer_config)
        inner: Reducer = create_reducer(reducer, num_keep=round(INNER_STAGE_FACTOR * average), **reducer_config)
    else:
        limit = 1 / FIRST_STAGE_FACTOR
        if not isinstance(average_ratio, int | float) or not 0 < average_ratio <= limit:
            raise InvalidInputError(
                f"average_ratio must be in (0, {limit:.3g}] so that the first stage keeps at most every token, "
                f"got {average_ratio!r}"
            )
        # Rounded so that 0.2 gives 0.3 and 1/3, not 0.30000000000000004.
        first_ratio = round(FIRST_STAGE_FACTOR * average_ratio, 9)
        inner_ratio = round(INNER_STAGE_FACTOR / FIRST_STAGE_FACTOR, 9)
        first = create_reducer(reducer, keep_ratio=first_ratio, **reducer_config)
        inner = create_reducer(reducer, keep_ratio=inner_ratio, **reducer_config)
    return {"reducer": first, "layers": {inner_layer: inner}}
