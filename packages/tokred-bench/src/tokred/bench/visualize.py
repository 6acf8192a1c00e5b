"""Drawing a [`Reduction`][tokred.core.Reduction] over its image: which patches were kept, merged or dropped.

Pictures are Pillow images: show them in a notebook as they are, save them with ``picture.save("plan.png")``.
The drawing never changes the colour of a patch the model still sees, so a picture answers a colour question the
same way the image does:

* **kept** — the slot's own patch, in its original pixels, with a thin white frame;
* **kept, absorbing others** — a slot that other patches were merged into: original pixels, a thick frame in the
  cluster's colour;
* **merged** — a patch folded into a slot at another position: original pixels, corner marks in the colour of
  that slot's frame;
* **dropped** — a patch that contributes to no slot: grey and dark, since the model never sees it.

Frames and marks are drawn inside each patch, so neighbouring patches stay apart. A title above, caption lines
below and a legend of the four kinds can be added around the drawing.

Examples:
    >>> import torch
    >>> from tokred.core import create_reducer
    >>> from tokred.bench.visualize import draw_reduction
    >>> image = torch.rand(3, 32, 32)                         # (3, H, W) in [0, 1]
    >>> patches = torch.randn(1, 16, 8)                       # a 4 x 4 grid of patch tokens
    >>> reduction = create_reducer("tome", num_keep=6)(patches)
    >>> picture = draw_reduction(image, reduction, grid=(4, 4), scale=2, legend=False)
    >>> picture.size, picture.mode                            # (width, height)
    ((64, 64), 'RGB')
    >>> draw_reduction(image, reduction, grid=(4, 4), scale=2, title="tome").size[1] > 64
    True
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from tokred.core.errors import InvalidInputError, InvalidTypeError
from tokred.core.reduction import Reduction

__all__ = [
    "DROPPED",
    "KEPT",
    "MERGED",
    "cluster_colors",
    "draw_legend",
    "draw_reduction",
    "image_to_pil",
    "patch_states",
    "tile_pictures",
]

KEPT, MERGED, DROPPED = 0, 1, 2
"""Patch states returned by [`patch_states`][tokred.bench.visualize.patch_states]."""

RGB = tuple[int, int, int]

# Well-separated saturated colours (after Sasha Trubetskoy's list of distinct colours), without the greys, whites
# and pale tints that would read as "kept alone" or "dropped". Beyond them, golden-ratio hues.
_DISTINCT: tuple[RGB, ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
)

_WHITE: RGB = (255, 255, 255)
_INK: RGB = (20, 20, 20)
_OUTLINE: RGB = (90, 90, 90)
_SWATCH_FILL: RGB = (150, 150, 150)


def cluster_colors(count: int) -> list[RGB]:
    """``count`` well-separated saturated colours, one per cluster.

    The first twelve come from a fixed list of distinct colours; further ones are golden-ratio hues.

    Args:
        count: How many colours.

    Returns:
        ``count`` RGB triples with components in ``0..255``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InvalidInputError(f"count must be a non-negative integer; got {count!r}")
    colors = list(_DISTINCT[:count])
    for i in range(count - len(colors)):
        hue = (0.05 + i * 0.618034) % 1.0
        colors.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, 0.95)))  # type: ignore[misc]
    return colors


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """Turn an fp image tensor into an 8-bit RGB Pillow image.

    Values are clamped to ``[0, 1]`` and rounded to the nearest of the 256 levels (``(x * 255).round()``); NaN
    becomes 0.

    Args:
        image: Floating tensor ``(3, H, W)`` in ``[0, 1]``, on any device.

    Returns:
        An ``"RGB"`` image of size ``(W, H)``.

    Raises:
        InvalidTypeError: If ``image`` is not a floating tensor.
        InvalidInputError: If it is not ``(3, H, W)`` with ``H, W >= 1``.
    """
    if not isinstance(image, torch.Tensor):
        raise InvalidTypeError(f"image must be a torch.Tensor of shape (3, H, W); got {type(image).__name__}")
    if not image.is_floating_point():
        raise InvalidTypeError(f"image must be a floating (3, H, W) tensor in [0, 1]; got dtype {image.dtype}")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise InvalidInputError(f"image must be a floating (3, H, W) tensor in [0, 1]; got shape {tuple(image.shape)}")
    levels = (torch.nan_to_num(image.detach().float().cpu(), nan=0.0).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(levels.permute(1, 2, 0).contiguous().numpy())


def _check_patch_tokens(patch_tokens: Sequence[int] | torch.Tensor | None, tokens: int) -> torch.Tensor:
    if patch_tokens is None:
        return torch.arange(tokens)
    index = torch.as_tensor(patch_tokens, dtype=torch.long).flatten()
    if index.numel() and (index.min() < 0 or index.max() >= tokens):
        raise InvalidInputError(
            f"patch_tokens must index the reduction's {tokens} tokens; got values outside 0..{tokens - 1}"
        )
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
        ``(state, slot)``, both long ``(P,)``: ``state`` is ``KEPT`` (0), ``MERGED`` (1) or ``DROPPED`` (2);
        ``slot`` is the output slot each patch ended in (``-1`` when dropped).

    Raises:
        InvalidInputError: If ``row`` is out of range or ``patch_tokens`` points outside the ``N`` tokens.
    """
    batch = reduction.assignment.shape[0]
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < batch:
        raise InvalidInputError(f"row {row} is out of range for a batch of {batch}")
    assignment = reduction.assignment[row].cpu()
    index = _check_patch_tokens(patch_tokens, assignment.numel())
    kept = reduction.keep_mask[row].cpu()[index]
    slot = assignment[index]
    state = torch.where(kept, KEPT, torch.where(slot >= 0, MERGED, DROPPED))
    return state, slot


# ---------------------------------------------------------------------------------------------------------------
# Patches


@dataclass(frozen=True)
class _Strokes:
    """Pixel widths of the marks in a patch cell of a given size."""

    thin: int  # white frame of a patch kept alone
    thick: int  # coloured frame of a slot that absorbed others
    corner: int  # width of the corner marks of a merged patch
    arm: int  # length of each corner mark
    inset: int  # gap between a corner mark and the patch's edge, so neighbouring marks stay apart

    @classmethod
    def for_cell(cls, size: int) -> _Strokes:
        # Never cover the whole patch: at least one pixel in the middle stays the image's own.
        limit = max((size - 1) // 2, 0)

        def fit(width: float) -> int:
            return min(max(1, round(width)), limit)

        inset = min(round(size * 0.06), max((size - 3) // 2, 0))
        return cls(
            thin=fit(size * 0.05), thick=fit(size * 0.12), corner=fit(size * 0.07), arm=fit(size * 0.22), inset=inset
        )


def _dim(patch: Image.Image) -> Image.Image:
    """The grey, dark version of a dropped patch (luminance only)."""
    return patch.convert("L").point(lambda v: 16 + (v * 3) // 10).convert("RGB")


def _frame(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], width: int, color: RGB) -> None:
    if width > 0:
        left, top, right, bottom = box
        draw.rectangle((left, top, right - 1, bottom - 1), outline=color, width=width)


def _corners(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], strokes: _Strokes, color: RGB) -> None:
    if strokes.corner <= 0:
        return
    i = strokes.inset
    left, top, right, bottom = box[0] + i, box[1] + i, box[2] - i, box[3] - i
    w, a = strokes.corner, max(strokes.arm, strokes.corner)
    for x, dx in ((left, 1), (right - 1, -1)):
        for y, dy in ((top, 1), (bottom - 1, -1)):
            # One horizontal and one vertical arm from each corner, inward.
            draw.rectangle(_span(x, x + dx * (a - 1), y, y + dy * (w - 1)), fill=color)
            draw.rectangle(_span(x, x + dx * (w - 1), y, y + dy * (a - 1)), fill=color)


def _span(x0: int, x1: int, y0: int, y1: int) -> tuple[int, int, int, int]:
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _mark(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], kind: str, color: RGB, strokes: _Strokes) -> None:
    """Draw the marks of one patch: ``kind`` is "kept", "slot", "merged" or "dropped" (no mark)."""
    if kind == "kept":
        _frame(draw, box, strokes.thin, _WHITE)
    elif kind == "slot":
        _frame(draw, box, strokes.thick, color)
    elif kind == "merged":
        _corners(draw, box, strokes, color)


def _check_scale(scale: int) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise InvalidTypeError(f"scale must be a positive integer; got {scale!r}")
    if scale < 1:
        raise InvalidInputError(f"scale must be a positive integer; got {scale}")


def _base_picture(image: torch.Tensor | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return image_to_pil(image)


def _draw_patches(
    image: torch.Tensor | Image.Image,
    reduction: Reduction,
    grid: tuple[int, int],
    row: int,
    patch_tokens: Sequence[int] | torch.Tensor | None,
    scale: int,
) -> Image.Image:
    _check_scale(scale)
    base = _base_picture(image)
    width, height = base.size
    try:
        gh, gw = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise InvalidInputError(f"grid must be a pair (h, w) of patch counts; got {grid!r}") from None
    if gh < 1 or gw < 1 or height % gh or width % gw:
        raise InvalidInputError(f"grid {tuple(grid)} does not divide the {height}x{width} image into equal patches")
    state, slot = patch_states(reduction, row=row, patch_tokens=patch_tokens)
    if state.numel() != gh * gw:
        raise InvalidInputError(
            f"the grid has {gh * gw} patches but {state.numel()} tokens were given; pass patch_tokens to say which "
            "token each patch is (for example, skipping a class token)"
        )

    ph, pw = height // gh, width // gw
    states, slots = state.tolist(), slot.tolist()
    for p, s in enumerate(states):
        if s == DROPPED:
            r, c = divmod(p, gw)
            box = (c * pw, r * ph, (c + 1) * pw, (r + 1) * ph)
            base.paste(_dim(base.crop(box)), box)
    picture = base.resize((width * scale, height * scale), Image.Resampling.NEAREST) if scale > 1 else base

    # Clusters: slots that absorbed at least one other patch get a colour of their own, in slot order.
    clusters = sorted({k for s, k in zip(states, slots, strict=True) if s == MERGED})
    color_of = dict(zip(clusters, cluster_colors(len(clusters)), strict=True))
    strokes = _Strokes.for_cell(min(ph, pw) * scale)
    draw = ImageDraw.Draw(picture)
    cw, ch = pw * scale, ph * scale
    for p, (s, k) in enumerate(zip(states, slots, strict=True)):
        r, c = divmod(p, gw)
        box = (c * cw, r * ch, (c + 1) * cw, (r + 1) * ch)
        kind = {MERGED: "merged", DROPPED: "dropped"}.get(s, "slot" if k in color_of else "kept")
        _mark(draw, box, kind, color_of.get(k, _WHITE), strokes)
    return picture


# ---------------------------------------------------------------------------------------------------------------
# Text and layout

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> _Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(font: _Font, text: str) -> str:
    # The bitmap fallback font only knows Latin-1.
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _text_size(font: _Font, text: str) -> tuple[int, int]:
    left, _, right, _ = font.getbbox(text)
    bottom = font.getbbox("Ag|")[3]
    return int(right - min(left, 0)), int(bottom)


_LEGEND: tuple[tuple[str, str], ...] = (
    ("kept", "white frame: kept"),
    ("slot", "thick coloured frame: kept, absorbed the patches marked in its colour"),
    ("merged", "coloured corners: merged into the thick-framed patch of that colour"),
    ("dropped", "grey: dropped (the model never sees it)"),
)


def _swatch(kind: str, size: int) -> Image.Image:
    swatch = Image.new("RGB", (size, size), _SWATCH_FILL)
    if kind == "dropped":
        return _dim(swatch)
    _mark(ImageDraw.Draw(swatch), (0, 0, size, size), kind, cluster_colors(1)[0], _Strokes.for_cell(size))
    return swatch


def draw_legend(*, padding: int = 10) -> Image.Image:
    """Draw the key to the four kinds of patches, a swatch drawn like each kind beside its explanation.

    [`draw_reduction`][tokred.bench.visualize.draw_reduction] adds it under a drawing; alone, it goes once under
    a grid of drawings (``tile_pictures(..., footer=draw_legend())``).

    Args:
        padding: White pixels around the key.

    Returns:
        An ``"RGB"`` Pillow image on a white background.

    Raises:
        InvalidInputError: If ``padding < 0``.
    """
    if padding < 0:
        raise InvalidInputError(f"padding must be >= 0; got {padding}")
    font, swatch, gap = _font(13), 22, 6
    lines = [(kind, _fit_text(font, text)) for kind, text in _LEGEND]
    sizes = [_text_size(font, text) for _, text in lines]
    row = max([swatch, *(h for _, h in sizes)]) + 4
    width = 2 * padding + 1 + swatch + gap + max(w for w, _ in sizes)
    canvas = Image.new("RGB", (width, 2 * padding + len(lines) * row), _WHITE)
    draw = ImageDraw.Draw(canvas)
    y, x = padding, padding + 1
    for (kind, text), (_, h) in zip(lines, sizes, strict=True):
        sy = y + (row - swatch) // 2
        canvas.paste(_swatch(kind, swatch), (x, sy))
        draw.rectangle((x - 1, sy - 1, x + swatch, sy + swatch), outline=_OUTLINE)
        draw.text((x + swatch + gap, y + (row - h) // 2), text, fill=_INK, font=font)
        y += row
    return canvas


def draw_reduction(
    image: torch.Tensor | Image.Image,
    reduction: Reduction,
    grid: tuple[int, int],
    *,
    row: int = 0,
    patch_tokens: Sequence[int] | torch.Tensor | None = None,
    scale: int = 4,
    title: str | None = None,
    caption: Sequence[str] = (),
    legend: bool = True,
) -> Image.Image:
    """Draw which patches of ``image`` a reduction kept, merged (and into what) or dropped.

    Every patch the model still sees keeps its true pixels; the marks are frames and corner marks drawn inside
    the patches (see the module's description). With a ``title``, ``caption`` lines or the legend, the drawing
    sits unchanged on a white canvas, at the left under the title, widened when the text needs more room.

    Args:
        image: The input image as the model saw it before normalisation: a floating ``(3, H, W)`` tensor in
            ``[0, 1]`` or a Pillow image of size ``(W, H)``.
        reduction: The reduction of this image's tokens, for example ``handle.last_plans[i].reduction`` of a
            tokred-mamba attachment (``attach(..., record_plans=True)``) or a per-image plan of a tokred-vlm one.
        grid: ``(h, w)`` patches per column and row; ``H`` and ``W`` must be multiples of them.
        row: Batch row of ``reduction`` that belongs to ``image``.
        patch_tokens: Index on the reduction's ``N`` axis of each patch, row-major (for a Vim with a middle class
            token at position ``c``: ``p`` for ``p < c``, ``p + 1`` after); all ``N`` tokens by default.
        scale: Integer upscaling of the drawing (nearest neighbour), so small images stay legible.
        title: A line of text above the drawing.
        caption: Lines of text below the drawing, such as the question and the answers.
        legend: Explain the four kinds of patches under the drawing, with small swatches drawn like them.

    Returns:
        An ``"RGB"`` Pillow image: the drawing alone, ``(W * scale, H * scale)``, without title, caption and
        legend; with them, taller (and wider if the text needs it).

    Raises:
        InvalidTypeError: If ``image`` is not a floating tensor or a Pillow image, or ``scale`` not an integer.
        InvalidInputError: If the image is not ``(3, H, W)``, the grid does not divide it, the patches and the
            reduction's tokens do not correspond, ``row`` is out of range or ``scale < 1``.
    """
    if isinstance(caption, str):
        caption = (caption,)
    drawing = _draw_patches(image, reduction, grid, row, patch_tokens, scale)
    if title is None and not caption and not legend:
        return drawing

    title_font, text_font = _font(16), _font(14)
    pad, gap = 10, 6
    title_text = _fit_text(title_font, title) if title is not None else None
    caption_lines = [_fit_text(text_font, line) for line in caption]
    key = draw_legend(padding=0) if legend else None

    title_size = _text_size(title_font, title_text) if title_text is not None else (0, 0)
    caption_sizes = [_text_size(text_font, line) for line in caption_lines]

    content_width = max(
        [drawing.width + 2, title_size[0], *(w for w, _ in caption_sizes), key.width if key is not None else 0]
    )
    width = content_width + 2 * pad
    height = pad
    if title_text is not None:
        height += title_size[1] + gap
    drawing_top = height + 1
    height += drawing.height + 2
    caption_top = height + gap
    if caption_lines:
        height += gap + sum(h + 3 for _, h in caption_sizes)
    legend_top = height + 2 * gap
    if key is not None:
        height += 2 * gap + key.height
    height += pad

    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    if title_text is not None:
        draw.text((pad, pad), title_text, fill=_INK, font=title_font)
    # Left-aligned with the text, so pictures tiled in a column line up whatever their captions' widths.
    left = pad + 1
    draw.rectangle((left - 1, drawing_top - 1, left + drawing.width, drawing_top + drawing.height), outline=_OUTLINE)
    canvas.paste(drawing, (left, drawing_top))
    y = caption_top
    for line, (_, h) in zip(caption_lines, caption_sizes, strict=True):
        draw.text((pad, y), line, fill=_INK, font=text_font)
        y += h + 3
    if legend:
        canvas.paste(key, (pad, legend_top))
    return canvas


def tile_pictures(
    pictures: Sequence[Image.Image],
    columns: int,
    *,
    padding: int = 8,
    background: tuple[int, int, int] = (255, 255, 255),
    footer: Image.Image | None = None,
    title: str | None = None,
) -> Image.Image:
    """Lay pictures out on a grid, row by row, each in the top-left corner of a cell of the largest size.

    Args:
        pictures: Pillow images (converted to RGB).
        columns: Pictures per row.
        padding: Pixels between cells and around the grid.
        background: RGB colour of the padding and of the unused part of each cell.
        footer: A picture placed once under the grid, at the left, such as
            [`draw_legend`][tokred.bench.visualize.draw_legend].
        title: A line written once above the grid (what the whole figure shows), cut to the figure's width.

    Returns:
        An ``"RGB"`` image of size ``(padding + columns * (cell_w + padding), padding + rows * (cell_h + padding))``,
        widened to the footer if it is wider and made ``footer.height + padding`` taller by it, and taller by
        the title's line when there is one.

    Raises:
        InvalidInputError: If there is no picture, ``columns < 1`` or ``padding < 0``.
        InvalidTypeError: If a picture is not a Pillow image.
    """
    pictures = list(pictures)
    if not pictures:
        raise InvalidInputError("tile_pictures needs at least one picture")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise InvalidInputError(f"columns must be a positive integer; got {columns!r}")
    if padding < 0:
        raise InvalidInputError(f"padding must be >= 0; got {padding}")
    for picture in [*pictures, *([] if footer is None else [footer])]:
        if not isinstance(picture, Image.Image):
            raise InvalidTypeError(f"pictures must be PIL images; got {type(picture).__name__}")
    cell_w = max(p.width for p in pictures)
    cell_h = max(p.height for p in pictures)
    rows = -(-len(pictures) // columns)
    width, height = padding + columns * (cell_w + padding), padding + rows * (cell_h + padding)
    if footer is not None:
        width, height = max(width, footer.width + 2 * padding), height + footer.height + padding
    top = 0
    if title is not None:
        title_font = _font(18)
        title = _fit_text(title_font, title)
        while title and _text_size(title_font, title)[0] > width - 2 * padding:
            title = title[:-4] + "..."
        top = _text_size(title_font, title)[1] + padding
        height += top
    out = Image.new("RGB", (width, height), tuple(background))
    if title is not None:
        ImageDraw.Draw(out).text((padding, padding), title, fill=_INK, font=title_font)
    for i, picture in enumerate(pictures):
        r, c = divmod(i, columns)
        out.paste(picture.convert("RGB"), (padding + c * (cell_w + padding), top + padding + r * (cell_h + padding)))
    if footer is not None:
        out.paste(footer.convert("RGB"), (padding, top + padding + rows * (cell_h + padding)))
    return out
