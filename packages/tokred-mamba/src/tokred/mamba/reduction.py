"""Running a token reducer inside a tokred-mamba model: the per-block step and ``attach``.

A schedule ([`tokred.mamba.schedule`][tokred.mamba.schedule]) says where and how much: ``{block index: tokens
removed after that block}``. The reducer says how (MTR, or any registered reducer: ``random``, ``norm``,
``tome``, …), so every comparison runs through the same code. After each scheduled block the step reduces the
hidden states, applies the same plan to the residual stream, protects the class token and tracks where it
went, and carries token sizes forward so later merges are size-weighted. A reducer that ranks by Δ
(``needs_scores="delta"``, MTR) gets the Δ the block just used, handed over explicitly by the block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokred.core import Reducer, Reduction, create_reducer
from tokred.core.errors import AttachError, IncompatibleReducerError, InvalidInputError, InvalidTypeError
from tokred.mamba.flops import Convention
from tokred.mamba.layers.mixer import ScanDelta
from tokred.mamba.schedule import check_schedule, default_reduce_after, solve_schedule
from tokred.mamba.scores import SUPPLIED_SCORES

__all__ = ["Attachment", "ForwardStats", "ImagePlan", "TokenReduction", "attach"]

_BUDGET_KEYS = ("num_keep", "keep_ratio", "num_remove")


@dataclass(frozen=True)
class ForwardStats:
    """What the last forward pass through an attached model kept.

    Attributes:
        batch: Images in the batch.
        tokens: Tokens entering each block, the class token included (the same in every row).
        kept: Tokens the head's final norm saw, after the last reduction step.
    """

    batch: int
    tokens: tuple[int, ...]
    kept: int

    @property
    def mean_tokens(self) -> float:
        """Tokens per block, averaged over the blocks: what the FLOPs of the blocks scale with."""
        return sum(self.tokens) / max(len(self.tokens), 1)


@dataclass(frozen=True)
class ImagePlan:
    """Where every token of one image went in the last forward pass (``attach(..., record_plans=True)``).

    Attributes:
        image: The image's row in the batch.
        reduction: The composed plan of all steps, a batch of one: ``assignment`` ``(1, L)`` over the ``L``
            tokens entering the first block (patches and the class token, in sequence order), ``indices``
            ``(1, K)`` the original positions of the ``K`` tokens left after the last step.
    """

    image: int
    reduction: Reduction


@dataclass
class _ForwardState:
    """One forward pass's bookkeeping; lives in the forward call, so concurrent forwards do not mix."""

    batch: int
    sizes: torch.Tensor | None = None
    plan: Reduction | None = None
    tokens: list[int] = field(default_factory=list)


