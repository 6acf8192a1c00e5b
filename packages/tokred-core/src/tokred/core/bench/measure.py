"""Measuring a forward pass: wall time, peak memory, and which reducers a model can run."""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tokred.core.registry import available_reducers, get_reducer_class

__all__ = ["applicable_reducers", "peak_memory", "time_call"]

T = TypeVar("T")


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls (CUDA is synchronised).

    Args:
        fn: The call to time, with no arguments.
        repeats: Timed calls, ``>= 1``.
        warmup: Untimed calls first (allocator and kernel caches).

    Returns:
        The median of the timed calls.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
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
    return statistics.median(times)


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


def applicable_reducers(*, scores_from_model: bool = False, exclude: tuple[str, ...] = ()) -> list[str]:
    """Registered reducers a model can run, sorted by name.

    A reducer that ``requires_scores`` applies only where the model supplies scores itself (tokred-mamba models
    hand MTR its Δ through ``scores_from_block``); every other reducer needs only the tokens. ``topk``, which
    ranks whatever score it is given, is therefore left out of both.

    Args:
        scores_from_model: Whether the model supplies scores to reducers that define ``scores_from_block``.
        exclude: Names to leave out, for criteria made for another kind of model.

    Returns:
        Reducer names.
    """
    names = []
    for name in available_reducers():
        if name in exclude:
            continue
        cls = get_reducer_class(name)
        if cls.requires_scores and not (scores_from_model and hasattr(cls, "scores_from_block")):
            continue
        names.append(name)
    return names
