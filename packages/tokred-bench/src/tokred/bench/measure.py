"""Measuring a forward pass: wall time, peak memory, and which reducers a model can run."""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tokred.core.errors import InvalidInputError
from tokred.core.registry import available_reducers, get_reducer_class

__all__ = ["MAX_SPREAD", "Timing", "applicable_reducers", "peak_memory", "time_call", "timing_warnings"]

T = TypeVar("T")

MAX_SPREAD = 0.2
"""The largest time spread, as a fraction of the median, that [`timing_warnings`][tokred.bench.measure.timing_warnings]
lets pass."""
_OUTLIER = 3.0


@dataclass(frozen=True)
class Timing:
    """Wall time of repeated calls.

    Attributes:
        median: Median seconds per call.
        spread: Half the range between the slowest and the fastest call, in seconds: the median is
            ``median ± spread`` over the repeats.
        repeats: Timed calls.
    """

    median: float
    spread: float
    repeats: int


def time_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (CUDA is synchronised).

    Args:
        fn: The call to time, with no arguments.
        repeats: Timed calls, ``>= 1``.
        warmup: Untimed calls first (allocator and kernel caches).

    Returns:
        The median and the spread of the timed calls.

    Examples:
        >>> from tokred.bench.measure import time_call
        >>> timing = time_call(lambda: sum(range(1000)), repeats=3)
        >>> timing.repeats, timing.median >= 0
        (3, True)
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidInputError(f"repeats must be an int >= 1; got {repeats!r}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), (max(times) - min(times)) / 2, repeats)


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of storages created by operators while active, and the peak of those alive at once.

    Storages are counted when an operator returns a tensor that does not alias an input (views and in-place
    results are not new memory) and released when the last tensor seen on them is collected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage key -> [bytes, tensors alive]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._refs[key]

    def _track(self, tensor: torch.Tensor, new: bool) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:  # empty or meta
            return
        entry = self._refs.get(key)
        if entry is None:
            if not new:
                return  # a view of memory that existed before the measurement
            entry = self._refs[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        flat, _ = tree_flatten(out)
        for i, value in enumerate(flat):
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                aliases = i < len(returns) and returns[i].alias_info is not None
                self._track(value, new=not aliases)
        return out


def peak_memory(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn()`` and measure the peak memory it allocates, in bytes.

    On CUDA this is ``torch.cuda.max_memory_allocated`` above the memory allocated before the call. On the CPU,
    where PyTorch keeps no allocator statistics, it is the peak total size of the tensors created by operators
    during the call that were alive at the same time (weights and inputs excluded), counted by a dispatch mode;
    that is what the call adds to the process, independent of the allocator's caching. Measure once, apart
    from timing: the dispatch mode slows every operator down.

    Args:
        fn: The call to measure, with no arguments.

    Returns:
        ``(fn's result, peak bytes)``.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        cuda_peak = torch.cuda.max_memory_allocated() - before
    else:
        cuda_peak = 0
    if cuda_peak:
        return result, cuda_peak
    with _LiveTensorBytes() as tracker:
        result = fn()
    return result, tracker.peak


def applicable_reducers(*, supplied_scores: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[str]:
    """Registered reducers a model can run, sorted by name.

    A reducer that ranks tokens by model-supplied scores (its ``needs_scores``) runs only where the model
    supplies that score: tokred-mamba models supply ``"delta"`` (MTR), VLMs none. ``topk``, which ranks
    whatever its caller computes, runs in neither.

    Args:
        supplied_scores: The ``needs_scores`` names the model supplies.
        exclude: Names to leave out, for criteria made for another kind of model.

    Returns:
        Reducer names.
    """
    supplied, excluded = set(supplied_scores), set(exclude)
    names = []
    for name in available_reducers():
        if name in excluded:
            continue
        needs = get_reducer_class(name).needs_scores
        if needs is not None and needs not in supplied:
            continue
        names.append(name)
    return names


def timing_warnings(results: Iterable[Any]) -> list[str]:
    """Warnings about bench timings a busy machine may have spoiled, one line each.

    A row is flagged when its spread exceeds [`MAX_SPREAD`][tokred.bench.measure.MAX_SPREAD] of its median, or
    when its median is more than three times, or less than a third of, the median of the reduced rows at the same
    budget (an outlier: a method's own cost would not be that far from the others', background load would).

    Args:
        results: Rows with ``method``, ``budget``, ``time_ms`` and ``time_spread``
            ([`BenchResult`][tokred.bench.suite.BenchResult]).

    Returns:
        The warnings; empty when every timing looks sound.
    """
    rows = list(results)
    warnings = []
    for row in rows:
        if row.time_ms > 0 and row.time_spread > MAX_SPREAD * row.time_ms:
            warnings.append(
                f"{row.method} at {row.budget}: time {row.time_ms:.3g} ms ± {row.time_spread:.2g} ms, a spread of "
                f"{row.time_spread / row.time_ms:.0%} (above {MAX_SPREAD:.0%}): the machine was busy; rerun on an "
                "idle machine or with fewer --threads"
            )
    by_budget: dict[str, list[Any]] = {}
    for row in rows:
        if row.method != "dense":
            by_budget.setdefault(row.budget, []).append(row)
    for budget, group in by_budget.items():
        if len(group) < 3:
            continue
        typical = statistics.median(r.time_ms for r in group)
        for row in group:
            if typical > 0 and not 1 / _OUTLIER <= row.time_ms / typical <= _OUTLIER:
                warnings.append(
                    f"{row.method} at {budget}: time {row.time_ms:.3g} ms against a median of {typical:.3g} ms for "
                    "the methods at this budget, an outlier; rerun it alone to tell its cost from background load"
                )
    return warnings
