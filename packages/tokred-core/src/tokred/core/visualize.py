"""Drawing a `Reduction` over the image it came from: which patches were kept, merged or dropped.

Dependency-free (PyTorch and the standard library): pictures are uint8 tensors ``(H, W, 3)`` that a notebook
shows with ``PIL.Image.fromarray(picture.numpy())`` or ``matplotlib.pyplot.imshow(picture)``, and
:func:`save_png` writes them without Pillow.

How a patch is drawn:

* **kept** — the slot's own patch, in its original colours with a white frame; a kept patch that absorbed
  others gets a frame in its cluster's colour instead;
* **merged** — a patch folded into a slot at another position, tinted with that slot's cluster colour, so
  every cluster reads as one colour;
* **dropped** — a patch that contributes to no slot, shown dark and grey.

Example:
    >>> import torch
    >>> from tokred.core import create_reducer
    >>> from tokred.core.visualize import draw_reduction
    >>> image = torch.rand(3, 32, 32)                         # (3, H, W) in [0, 1]
    >>> patches = torch.randn(1, 16, 8)                       # a 4 x 4 grid of patch tokens
    >>> reduction = create_reducer("tome", num_keep=6)(patches)
    >>> picture = draw_reduction(image, reduction, grid=(4, 4), scale=2)
    >>> picture.shape, picture.dtype
    (torch.Size([64, 64, 3]), torch.uint8)
"""

from __future__ import annotations

import colorsys
import ctypes
import struct
import zlib
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch

from tokred.core.reduction import Reduction

__all__ = ["cluster_colors", "draw_reduction", "patch_states", "save_png", "tile_images"]

KEPT, MERGED, DROPPED = 0, 1, 2


def cluster_colors(count: int) -> torch.Tensor:
    """``count`` well-separated saturated colours, fp32 ``(count, 3)`` in ``[0, 1]`` (golden-ratio hues)."""
    hues = [(0.1 + i * 0.618034) % 1.0 for i in range(count)]
    return torch.tensor([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues], dtype=torch.float32).reshape(count, 3)


def _check_patch_tokens(patch_tokens: Sequence[int] | torch.Tensor | None, tokens: int) -> torch.Tensor:
    if patch_tokens is None:
        return torch.arange(tokens)
    index = torch.as_tensor(patch_tokens, dtype=torch.long).flatten()
    if index.numel() and (index.min() < 0 or index.max() >= tokens):
        raise ValueError(f"patch_tokens must index the reduction's {tokens} tokens; got values outside 0..{tokens - 1}")
    return index


