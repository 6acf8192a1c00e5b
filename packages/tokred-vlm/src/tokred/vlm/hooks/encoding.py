"""Recording encodes: how every encoded image or video splits into token groups, handed on with the features.

Whenever the model encodes pixels — ``generate`` does it before the prefill, a plain ``model(**inputs)`` inside
the forward — the attached model's ``get_{modality}_features`` runs through
[`EncodeRecorder.encode`][tokred.vlm.hooks.encoding.EncodeRecorder.encode]. It learns, for every entry of the
returned ``pooler_output`` (one image, crop set or video), which token belongs to which group, and, with
``space="vision"``, which tokens the reducer kept before the projector. That record is attached to the returned
output object itself ([`ENCODING_ATTRIBUTE`][tokred.vlm.hooks.encoding.ENCODING_ATTRIBUTE]), so it travels with
the features through ``mm_encoder_outputs`` to the forward that scatters them: nothing is looked up in a global
table, and calls in different threads never see each other's records.

Shapes: ``R`` rows of the projector's input (images, crops or frames), ``n`` tokens per row or entry, ``C``
channels.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokred.core.errors import AttachError, UnsupportedError
from tokred.core.reducer import Reducer
from tokred.core.reduction import Reduction
from tokred.vlm.hooks.groups import reduce_groups
from tokred.vlm.models.base import ModelAdapter, Space, VideoGroups

__all__ = ["ENCODING_ATTRIBUTE", "EncodeRecorder", "EncodedEntries", "EntryLayout", "bind_arguments", "layouts_of"]

ENCODING_ATTRIBUTE = "_tokred_encoding"
"""The attribute of a ``get_*_features`` output that carries its record
([`EncodedEntries`][tokred.vlm.hooks.encoding.EncodedEntries])."""


@dataclass
class EntryLayout:
    """How one encoded entry (an image, its crops, a video or a frame) splits into token groups.

    Attributes:
        groups: Long ``(n,)``: the group (crop, frame, image) of each of the entry's tokens, counted from 0 within
            the entry; ``-1`` marks structural tokens that are always kept and count towards no budget.
        keep: Bool ``(n,)``: the tokens the reducer kept in vision space (``space="vision"``); None when the
            reduction is still to run on the language model's embeddings.
        plans: With ``record_plans`` in vision space, the reducer's plan of each group (by group id); else None.
    """

    groups: torch.Tensor
    keep: torch.Tensor | None = None
    plans: list[Reduction | None] | None = None


@dataclass
class EncodedEntries:
    """The record one ``get_*_features`` call leaves on its output.

    Attributes:
        owner: Id of the attachment that recorded it (another attachment's record is not used).
        entries: The entries of ``pooler_output`` as returned.
        layouts: Their layouts, in the same order.
    """

    owner: int
    entries: list[torch.Tensor]
    layouts: list[EntryLayout]


@dataclass
class _Scratch:
    """Filled by the packing wrapper and the projector hook during one ``get_*_features`` call."""

    projector_keep: list[torch.Tensor] = field(default_factory=list)  # per projector call: (R, n) kept flags
    row_plans: list[Reduction | None] = field(default_factory=list)  # record_plans: one per projector row
    packed: list[EntryLayout] | None = None  # anyres: the layouts read off the packing
    crops: list[int] | None = None  # anyres: projector rows (crops) of each packed entry


def bind_arguments(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call by name, with ``**kwargs`` flattened in."""
    bound = inspect.signature(function).bind_partial(*args, **kwargs).arguments
    extra = bound.pop("kwargs", None)
    if isinstance(extra, dict):
        bound.update(extra)
    return dict(bound)


class EncodeRecorder:
    """Wraps the encoding methods of one model instance and records the group layout of what they return.

    Args:
        owner: Id of the attachment (stamped on every record).
        adapter: The model's adapter.
        reducer: The reducer (it runs here only with ``space="vision"``).
        space: ``"vision"`` or ``"llm"``.
        video_groups: ``"frame"`` or ``"video"``.
        record_plans: Keep the plan of every group reduced in vision space.
    """

    def __init__(
        self,
        owner: int,
        adapter: ModelAdapter,
        reducer: Reducer,
        space: Space,
        video_groups: VideoGroups,
        record_plans: bool,
    ) -> None:
        self.owner = owner
        self.adapter = adapter
        self.reducer = reducer
        self.space = space
        self.video_groups = video_groups
        self.record_plans = record_plans
        # The scratch of the get_*_features call running in this thread; the projector and packing hooks fire
        # inside it. Per thread, so concurrent calls on one model keep their scratch apart.
        self._calls = threading.local()

    def _scratch(self) -> _Scratch | None:
        return getattr(self._calls, "scratch", None)

    def encode(self, modality: str, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Wrapper of ``get_{modality}_features``: run it and attach the layout of every entry to its output."""
        outer = self._scratch()
        scratch = self._calls.scratch = _Scratch()
        try:
            output = original(*args, **kwargs)
        finally:
            self._calls.scratch = outer
        if isinstance(output, tuple):
            # return_dict=False: a tuple can carry no record, and a forward cannot take it as mm_encoder_outputs,
            # so no prefill will look for one.
            return output
        pooled = output.pooler_output
        entries = list(pooled)
        if modality in self.adapter.packed_modalities:
            if scratch.packed is None:
                raise AttachError(f"{type(self.adapter.model).__name__} encoded {modality}s without packing them")
            layouts = scratch.packed
        else:
            call = bind_arguments(original, args, kwargs)
            groups = self.adapter.entry_groups(modality, [len(e) for e in entries], call, self.video_groups)
            keeps: list[torch.Tensor | None] = [None] * len(entries)
            if self.space == "vision":
                rows = torch.cat(scratch.projector_keep) if scratch.projector_keep else None
                if rows is None or rows.shape[0] != len(entries):
                    raise AttachError(
                        f"space='vision': {len(entries)} {modality} entries but the projector saw "
                        f"{0 if rows is None else rows.shape[0]} rows; this model's feature path is not supported"
                    )
                keeps = list(rows)
            layouts = [EntryLayout(g, k) for g, k in zip(groups, keeps, strict=True)]
        if self.record_plans and self.space == "vision":
            rows_plans = iter(scratch.row_plans)
            crops = scratch.crops if scratch.packed is not None else [1] * len(entries)
            for layout, count in zip(layouts, crops, strict=True):
                layout.plans = [next(rows_plans, None) for _ in range(count)]
        setattr(output, ENCODING_ATTRIBUTE, EncodedEntries(self.owner, entries, layouts))
        return output

    def pack(
        self, original: Callable[..., Any], image_features: Any, image_sizes: Any, *args: Any, **kwargs: Any
    ) -> Any:
        """Wrapper of anyres ``pack_image_features``: pass crop ids (and vision-space keep flags) through it.

        The packing (unpadding, interpolation, newlines) is the model's own code, so the crop each packed token
        came from is found by packing a map of crop ids the same way; no packing logic is copied.
        """
        result = original(image_features, image_sizes, *args, **kwargs)
        scratch = self._scratch()
        if scratch is None:
            return result
        scratch.crops = [f.shape[0] for f in image_features]
        device = image_features[0].device
        crop_maps = [
            torch.arange(f.shape[0], dtype=torch.float32, device=device)
            .view(-1, 1, 1)
            .expand(f.shape[0], f.shape[1], 1)
            for f in image_features
        ]
        options = {k: v for k, v in kwargs.items() if k != "image_newline"}
        # A newline of -1 marks the structural tokens; crop ids are >= 0.
        packed_ids, _ = original(
            [m.contiguous() for m in crop_maps],
            image_sizes,
            *args,
            image_newline=torch.tensor([-1.0], device=device),
            **options,
        )
        keeps: list[torch.Tensor | None] = [None] * len(crop_maps)
        if self.space == "vision":
            rows = torch.cat(scratch.projector_keep)
            split = torch.split(rows.to(torch.float32).unsqueeze(-1), [f.shape[0] for f in image_features])
            packed_keep, _ = original(
                list(split), image_sizes, *args, image_newline=torch.tensor([1.0], device=device), **options
            )
            keeps = [k.squeeze(-1) > 0.5 for k in packed_keep]
        # Interpolated (LLaVA-OneVision anyres_max) crop ids are attributed to the nearest crop.
        scratch.packed = [
            EntryLayout(torch.where(ids.squeeze(-1) < -0.5, -1, ids.squeeze(-1).round()).long().cpu(), keep)
            for ids, keep in zip(packed_ids, keeps, strict=True)
        ]
        return result

    def projector_pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """``space="vision"``: reduce each row (image, crop or frame) of the projector's input ``(R, n, C)``."""
        scratch = self._scratch()
        if scratch is None or not args:
            return None  # the projector called outside an encode: leave it alone
        features = args[0]
        num_rows, length = features.shape[:2]
        groups = self.adapter.projector_row_groups(num_rows, length).to(features.device)  # (R, n)
        rows = torch.arange(num_rows, device=features.device).unsqueeze(1).expand(num_rows, length)
        group_ids = torch.where(groups >= 0, rows, -1)
        plans: dict[int, Reduction] | None = {} if self.record_plans else None
        merged, keep = reduce_groups(
            self.reducer, features.reshape(num_rows * length, -1), group_ids.reshape(-1), plans
        )
        scratch.projector_keep.append(keep.view(num_rows, length))
        if plans is not None:
            scratch.row_plans.extend(plans.get(row) for row in range(num_rows))
        return (merged.view_as(features), *args[1:])


def layouts_of(output: Any, owner: int) -> list[EntryLayout]:
    """The layout of every entry of an encoded output, in the order of its ``pooler_output``.

    The record on the output lists the entries as they were returned. ``generate`` may rebuild
    ``pooler_output`` before the prefill (beam search and ``num_return_sequences`` repeat each row's images,
    ``_expand_multimodal_outputs``): a list keeps its tensors, so entries are matched to the record by identity,
    while a tensor output is re-stacked into copies, matched by exact equality. This is the one lookup left,
    and it only maps entries to a record that travelled with them.

    Raises:
        UnsupportedError: If the output carries no record of this attachment (features computed before
            ``attach``, or sliced by ``generate``'s chunked prefill).
    """
    record = getattr(output, ENCODING_ATTRIBUTE, None)
    if not isinstance(record, EncodedEntries) or record.owner != owner:
        raise UnsupportedError(
            "these visual features were not encoded by the attached model: they were computed before attach() "
            "(or by another attachment), or generate's chunked prefill (prefill_chunk_size) sliced them; pass pixel "
            "inputs after attach(), with prefill_chunk_size=None"
        )
    pooled = output.pooler_output if hasattr(output, "pooler_output") else output[1]
    current = list(pooled)
    if len(current) == len(record.entries) and all(a is b for a, b in zip(current, record.entries, strict=True)):
        return record.layouts
    layouts = []
    for entry in current:
        found = next((i for i, known in enumerate(record.entries) if known is entry), None)
        if found is None:
            found = next(
                (
                    i
                    for i, known in enumerate(record.entries)
                    if known.shape == entry.shape and known.device == entry.device and torch.equal(known, entry)
                ),
                None,
            )
        if found is None:
            raise UnsupportedError(
                "the visual features were changed between encoding and the forward that uses them (generate's "
                "chunked prefill slices them); pass prefill_chunk_size=None"
            )
        layouts.append(record.layouts[found])
    return layouts
