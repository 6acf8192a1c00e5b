"""Data-parallel evaluation with ``torch.distributed``: one process per CPU share or GPU, launched by torchrun.

``tokred mamba eval`` uses these helpers when it runs under ``torchrun``:

```bash
torchrun --standalone --nproc_per_node 2 --no-python tokred mamba eval --model vim_scenes --data scenes/ --out out/
```

Each process reads what torchrun tells it from the environment
([`from_environment`][tokred.mamba.distributed.from_environment]), joins the process group
([`process_group`][tokred.mamba.distributed.process_group]: NCCL on CUDA, one GPU per process; Gloo on the CPU),
evaluates its share of the examples ([`shard`][tokred.mamba.distributed.shard]: every ``world_size``-th one,
starting at its rank) and sends its per-example results to rank 0
([`gather_to_main`][tokred.mamba.distributed.gather_to_main]), which puts them back in the original order
([`unshard`][tokred.mamba.distributed.unshard]) and computes the metrics over all of them. Every example is
evaluated exactly once: nothing is padded or duplicated, so the metrics are those of a single process. A
process whose share is empty (more processes than examples) still takes part in the gather, with no results.

Everything here imports without CUDA and without a process group; with one process
([`SINGLE_PROCESS`][tokred.mamba.distributed.SINGLE_PROCESS]) no group is created and the helpers do the
trivial thing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from tokred.core.errors import InvalidInputError

__all__ = [
    "SINGLE_PROCESS",
    "ProcessInfo",
    "first_failure",
    "from_environment",
    "gather_to_main",
    "local_device",
    "process_group",
    "shard",
    "unshard",
]

T = TypeVar("T")


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in a data-parallel launch.

    Attributes:
        rank: Global index of this process, ``0 <= rank < world_size``.
        local_rank: Index of this process on its machine (the GPU it takes), ``>= 0``.
        world_size: Number of processes in all, ``>= 1``.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise InvalidInputError(
                f"invalid process placement: rank {self.rank}, local rank {self.local_rank}, world size "
                f"{self.world_size} (expected 0 <= rank < world size and local rank >= 0)"
            )

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process (and so a process group)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that prints, draws the progress bar and writes the outputs."""
        return self.rank == 0


SINGLE_PROCESS = ProcessInfo()
"""A run in one process: rank 0 of 1."""


def _int(environ: Mapping[str, str], name: str, default: int | None) -> int:
    text = environ.get(name)
    if text is None or not text.strip():
        if default is None:
            raise InvalidInputError(f"the environment variable {name} is not set, yet WORLD_SIZE asks for several")
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(f"the environment variable {name}={text!r} is not an integer") from None


def from_environment(environ: Mapping[str, str] | None = None) -> ProcessInfo:
    """Read this process's place from the variables torchrun sets: ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``.

    Without ``WORLD_SIZE``, or with ``WORLD_SIZE=1``, the run is a single process, whatever the others say.

    Args:
        environ: The environment to read; ``os.environ`` by default.

    Returns:
        The rank, local rank and world size. ``LOCAL_RANK`` defaults to ``RANK`` when it is missing.

    Raises:
        InvalidInputError: If a variable is not an integer, ``RANK`` is missing while ``WORLD_SIZE > 1``, or the
            values are out of range.
    """
    environ = os.environ if environ is None else environ
    world_size = _int(environ, "WORLD_SIZE", 1)
    if world_size < 1:
        raise InvalidInputError(f"the environment variable WORLD_SIZE={world_size} must be at least 1")
    if world_size == 1:
        return SINGLE_PROCESS
    rank = _int(environ, "RANK", None)
    local_rank = _int(environ, "LOCAL_RANK", rank)
    return ProcessInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def shard(total: int, rank: int, world_size: int) -> range:
    """The indices of ``0 .. total - 1`` that process ``rank`` of ``world_size`` evaluates.

    Process ``r`` takes ``r, r + W, r + 2W, …``: every index belongs to exactly one process and the shares differ
    in size by at most one. A process with ``rank >= total`` gets an empty range.

    Args:
        total: Number of examples, ``>= 0``.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of processes, ``>= 1``.

    Returns:
        ``range(rank, total, world_size)``.

    Raises:
        InvalidInputError: On a negative total or a rank outside ``0 .. world_size - 1``.
    """
    if total < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise InvalidInputError(f"cannot shard {total} examples for rank {rank} of {world_size} processes")
    return range(rank, total, world_size)