def patch_states(
    reduction: Reduction, *, row: int = 0, patch_tokens: Sequence[int] | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What happened to each patch of one row: its state and the slot it ended in.

    Args:
        reduction: A reduction whose ``N`` axis covers the patches (and possibly other tokens).
        row: Batch row to read.
        patch_tokens: Index on the ``N`` axis of each patch, in patch order; all ``N`` tokens by default.

    Returns:
        ``(state, slot)``, both long ``(P,)``: ``state`` is 0 kept, 1 merged, 2 dropped; ``slot`` is the output
        slot each patch ended in (``-1`` when dropped).
    """
    if not 0 <= row < reduction.assignment.shape[0]:
        raise ValueError(f"row {row} is out of range for a batch of {reduction.assignment.shape[0]}")
    assignment = reduction.assignment[row].cpu()
    index = _check_patch_tokens(patch_tokens, assignment.numel())
    kept = reduction.keep_mask[row].cpu()[index]
    slot = assignment[index]
    state = torch.where(kept, KEPT, torch.where(slot >= 0, MERGED, DROPPED))
    return state, slot


def draw_reduction(
    image: torch.Tensor,
    reduction: Reduction,
    grid: tuple[int, int],
    *,
    row: int = 0,
    patch_tokens: Sequence[int] | torch.Tensor | None = None,
    scale: int = 4,
) -> torch.Tensor:
    """Draw which patches of ``image`` a reduction kept, merged (and into what) or dropped.

    Args:
        image: The input image, fp ``(3, H, W)`` in ``[0, 1]`` (as the model saw it before normalisation).
        reduction: The reduction of this image's tokens, for example ``handle.last_plan`` of a tokred-mamba
            model or a per-image plan of a tokred-vlm attachment.
        grid: ``(h, w)`` patches per column and row; ``H`` and ``W`` must be multiples of them.
        row: Batch row of ``reduction`` that belongs to ``image``.
        patch_tokens: Index on the reduction's ``N`` axis of each patch, row-major (for a Vim with a middle class
            token at position ``c``: ``p`` for ``p < c``, ``p + 1`` after); all ``N`` tokens by default.
        scale: Integer upscaling of the picture (nearest neighbour), so small images stay legible.

    Returns:
        uint8 tensor ``(H * scale, W * scale, 3)``.

    Raises:
        ValueError: If the image is not ``(3, H, W)``, the grid does not divide it, or the patches and the
            reduction's tokens do not correspond.
    """
    if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a floating (3, H, W) tensor in [0, 1]; got {tuple(image.shape)} {image.dtype}")
    if scale < 1:
        raise ValueError(f"scale must be a positive integer; got {scale}")
    gh, gw = grid
    height, width = image.shape[1:]
    if gh < 1 or gw < 1 or height % gh or width % gw:
        raise ValueError(f"grid {grid} does not divide the {height}x{width} image into equal patches")
    state, slot = patch_states(reduction, row=row, patch_tokens=patch_tokens)
    if state.numel() != gh * gw:
        raise ValueError(
            f"the grid has {gh * gw} patches but {state.numel()} tokens were given; pass patch_tokens to say which "
            "token each patch is (for example, skipping a class token)"
        )

    # Clusters: slots that absorbed at least one other patch get a colour of their own.
    merged_slots = torch.unique(slot[state == MERGED])
    colors = torch.zeros(max(reduction.num_kept, 1), 3)
    colors[merged_slots] = cluster_colors(merged_slots.numel())
    has_cluster = torch.zeros(max(reduction.num_kept, 1), dtype=torch.bool)
    has_cluster[merged_slots] = True

    ph, pw = height // gh, width // gw
    pixels = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0)  # (H, W, 3)
    patches = pixels.reshape(gh, ph, gw, pw, 3).permute(0, 2, 1, 3, 4).reshape(gh * gw, ph, pw, 3).clone()
    grey = (patches @ torch.tensor([0.299, 0.587, 0.114])).unsqueeze(-1)
    safe_slot = slot.clamp_min(0)
    tint = colors[safe_slot][:, None, None, :]
    patches = torch.where((state == DROPPED)[:, None, None, None], 0.08 + 0.25 * grey.expand_as(patches), patches)
    patches = torch.where((state == MERGED)[:, None, None, None], 0.5 * patches + 0.5 * tint, patches)

    patches = patches.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # (P, ph*s, pw*s, 3)
    frame = torch.zeros(patches.shape[1:3], dtype=torch.bool)
    thick = max(1, scale // 2)
    frame[:thick, :] = frame[-thick:, :] = frame[:, :thick] = frame[:, -thick:] = True
    frame_color = torch.where(has_cluster[safe_slot][:, None], colors[safe_slot], torch.ones(3))  # (P, 3)
    kept = (state == KEPT)[:, None, None] & frame
    patches = torch.where(kept[..., None], frame_color[:, None, None, :], patches)

    picture = patches.reshape(gh, gw, ph * scale, pw * scale, 3).permute(0, 2, 1, 3, 4)
    picture = picture.reshape(height * scale, width * scale, 3)
    return (picture * 255).round().clamp(0, 255).to(torch.uint8)


def tile_images(
    images: Sequence[torch.Tensor], columns: int, *, padding: int = 4, background: int = 255
) -> torch.Tensor:
    """Lay uint8 pictures ``(H_i, W_i, 3)`` out on a grid, row by row, each in a cell of the largest size.

    Args:
        images: The pictures.
        columns: Pictures per row.
        padding: Pixels between cells and around the grid.
        background: Grey level of the padding.

    Returns:
        uint8 tensor ``(H, W, 3)``.
    """
    if not images:
        raise ValueError("tile_images needs at least one picture")
    if columns < 1:
        raise ValueError(f"columns must be >= 1; got {columns}")
    for picture in images:
        if picture.dim() != 3 or picture.shape[-1] != 3 or picture.dtype != torch.uint8:
            raise ValueError(f"pictures must be uint8 (H, W, 3); got {tuple(picture.shape)} {picture.dtype}")
    cell_h = max(p.shape[0] for p in images)
    cell_w = max(p.shape[1] for p in images)
    rows = -(-len(images) // columns)
    out = torch.full(
        (padding + rows * (cell_h + padding), padding + columns * (cell_w + padding), 3), background, dtype=torch.uint8
    )
    for i, picture in enumerate(images):
        r, c = divmod(i, columns)
        top, left = padding + r * (cell_h + padding), padding + c * (cell_w + padding)
        out[top : top + picture.shape[0], left : left + picture.shape[1]] = picture.cpu()
    return out


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    # One memory copy of a contiguous CPU uint8 tensor; bytes(storage) would iterate element by element and
    # numpy is not a dependency of tokred-core.
    tensor = tensor.contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.numel())


def save_png(picture: torch.Tensor, path: str | PathLike[str]) -> Path:
    """Write a uint8 ``(H, W, 3)`` picture as an 8-bit RGB PNG (no Pillow needed); returns the path."""
    if picture.dim() != 3 or picture.shape[-1] != 3 or picture.dtype != torch.uint8:
        raise ValueError(f"save_png needs a uint8 (H, W, 3) tensor; got {tuple(picture.shape)} {picture.dtype}")
    height, width = picture.shape[:2]
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), picture.cpu().reshape(height, width * 3)], dim=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    data += chunk(b"IDAT", zlib.compress(_raw_bytes(raw), 6)) + chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
