"""Finding a call's visual placeholder tokens and what each of them is: the hand-off to the prefill.

The multimodal base model (``model.model``) receives, for one forward, the prompt's ``input_ids`` (or
``inputs_embeds``) and the encoded features (``mm_encoder_outputs``; a plain call gets its pixels encoded here,
so both entry points take one path). [`collect_visual_tokens`][tokred.vlm.hooks.placeholders.collect_visual_tokens]
matches the placeholders, in the row-major order the model scatters features into them, with the layouts the
encoder recorded ([`tokred.vlm.hooks.encoding`][tokred.vlm.hooks.encoding]) and returns a
[`VisualTokens`][tokred.vlm.hooks.placeholders.VisualTokens]: which sequence positions are visual, the group of
each, and what vision space kept. The decoder hook consumes it in the same call.

Shapes: ``B`` rows, ``L`` sequence length, ``T`` visual tokens of the call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from tokred.core.errors import AttachError, InvalidInputError
from tokred.core.reduction import Reduction
from tokred.vlm.hooks.encoding import layouts_of
from tokred.vlm.models.base import ModelAdapter

__all__ = [
    "PIXEL_KEYS",
    "PlanSlot",
    "VisualTokens",
    "collect_visual_tokens",
    "encode_pixels",
]

PIXEL_KEYS = ("pixel_values", "pixel_values_images", "pixel_values_videos")
"""The keyword arguments that carry pixels into a forward."""


@dataclass(frozen=True)
class PlanSlot:
    """Where one group's plan will come from (``record_plans``): its image and group, and a vision-space plan."""

    modality: str
    image: int
    group: int
    group_id: int  # the group's id among the call's groups
    plan: Reduction | None  # already made in vision space, or None when the reduction runs on the embeddings


@dataclass
class VisualTokens:
    """The visual tokens of one call, handed from the base-model hook to the decoder hook.

    Attributes:
        flat_index: Long ``(T,)``: position ``b * L + l`` of every visual token, ascending (row-major).
        group: Long ``(T,)``: the call-wide group id of every visual token, ``-1`` for structural tokens.
        keep: Bool ``(T,)``: tokens already kept in vision space; None when the reducer runs on the embeddings.
        length: ``L`` of the call.
        plans: With ``record_plans``, one slot per group, in the order the groups appear.
        mismatch: Why the placeholders and the features do not correspond, or None when they do.
    """

    flat_index: torch.Tensor
    group: torch.Tensor
    keep: torch.Tensor | None
    length: int
    plans: list[PlanSlot] = field(default_factory=list)
    mismatch: str | None = None

    def raise_if_mismatched(self) -> None:
        """Refuse a call whose placeholders the features do not fill.

        The model checks this itself before its language model runs, in its own words, which code that catches
        the model's errors relies on; this is the backstop for a model that does not.

        Raises:
            InvalidInputError: With the counts on both sides.
        """
        if self.mismatch is not None:
            raise InvalidInputError(self.mismatch)


def encode_pixels(module: Any, modalities: tuple[str, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Encode the pixels of a plain ``model(**inputs)`` call through the (wrapped) ``get_*_features``.

    ``generate`` encodes before the forward and passes ``mm_encoder_outputs``; a plain call passes pixels. Doing
    the encoding here for the plain call gives both the same path. The pixel arguments are then removed from
    ``kwargs`` (sizes and grids stay: Qwen computes its 3-D positions from them).

    Returns:
        The encoded outputs by modality, or None when the call has no pixels to encode.
    """
    encoded = dict(kwargs.get("mm_encoder_outputs") or {})
    changed = False
    for modality in modalities:
        keys = [k for k in PIXEL_KEYS if kwargs.get(k) is not None and k.endswith("videos") == (modality == "video")]
        if keys and encoded.get(modality) is None:
            function = getattr(module, f"get_{modality}_features")
            parameters = inspect.signature(function).parameters
            call = {k: v for k, v in kwargs.items() if k in parameters and k != "kwargs" and v is not None}
            encoded[modality] = function(**call, return_dict=True)
            for key in call:
                if key in PIXEL_KEYS:
                    kwargs.pop(key, None)
            changed = True
    return encoded if changed else None


def collect_visual_tokens(
    module: Any,
    adapter: ModelAdapter,
    owner: int,
    encoded: dict[str, Any],
    input_ids: torch.Tensor | None,
    embeds: torch.Tensor | None,
    *,
    vision_space: bool,
    record_plans: bool,
) -> VisualTokens:
    """Match the call's placeholders with the layouts of its encoded features.

    Args:
        module: The multimodal base model (for the input embeddings when only ``inputs_embeds`` is given).
        adapter: The model's adapter.
        owner: Id of the attachment (records of other attachments are not used).
        encoded: The call's encoded outputs by modality.
        input_ids: ``(B, L)`` or None.
        embeds: ``(B, L, C)`` when ``input_ids`` is None.
        vision_space: Whether the reducer ran before the projector (then keep flags come with the layouts).
        record_plans: Whether to list the groups' plan slots.

    Returns:
        The visual tokens; when the placeholders and the features do not correspond, an empty record whose
        ``mismatch`` says how (the model's own check usually raises first).
    """
    reference = input_ids if input_ids is not None else embeds
    length = reference.shape[1]
    flat_parts, group_parts, keep_parts = [], [], []
    plans: list[PlanSlot] = []
    next_group = 0
    for modality in adapter.modalities:
        output = encoded.get(modality)
        if output is None:
            continue
        token_id = adapter.placeholder_id(modality)
        if input_ids is not None:
            placeholders = input_ids == token_id
        else:
            marker = module.get_input_embeddings()(torch.tensor(token_id, device=embeds.device))
            placeholders = (embeds == marker).all(dim=-1)
        layouts = layouts_of(output, owner)
        num_features = sum(len(layout.groups) for layout in layouts)
        num_placeholders = int(placeholders.sum())
        if num_placeholders != num_features:
            found = f"no {modality} placeholder tokens" if num_placeholders == 0 else f"{num_placeholders}"
            mismatch = (
                f"{len(layouts)} {modality} input(s) give {num_features} visual tokens but the prompt has {found} "
                f"{modality} placeholder tokens (id {token_id}); build input_ids with the model's processor so each "
                "image or video has its placeholders"
            )
            empty = torch.zeros(0, dtype=torch.long)
            return VisualTokens(empty, empty, None, length, mismatch=mismatch)
        flat_parts.append(torch.nonzero(placeholders.reshape(-1)).squeeze(1).cpu())
        for index, layout in enumerate(layouts):
            groups = layout.groups.clone()
            structural = groups < 0
            if record_plans:
                for local in torch.unique(groups[~structural]).tolist():
                    entry_plans = layout.plans
                    plan = entry_plans[local] if entry_plans is not None and local < len(entry_plans) else None
                    plans.append(PlanSlot(modality, index, local, local + next_group, plan))
            groups = torch.where(structural, -1, groups + next_group)
            next_group = int(groups.max()) + 1 if bool((~structural).any()) else next_group
            group_parts.append(groups)
            if layout.keep is not None:
                keep_parts.append(layout.keep.cpu() | structural)
    flat = torch.cat(flat_parts)
    order = torch.argsort(flat)  # the model fills image placeholders before video ones; sequence order is ours
    group = torch.cat(group_parts)[order]
    keep = None
    if vision_space:
        if len(keep_parts) != len(group_parts):
            raise AttachError("space='vision': some visual inputs were not reduced before the projector")
        keep = torch.cat(keep_parts)[order]
    return VisualTokens(flat[order], group, keep, length, plans)
