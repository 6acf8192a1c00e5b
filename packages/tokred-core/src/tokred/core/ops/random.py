"""Seeded random draws that give the same values on every device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["make_generator", "uniform_noise"]


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed``, or None (PyTorch's global generator) when ``seed`` is None.

    Reducers with a ``seed`` keep one such generator, so successive calls draw different values and the whole
    sequence is reproducible.
    """
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def uniform_noise(
    shape: Sequence[int], *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Uniform fp32 noise in ``[0, 1)``, drawn on the CPU and then moved to ``device``.

    Drawing on the CPU makes a seeded ``generator`` give the same values whatever device the tokens live on,
    and leaves the device's own generator untouched.

    Args:
        shape: Shape of the result, for example ``(B, N)``.
        generator: A CPU generator (see [`make_generator`][tokred.core.ops.make_generator]), or None for
            PyTorch's global generator.
        device: Device of the result; the CPU when None.

    Returns:
        fp32 tensor of ``shape``.

    Examples:
        >>> from tokred.core.ops import make_generator, uniform_noise
        >>> a = uniform_noise((2, 3), generator=make_generator(0))
        >>> b = uniform_noise((2, 3), generator=make_generator(0))
        >>> bool((a == b).all())
        True
    """
    return torch.rand(tuple(shape), generator=generator).to(device)
