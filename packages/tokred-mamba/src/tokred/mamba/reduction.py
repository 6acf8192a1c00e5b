"""Running a token reducer inside a tokred-mamba model: schedules, the per-block hook, and ``attach``.

A schedule says where and how much: ``{block index: tokens removed after that block}``. The reducer says how
(MTR, or any registered reducer: ``random``, ``norm``, ``tome``, …), so every comparison runs through the same
code. After each scheduled block the hook reduces the hidden states, applies the same plan to the residual
stream, protects the class token and tracks where it went, and carries token sizes forward so later merges
are size-weighted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tokred.core import Reducer, Reduction, create_reducer
from tokred.mamba.flops import Convention, count_flops, token_counts

__all__ = ["ReductionHandle", "TokenReductionHook", "attach", "default_reduce_after", "solve_schedule"]


def default_reduce_after(depth: int) -> list[int]:
    """Every second block from the second on, stopping two before the end: 1, 3, …, 21 for depth 24.

    The "merge before every even block" pattern of R-MeeTo, which gives the 20 / 30 / 40 % FLOPs cuts of the
    MTR paper at r ≈ 7 / 11 / 14 tokens per step on Vim.
    """
    return list(range(1, depth - 2, 2))


def _check_schedule(model: nn.Module, schedule: Mapping[int, int]) -> dict[int, int]:
    depth = model.depth
    clean = {}
    for block, r in schedule.items():
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < depth - 1:
            raise ValueError(
                f"schedule block index {block!r} is out of range: reductions happen after blocks 0..{depth - 2} "
                f"of this {depth}-block model (after the last block nothing is left to save)"
            )
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"schedule entry for block {block} must be a non-negative token count; got {r!r}")
        clean[block] = r
    counts = token_counts(model, schedule=clean)
    remaining = counts[-1] - clean.get(depth - 1, 0)
    if min(counts) < 2 or remaining < 2:
        raise ValueError(
            f"the schedule removes {sum(clean.values())} of {counts[0]} tokens, leaving fewer than two (the class "
            "token and one patch); lower r or reduce after fewer blocks"
        )
    return dict(sorted(clean.items()))


def solve_schedule(
    model: nn.Module,
    flops_cut: float,
    *,
    after: Iterable[int] | None = None,
    convention: Convention = "one_direction",
    image_size: int | None = None,
) -> dict[int, int]:
    """The schedule that removes the same ``r`` after each of ``after`` and comes closest to a FLOPs cut.

    Args:
        model: A tokred-mamba model.
        flops_cut: Target fraction of the dense FLOPs to save, in ``(0, 1)`` (the MTR paper: 0.2, 0.3, 0.4).
        after: Block indices to reduce after; :func:`default_reduce_after` by default.
        convention: FLOPs convention (see :func:`~tokred.mamba.flops.count_flops`).
        image_size: Input side; the model's own by default.

    Returns:
        ``{block index: r}``; the achieved cut is ``1 - count_flops(..., schedule=s) / count_flops(..., {})``.

    Raises:
        ValueError: If the cut is out of range or cannot be met without running out of tokens.
    """
    if not 0.0 < flops_cut < 1.0:
        raise ValueError(f"flops_cut must lie in (0, 1); got {flops_cut}")
    blocks = list(default_reduce_after(model.depth) if after is None else after)
    if not blocks:
        raise ValueError("after must name at least one block")
    dense = count_flops(model, image_size, convention, schedule={})
    best: tuple[float, dict[int, int]] | None = None
    reached = False
    r = 0
    while True:
        r += 1
        candidate = {block: r for block in blocks}
        try:
            schedule = _check_schedule(model, candidate)
        except ValueError:
            break
        cut = 1.0 - count_flops(model, image_size, convention, schedule=schedule) / dense
        if best is None or abs(cut - flops_cut) < abs(best[0] - flops_cut):
            best = (cut, schedule)
        if cut >= flops_cut:
            reached = True
            break
    # Closest wins; running out of tokens first is only acceptable within a point of the target.
    if best is None or (not reached and flops_cut - best[0] > 0.01):
        reachable = 0.0 if best is None else best[0]
        raise ValueError(
            f"a FLOPs cut of {flops_cut:.0%} cannot be met by removing tokens after blocks {blocks}: at most "
            f"{reachable:.1%} before the tokens run out; reduce after more or earlier blocks"
        )
    return best[1]


class TokenReductionHook:
    """The callable a model runs after each block (``model.token_reduction``); applies one schedule step.

    Args:
        reducer: Any tokred reducer; its own budget is overridden by the schedule.
        schedule: ``{block index: tokens removed after that block}``.
        track: Keep the plan of the last forward from the original tokens to the final ones in
            :attr:`last_plan` (for visualisation and tests; costs a little per step).
    """

    def __init__(self, reducer: Reducer, schedule: Mapping[int, int], *, track: bool = False) -> None:
        self.reducer = reducer
        self.schedule = dict(schedule)
        self.track = track
        self.last_plan: Reduction | None = None
        self._sizes: torch.Tensor | None = None
        self._scores_from_block = getattr(reducer, "scores_from_block", None)

    def __call__(
        self, index: int, block: nn.Module, hidden: torch.Tensor, residual: torch.Tensor, cls_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reduce ``hidden`` ``(B, L, D)`` and ``residual`` ``(B, L, D)`` after block ``index`` if scheduled.

        Returns:
            ``(hidden, residual, cls_pos)`` with ``L - r`` tokens; ``cls_pos`` ``(B,)`` is the class token's new
            position in each row.
        """
        if index == 0:  # a new forward pass: forget the previous one's sizes and plan
            self._sizes, self.last_plan = None, None
        r = self.schedule.get(index, 0)
        if r == 0:
            return hidden, residual, cls_pos
        batch, length = hidden.shape[:2]
        protected = torch.zeros((batch, length), dtype=torch.bool, device=hidden.device)
        protected[torch.arange(batch, device=hidden.device), cls_pos] = True
        scores = self._scores_from_block(block) if self._scores_from_block is not None else None
        plan = self.reducer(hidden, scores=scores, protected=protected, sizes=self._sizes, num_keep=length - r)
        self._sizes = plan.sizes
        if self.track:
            self.last_plan = plan if self.last_plan is None else self.last_plan.compose(plan)
        return plan.tokens, plan.apply(residual), plan.assignment.gather(1, cls_pos.unsqueeze(1)).squeeze(1)