def unshard(parts: Sequence[Sequence[T]], total: int) -> list[T]:
    """Put the per-process results of [`shard`][tokred.mamba.distributed.shard] back in the original order.

    Args:
        parts: ``parts[r]`` holds process ``r``'s results, one per index of ``shard(total, r, len(parts))``, in
            that order.
        total: Number of examples that were sharded.

    Returns:
        The ``total`` results, result ``i`` first came from ``parts[i % W][i // W]``.

    Raises:
        InvalidInputError: If a part does not hold one result per index of its shard.
    """
    world_size = len(parts)
    for rank, part in enumerate(parts):
        expected = len(shard(total, rank, world_size))
        if len(part) != expected:
            raise InvalidInputError(f"process {rank} sent {len(part)} results for its {expected} examples")
    return [parts[i % world_size][i // world_size] for i in range(total)]


def local_device(device: Any, info: ProcessInfo) -> Any:
    """The device this process runs on: with many processes, ``cuda`` means the GPU of its local rank.

    Args:
        device: The requested ``torch.device`` (or its name). On CUDA, a given index is replaced by
            ``info.local_rank`` when there are many processes, so each process takes its own GPU.
        info: This process's place.

    Returns:
        A ``torch.device``: ``cuda:<local rank>`` for CUDA with many processes, ``device`` otherwise.

    Raises:
        InvalidInputError: If the local rank names no GPU of this machine.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not info.distributed:
        return device
    count = torch.cuda.device_count()
    if info.local_rank >= count:
        raise InvalidInputError(
            f"local rank {info.local_rank} has no GPU of its own: this machine has {count} CUDA devices; start at "
            "most that many processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", info.local_rank)


@contextmanager
def process_group(info: ProcessInfo, device: Any) -> Iterator[None]:
    """Join the default process group for the block, and leave it afterwards, also on an error.

    The backend is ``"nccl"`` when ``device`` is a CUDA device (made this process's current device first) and
    ``"gloo"`` otherwise; the rendezvous is torchrun's (``MASTER_ADDR``, ``MASTER_PORT`` in the environment).
    With a single process nothing is created.

    Args:
        info: This process's place.
        device: The ``torch.device`` this process runs on (from
            [`local_device`][tokred.mamba.distributed.local_device]).

    Raises:
        InvalidInputError: If the group cannot be formed (no rendezvous address, an unreachable one).
    """
    if not info.distributed:
        yield
        return
    import torch
    import torch.distributed as dist

    device = torch.device(device)
    options: dict[str, Any] = {"backend": "gloo"}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = {"backend": "nccl", "device_id": device}
    try:
        dist.init_process_group(rank=info.rank, world_size=info.world_size, **options)
    except (ValueError, RuntimeError) as error:  # DistNetworkError and DistStoreError are RuntimeErrors
        raise InvalidInputError(
            f"process {info.rank} of {info.world_size} could not join the process group ({options['backend']}): "
            f"{error} (start the command with torchrun)"
        ) from error
    try:
        yield
    finally:
        dist.destroy_process_group()


def gather_to_main(items: list[T], info: ProcessInfo) -> list[list[T]] | None:
    """Send every process's ``items`` (picklable objects) to rank 0.

    A collective: every process of the group must call it, an empty list being fine.

    Args:
        items: This process's results.
        info: This process's place.

    Returns:
        On rank 0, ``parts`` with ``parts[r]`` the items of rank ``r``; ``None`` on the other ranks. With a single
        process, ``[items]``.
    """
    if not info.distributed:
        return [items]
    import torch.distributed as dist

    parts: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(items, parts, dst=0)
    return parts


def first_failure(error: BaseException | None, info: ProcessInfo) -> tuple[int, str] | None:
    """Tell every process whether any of them failed, so that one of them, not all, reports it.

    A collective: every process calls it with the error it met (or ``None``).

    Args:
        error: The error this process met, or ``None``.
        info: This process's place.

    Returns:
        ``(rank, message)`` of the lowest rank that failed (its error's one-line text), or ``None`` when none did.
    """
    message = None if error is None else " ".join(str(error).split()) or type(error).__name__
    if not info.distributed:
        return None if message is None else (0, message)
    import torch.distributed as dist

    messages: list[Any] = [None] * info.world_size
    dist.all_gather_object(messages, message)
    return next(((rank, text) for rank, text in enumerate(messages) if text is not None), None)