class TokenReduction:
    """The [`ReductionSlot`][tokred.mamba.models.vim.ReductionSlot] that [`attach`][tokred.mamba.attach]
    installs as ``model.token_reduction``: one reducer on one schedule.

    Args:
        reducer: Any tokred reducer without a budget of its own; the schedule sets the count of every step.
        schedule: ``{block index: tokens removed after that block}``, validated.
        score: For reducers that rank by a model-supplied score, the function that computes it from a block's
            [`ScanDelta`][tokred.mamba.layers.ScanDelta] (with the reducer's ``score_options()``).
        record_plans: Compose every step's plan and keep it per image.
        on_end: Called with the stats and the plans (or None) at the end of every forward.
    """  # noqa: D205

    def __init__(
        self,
        reducer: Reducer,
        schedule: Mapping[int, int],
        *,
        score: Callable[..., torch.Tensor] | None,
        record_plans: bool,
        on_end: Callable[[ForwardStats, list[ImagePlan] | None], None],
    ) -> None:
        self.reducer = reducer
        self.schedule = dict(schedule)
        self.record_plans = record_plans
        self._score = score
        self._score_options = reducer.score_options() if score is not None else {}
        self._on_end = on_end

    def begin(self, hidden: torch.Tensor, cls_pos: torch.Tensor) -> _ForwardState:
        """Start a forward pass on ``hidden`` ``(B, L, D)``."""
        return _ForwardState(batch=hidden.shape[0])

    def wants_delta(self, index: int) -> bool:
        """Whether block ``index`` must hand over its Δ: it is scheduled and the reducer ranks by Δ."""
        return self._score is not None and self.schedule.get(index, 0) > 0

    def step(
        self,
        state: _ForwardState,
        index: int,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        cls_pos: torch.Tensor,
        delta: ScanDelta | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reduce ``hidden`` and ``residual`` ``(B, L, D)`` after block ``index`` if it is scheduled.

        Returns:
            ``(hidden, residual, cls_pos)`` with ``L - r`` tokens; ``cls_pos`` ``(B,)`` is the class token's new
            position in each row.
        """
        batch, length = hidden.shape[:2]
        state.tokens.append(length)
        r = self.schedule.get(index, 0)
        if r == 0:
            return hidden, residual, cls_pos
        protected = torch.zeros((batch, length), dtype=torch.bool, device=hidden.device)
        protected[torch.arange(batch, device=hidden.device), cls_pos] = True
        scores = None
        if self._score is not None:
            if delta is None:
                raise AttachError(f"block {index} handed over no Δ, but {type(self.reducer).__name__} ranks by it")
            scores = self._score(delta, **self._score_options)
        plan = self.reducer(hidden, scores=scores, protected=protected, sizes=state.sizes, num_keep=length - r)
        state.sizes = plan.sizes
        if self.record_plans:
            state.plan = plan if state.plan is None else state.plan.compose(plan)
        return plan.tokens, plan.apply(residual), plan.assignment.gather(1, cls_pos.unsqueeze(1)).squeeze(1)

    def end(self, state: _ForwardState) -> None:
        """Report what the forward pass kept to the handle."""
        # Nothing is removed after the last block (there is nothing left to save), so its count is final.
        stats = ForwardStats(state.batch, tuple(state.tokens), state.tokens[-1] if state.tokens else 0)
        plans = None
        if self.record_plans:
            plan = state.plan
            plans = [] if plan is None else [ImagePlan(row, _plan_row(plan, row)) for row in range(state.batch)]
        self._on_end(stats, plans)


def _plan_row(plan: Reduction, row: int) -> Reduction:
    part = slice(row, row + 1)
    return Reduction(
        plan.tokens[part].detach(),
        plan.indices[part],
        plan.sizes[part],
        plan.assignment[part],
        plan.weights[part],
    )


class Attachment:
    """What [`attach`][tokred.mamba.attach] returns: the reducer, its schedule, what the last forward kept,
    and ``detach()``. Also a context manager; leaving the ``with`` block detaches.

    The same protocol as [`tokred.vlm.Attachment`][tokred.vlm.Attachment].

    Attributes:
        model: The model the reducer is attached to.
        reducer: The reducer every step runs.
        schedule: ``{block index: tokens removed after that block}``.
        convention: The FLOPs convention the schedule was solved in.
        record_plans: Whether each forward keeps its plans.
        last_stats: [`ForwardStats`][tokred.mamba.reduction.ForwardStats] of the most recent forward (under
            concurrent calls, of the one that finished last), or None before the first.
        last_plans: With ``record_plans``, one [`ImagePlan`][tokred.mamba.reduction.ImagePlan] per image of the
            most recent forward; otherwise None.
    """  # noqa: D205

    def __init__(
        self,
        model: nn.Module,
        reducer: Reducer,
        schedule: Mapping[int, int],
        *,
        convention: Convention,
        record_plans: bool,
    ) -> None:
        self.model = model
        self.reducer = reducer
        self.schedule = dict(schedule)
        self.convention = convention
        self.record_plans = record_plans
        self.last_stats: ForwardStats | None = None
        self.last_plans: list[ImagePlan] | None = None
        self._lock = threading.Lock()
        score = SUPPLIED_SCORES.get(reducer.needs_scores) if reducer.needs_scores is not None else None
        self._slot = TokenReduction(reducer, self.schedule, score=score, record_plans=record_plans, on_end=self._record)
        self._attached = False

    def _record(self, stats: ForwardStats, plans: list[ImagePlan] | None) -> None:
        with self._lock:  # stats and plans of one forward are published together
            self.last_stats = stats
            if self.record_plans:
                self.last_plans = plans

    def _install(self) -> None:
        self.model.token_reduction = self._slot
        self._attached = True

    @property
    def attached(self) -> bool:
        """Whether the reducer is still attached."""
        return self._attached

    def detach(self) -> None:
        """Restore the model exactly as it was before [`attach`][tokred.mamba.attach]; calling it twice is harmless."""
        if not self._attached:
            return
        if getattr(self.model, "token_reduction", None) is self._slot:
            self.model.token_reduction = None
        self._attached = False

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        name = getattr(self.model, "model_name", None) or type(self.model).__name__
        return f"Attachment({name}, {self.reducer!r}, schedule={self.schedule}, {state})"


def _resolve_reducer(reducer: Any, reducer_config: Mapping[str, Any]) -> Reducer:
    if isinstance(reducer, type):
        hint = f" ({reducer.__name__}())" if issubclass(reducer, Reducer) else ""
        name = getattr(reducer, "name", "") or ""
        by_name = f" or its registered name ({name!r})" if name else ""
        raise InvalidTypeError(f"attach needs a reducer instance{hint}{by_name}, not the class {reducer.__name__}")
    budget = sorted(k for k in _BUDGET_KEYS if reducer_config.get(k) is not None)
    if isinstance(reducer, str):
        if budget:
            raise IncompatibleReducerError(
                f"{budget[0]}= has no effect here: the schedule (r, schedule or flops_cut) sets how many tokens every "
                "step removes; leave it out"
            )
        return create_reducer(reducer, **reducer_config)
    if not isinstance(reducer, Reducer):
        raise InvalidTypeError(
            f"reducer must be a tokred Reducer (e.g. tokred.mamba.MTR()) or a registered name such as 'mtr'; got "
            f"{type(reducer).__name__}"
        )
    if reducer_config:
        raise InvalidTypeError(
            f"reducer options ({', '.join(sorted(reducer_config))}) go with a reducer given by name; "
            f"{type(reducer).__name__} is already built"
        )
    return reducer


def attach(
    model: nn.Module,
    reducer: Reducer | str,
    *,
    r: int | None = None,
    after: Iterable[int] | None = None,
    schedule: Mapping[int, int] | None = None,
    flops_cut: float | None = None,
    convention: Convention = "one_direction",
    record_plans: bool = False,
    **reducer_config: Any,
) -> Attachment:
    """Make a tokred-mamba model reduce tokens with ``reducer`` on a schedule; returns a handle to undo it.

    Give the schedule one way: ``r`` tokens after each block of ``after`` (default: every second block, see
    [`default_reduce_after`][tokred.mamba.schedule.default_reduce_after]), an explicit ``schedule``
    ``{block: r}``, or a ``flops_cut`` (0.2 / 0.3 / 0.4) for which ``r`` is solved. The schedule sets how many
    tokens every step removes, so the reducer is built without a budget (``MTR()``, or ``"mtr"``).

    Args:
        model: A model from [`create_model`][tokred.mamba.create_model].
        reducer: A reducer instance without a budget, or a registered name (``"mtr"``, ``"tome"``, …) built with
            ``reducer_config``.
        r: Tokens removed after each block of ``after``.
        after: Block indices for ``r`` or ``flops_cut``.
        schedule: ``{block index: tokens removed after it}``.
        flops_cut: Fraction of dense FLOPs to save; ``r`` is solved with
            [`solve_schedule`][tokred.mamba.schedule.solve_schedule].
        convention: FLOPs convention for ``flops_cut``.
        record_plans: Keep, after every forward, where each image's tokens went (``handle.last_plans``), for
            pictures and tests; costs a composition per step.
        **reducer_config: Hyper-parameters when ``reducer`` is a name (no budget).

    Returns:
        An [`Attachment`][tokred.mamba.Attachment]; ``handle.detach()`` (or leaving a ``with`` block)
        restores the model.

    Raises:
        InvalidTypeError: If ``reducer`` is a class rather than an instance, not a reducer at all, or comes with
            options although it is already built; or ``model`` is not a tokred-mamba model.
        IncompatibleReducerError: If the reducer carries a budget (the schedule would override it), or needs
            scores that a Vision Mamba model cannot supply (``topk``).
        InvalidInputError: If the schedule is given zero or several ways or is out of range.
        BudgetError: If the schedule or the FLOPs cut would leave fewer than two tokens.
        AttachError: If a reducer is already attached to the model.

    Examples:
        >>> import torch
        >>> from tokred.mamba import MTR, attach, create_model
        >>> model = create_model("vim_test").eval()
        >>> with attach(model, MTR(), flops_cut=0.3) as handle:
        ...     logits = model(torch.randn(2, 3, model.img_size, model.img_size))
        >>> logits.shape, handle.last_stats.kept < model.num_tokens
        (torch.Size([2, 10]), True)
    """
    if not hasattr(model, "layers") or not hasattr(model, "depth") or not hasattr(model, "token_reduction"):
        raise InvalidTypeError(
            f"attach expects a tokred-mamba model (tokred.mamba.create_model); got {type(model).__name__}"
        )
    if getattr(model, "token_reduction", None) is not None:
        raise AttachError("a token reducer is already attached to this model; call .detach() on its handle first")
    built = _resolve_reducer(reducer, reducer_config)
    if built.budget is not None:
        raise IncompatibleReducerError(
            f"{built!r} has a budget, but the schedule (r, schedule or flops_cut) sets how many tokens every step "
            f"removes; build it without one ({type(built).__name__}(...) with no num_keep / keep_ratio / num_remove)"
        )
    if built.needs_scores is not None and built.needs_scores not in SUPPLIED_SCORES:
        supplied = ", ".join(repr(name) for name in sorted(SUPPLIED_SCORES))
        raise IncompatibleReducerError(
            f"{type(built).__name__} ranks tokens by {built.needs_scores!r} scores, which a Vision Mamba model cannot "
            f"supply (it supplies {supplied}); use a reducer that needs no scores, or MTR for Δ"
        )
    ways = sum(x is not None for x in (r, schedule, flops_cut))
    if ways != 1:
        raise InvalidInputError("give the schedule exactly one way: r (with optional after), schedule, or flops_cut")
    if after is not None and schedule is not None:
        raise InvalidInputError("after goes with r or flops_cut, not with an explicit schedule")
    if r is not None:
        blocks = default_reduce_after(model.depth) if after is None else list(after)
        plan = check_schedule(model, dict.fromkeys(blocks, r))
    elif schedule is not None:
        plan = check_schedule(model, schedule)
    else:
        plan = solve_schedule(model, flops_cut, after=after, convention=convention)
    handle = Attachment(model, built, plan, convention=convention, record_plans=record_plans)
    handle._install()
    return handle