class ReductionHandle:
    """What :func:`attach` returns: the hook, its schedule, and ``detach()``; also a context manager."""

    def __init__(self, model: nn.Module, hook: TokenReductionHook, previous_flags: dict[int, bool]) -> None:
        self.model = model
        self.hook = hook
        self._previous_flags = previous_flags
        self._attached = True

    @property
    def schedule(self) -> dict[int, int]:
        """``{block index: tokens removed after that block}``."""
        return dict(self.hook.schedule)

    @property
    def last_plan(self) -> Reduction | None:
        """The composed plan of the last forward pass (only with ``track=True``)."""
        return self.hook.last_plan

    def detach(self) -> None:
        """Restore the model exactly as it was before :func:`attach`."""
        if not self._attached:
            return
        for index, flag in self._previous_flags.items():
            self.model.layers[index].mixer.record_delta = flag
        self.model.token_reduction = None
        self._attached = False

    def __enter__(self) -> ReductionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(
    model: nn.Module,
    reducer: Reducer | str,
    *,
    r: int | None = None,
    after: Iterable[int] | None = None,
    schedule: Mapping[int, int] | None = None,
    flops_cut: float | None = None,
    convention: Convention = "one_direction",
    track: bool = False,
    **reducer_config: Any,
) -> ReductionHandle:
    """Make a tokred-mamba model reduce tokens with ``reducer`` on a schedule; returns a handle to undo it.

    Give the schedule one way: ``r`` tokens after each block of ``after`` (default: every second block, see
    :func:`default_reduce_after`), an explicit ``schedule`` ``{block: r}``, or a ``flops_cut`` (0.2 / 0.3 /
    0.4) for which ``r`` is solved.

    Args:
        model: A model from :func:`tokred.mamba.create_model`.
        reducer: A reducer, or a registered name (``"mtr"``, ``"tome"``, …) built with ``reducer_config``.
        r: Tokens removed after each block of ``after``.
        after: Block indices for ``r`` or ``flops_cut``.
        schedule: ``{block index: tokens removed after it}``.
        flops_cut: Fraction of dense FLOPs to save; ``r`` is solved with :func:`solve_schedule`.
        convention: FLOPs convention for ``flops_cut``.
        track: Record the composed plan of each forward (``handle.last_plan``).
        **reducer_config: Hyper-parameters when ``reducer`` is a name.

    Returns:
        A :class:`ReductionHandle`; ``handle.detach()`` (or leaving a ``with`` block) restores the model.

    Raises:
        ValueError: If the schedule is given zero or several ways, is out of range or removes too many tokens.
        RuntimeError: If a reducer is already attached to the model.

    Example:
        >>> import torch
        >>> from tokred.mamba import attach, create_model
        >>> model = create_model("vim_test").eval()
        >>> with attach(model, "mtr", flops_cut=0.3) as handle:
        ...     logits = model(torch.randn(2, 3, model.img_size, model.img_size))
        >>> logits.shape
        torch.Size([2, 10])
    """
    if getattr(model, "token_reduction", None) is not None:
        raise RuntimeError("a token reducer is already attached to this model; detach it first")
    if not hasattr(model, "layers") or not hasattr(model, "depth"):
        raise TypeError(f"attach expects a tokred-mamba model; got {type(model).__name__}")
    ways = sum(x is not None for x in (r, schedule, flops_cut))
    if ways != 1:
        raise ValueError("give the schedule exactly one way: r (with optional after), schedule, or flops_cut")
    if after is not None and schedule is not None:
        raise ValueError("after goes with r or flops_cut, not with an explicit schedule")
    if r is not None:
        blocks = default_reduce_after(model.depth) if after is None else list(after)
        plan = _check_schedule(model, {block: r for block in blocks})
    elif schedule is not None:
        plan = _check_schedule(model, schedule)
    else:
        plan = solve_schedule(model, flops_cut, after=after, convention=convention)
    if isinstance(reducer, str):
        reducer = create_reducer(reducer, num_remove=max(plan.values(), default=0), **reducer_config)
    elif reducer_config:
        raise TypeError("reducer_config is only for a reducer given by name")
    hook = TokenReductionHook(reducer, plan, track=track)
    previous = {}
    if hook._scores_from_block is not None:
        for index in plan:
            mixer = model.layers[index].mixer
            previous[index] = mixer.record_delta
            mixer.record_delta = True
    model.token_reduction = hook
    return ReductionHandle(model, hook, previous)
