"""``attach``: run any tokred reducer inside a transformers vision-language model, per instance.

How it works (``reference/hf_hooks.md`` has the research behind it):

* The model's own ``get_image_features`` / ``get_video_features`` are wrapped on the instance, so every time
  the model (or ``generate``, which encodes images before the prefill) encodes pixels, tokred records how each
  encoded image or video splits into groups (crops, frames) and, for ``space="vision"``, reduces the
  pre-projector features right there through a pre-hook on the projector.
* A forward pre-hook on the multimodal base model (``model.model``) finds the visual placeholder tokens of the
  call and matches them to those records. A plain ``model(**inputs)`` call has its pixels encoded here, so both
  entry points take the same path.
* A forward pre-hook on the language decoder (``model.get_decoder()``) sees the merged embeddings and the
  positions the model computed (Qwen's 3-D M-RoPE included), runs the reducer per group (``space="llm"``),
  drops the removed tokens from the embeddings, positions and mask, and stores a small state on the cache.
  Later decode steps, which ``generate`` still describes in original coordinates, are translated from it.

Nothing is patched on a class; ``detach()`` removes every hook and wrapper and leaves the model as it was.
"""

from __future__ import annotations

import collections
import functools
import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tokred.core.reducer import Reducer
from tokred.core.reduction import Reduction
from tokred.vlm.models import EntryLayout, ModelFamily, family_of, simple_layouts, vision_grid
from tokred.vlm.sequence import compact_positions, decode_positions, padding_mask_from, survivor_index

__all__ = ["Attachment", "GroupPlan", "PrefillStats", "attach"]

_STATE_ATTRIBUTE = "_tokred_vlm_state"
_MARKER_ATTRIBUTE = "_tokred_vlm_attachment"
_PIXEL_KEYS = ("pixel_values", "pixel_values_images", "pixel_values_videos")
_handle_ids = itertools.count()


@dataclass(frozen=True)
class PrefillStats:
    """What the last reduced prefill did, for the whole batch.

    Lengths are those of the padded batch (the longest row); counts are totals over all rows.

    Attributes:
        original_length: Padded sequence length the model would have processed, ``L``.
        reduced_length: Padded sequence length after reduction, ``L'`` (the logits' length).
        visual_tokens: Visual placeholder tokens in the batch.
        kept_visual_tokens: Visual tokens that survived (structural tokens included).
        groups: Token groups reduced (images, crops or frames).
    """

    original_length: int
    reduced_length: int
    visual_tokens: int
    kept_visual_tokens: int
    groups: int


@dataclass(frozen=True)
class GroupPlan:
    """The reducer's plan for one token group of the last reduced prefill (``attach(..., record_plans=True)``).

    Attributes:
        modality: ``"image"`` or ``"video"``.
        image: Index of the image (or video) among the call's inputs of that modality, in input order (the
            order of ``pixel_values``), counted over the whole batch.
        group: Index of the group within that image or video: the anyres crop or the frame; 0 for an image
            that is a single group (LLaVA-1.5).
        reduction: The plan, a batch of one: ``indices`` ``(1, K)`` and ``assignment`` ``(1, N)`` over the group's
            ``N`` reduced tokens, and ``tokens`` ``(1, K, C)`` in the space the reducer ran in. With
            ``space="vision"`` the tokens are the vision tower's patches of the image, crop or frame, row-major
            (before any anyres unpadding), and ``C`` is the vision width; with ``space="llm"`` they are the group's
            placeholder tokens in sequence order, and ``C`` is the decoder width.
    """

    modality: str
    image: int
    group: int
    reduction: Reduction


@dataclass
class _PrefillState:
    """Kept on the cache between a reduced prefill and the decode steps that follow it."""

    owner: int
    mask: torch.Tensor  # (B, L') long, 1 for real tokens
    prefill_length: int  # L'
    original_length: int  # L
    last_position: torch.Tensor  # (..., B, 1)


@dataclass
class _PendingVisual:
    """Visual tokens of the current call, handed from the base-model hook to the decoder hook."""

    flat_index: torch.Tensor  # (T,) positions b * L + l of the visual tokens, row-major
    group: torch.Tensor  # (T,) global group id, -1 for structural tokens
    keep: torch.Tensor | None  # (T,) bool, kept in vision space; None: reduce on the embeddings
    length: int  # L of the call
    # record_plans only: (modality, input index, group within it, global group id, vision-space plan or None)
    plans: list[tuple[str, int, int, int, Reduction | None]] = field(default_factory=list)


@dataclass
class _EncodeRecord:
    entries: list[torch.Tensor]
    layouts: list[EntryLayout]
    plans: list[list[Reduction | None]] | None = None  # record_plans, space="vision": per entry, per group


@dataclass
class _Scratch:
    """Filled by the projector and packing hooks during one ``get_*_features`` call."""

    projector_keep: list[torch.Tensor] = field(default_factory=list)
    packed: list[EntryLayout] | None = None
    row_plans: list[Reduction | None] = field(default_factory=list)  # record_plans: one per projector row
    crops: list[int] | None = None  # anyres: projector rows (crops) of each packed entry


class Attachment:
    """The handle :func:`attach` returns: it owns the hooks and removes them on :meth:`detach`.

    Usable as a context manager; leaving the block detaches.

    Attributes:
        model: The model the reducer is attached to.
        reducer: The reducer that runs on each token group.
        family: The model's :class:`~tokred.vlm.models.ModelFamily`.
        space: ``"vision"`` or ``"llm"``.
        positions: ``"original"`` or ``"compact"``.
        video_groups: ``"frame"`` or ``"video"``: the token group of a video.
        last_prefill: :class:`PrefillStats` of the most recent reduced prefill, or None.
        record_plans: Whether each prefill records the reducer's plans.
        last_plans: With ``record_plans``, the :class:`GroupPlan` of every token group of the most recent reduced
            prefill, in the order the groups appear in the batch; otherwise None.
    """

    def __init__(
        self,
        model: Any,
        reducer: Reducer,
        family: ModelFamily,
        space: Literal["vision", "llm"],
        positions: Literal["original", "compact"],
        video_groups: Literal["frame", "video"],
        record_plans: bool = False,
    ) -> None:
        self.model = model
        self.reducer = reducer
        self.family = family
        self.space = space
        self.positions = positions
        self.video_groups = video_groups
        self.last_prefill: PrefillStats | None = None
        self.record_plans = record_plans
        self.last_plans: list[GroupPlan] | None = None
        self._id = next(_handle_ids)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped: list[tuple[Any, str]] = []
        self._records: collections.deque[_EncodeRecord] = collections.deque(maxlen=8)
        self._scratch: _Scratch | None = None
        self._pending: _PendingVisual | None = None
        self._attached = False
        self._base = model.model
        self._decoder = model.get_decoder()

    # ------------------------------------------------------------------------------------------ lifecycle
    def _install(self) -> None:
        model, base = self.model, self._base
        self._hooks.append(model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True))
        self._hooks.append(base.register_forward_pre_hook(self._base_pre_hook, with_kwargs=True))
        self._hooks.append(self._decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True))
        for modality in self.family.modalities:
            self._wrap(base, f"get_{modality}_features", functools.partial(self._encode, modality))
        if hasattr(base, "pack_image_features"):
            self._wrap(base, "pack_image_features", self._pack)
        if self.space == "vision":
            self._hooks.append(base.multi_modal_projector.register_forward_pre_hook(self._projector_pre_hook))
        setattr(model, _MARKER_ATTRIBUTE, self)
        self._attached = True

    def _wrap(self, owner: Any, name: str, replacement: Any) -> None:
        if name in vars(owner):
            raise RuntimeError(f"{type(owner).__name__}.{name} is already overridden on this instance")
        original = getattr(owner, name)

        @functools.wraps(original)  # keeps the signature that generate() inspects
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return replacement(original, *args, **kwargs)

        setattr(owner, name, wrapper)
        self._wrapped.append((owner, name))

    def detach(self) -> None:
        """Remove every hook and wrapper; the model behaves exactly as before :func:`attach`.

        Calling it twice is harmless.
        """
        if not self._attached:
            return
        for hook in self._hooks:
            hook.remove()
        for owner, name in self._wrapped:
            delattr(owner, name)
        self._hooks.clear()
        self._wrapped.clear()
        self._records.clear()
        self._pending = None
        if getattr(self.model, _MARKER_ATTRIBUTE, None) is self:
            delattr(self.model, _MARKER_ATTRIBUTE)
        self._attached = False

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed."""
        return self._attached

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"Attachment({type(self.model).__name__}, {self.reducer!r}, space={self.space!r}, "
            f"positions={self.positions!r}, {state})"
        )

    # ------------------------------------------------------------------------------------------ encoding
    def _encode(self, modality: str, original: Any, *args: Any, **kwargs: Any) -> Any:
        """Wrapper of ``get_{modality}_features``: record the group layout of every encoded entry."""
        outer, self._scratch = self._scratch, _Scratch()
        try:
            output = original(*args, **kwargs)
            scratch = self._scratch
        finally:
            self._scratch = outer
        pooled = output.pooler_output if hasattr(output, "pooler_output") else output[1]
        entries = list(pooled)
        if scratch.packed is not None:
            layouts = scratch.packed
        else:
            bound = _bind(original, args, kwargs)
            groups = simple_layouts(
                self.family,
                modality,
                [len(entry) for entry in entries],
                config=self.model.config,
                call_kwargs=bound,
                video_groups=self.video_groups,
            )
            keeps: list[torch.Tensor | None] = [None] * len(entries)
            if self.space == "vision":
                rows = torch.cat(scratch.projector_keep) if scratch.projector_keep else None
                if rows is None or rows.shape[0] != len(entries):
                    raise RuntimeError(
                        f"space='vision': {len(entries)} {modality} entries but the projector saw "
                        f"{0 if rows is None else rows.shape[0]} rows; this model's feature path is not supported"
                    )
                keeps = list(rows)
            layouts = [EntryLayout(g, k) for g, k in zip(groups, keeps, strict=True)]
        plans = None
        if self.record_plans and self.space == "vision":
            rows = iter(scratch.row_plans)
            crops = scratch.crops if scratch.packed is not None else [1] * len(entries)
            plans = [[next(rows, None) for _ in range(count)] for count in crops]
        self._records.append(_EncodeRecord(entries, layouts, plans))
        return output

    def _pack(self, original: Any, image_features: Any, image_sizes: Any, *args: Any, **kwargs: Any) -> Any:
        """Wrapper of anyres ``pack_image_features``: pass crop ids (and vision-space keep flags) through it."""
        result = original(image_features, image_sizes, *args, **kwargs)
        if self._scratch is None:
            return result
        self._scratch.crops = [f.shape[0] for f in image_features]
        crop_maps = [
            torch.arange(f.shape[0], dtype=torch.float32, device=f.device)
            .view(-1, 1, 1)
            .expand(f.shape[0], f.shape[1], 1)
            .contiguous()
            for f in image_features
        ]
        kwargs = {k: v for k, v in kwargs.items() if k != "image_newline"}
        device = image_features[0].device
        packed_ids, _ = original(
            crop_maps, image_sizes, *args, image_newline=torch.tensor([-1.0], device=device), **kwargs
        )
        keeps: list[torch.Tensor | None] = [None] * len(crop_maps)
        if self.space == "vision":
            rows = torch.cat(self._scratch.projector_keep)
            split = torch.split(rows.to(torch.float32).unsqueeze(-1), [f.shape[0] for f in image_features])
            packed_keep, _ = original(
                list(split), image_sizes, *args, image_newline=torch.tensor([1.0], device=device), **kwargs
            )
            keeps = [k.squeeze(-1) > 0.5 for k in packed_keep]
        # Interpolated (LLaVA-OneVision anyres_max) crop ids are attributed to the nearest crop.
        self._scratch.packed = [
            EntryLayout(torch.where(ids.squeeze(-1) < -0.5, -1, ids.squeeze(-1).round()).long().cpu(), keep)
            for ids, keep in zip(packed_ids, keeps, strict=True)
        ]
        return result

    def _projector_pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """``space="vision"``: reduce each row (image, crop or frame) of the pre-projector features."""
        if self._scratch is None or not args:
            return None
        features = args[0]  # (R, n, C_vision)
        num_rows, length = features.shape[:2]
        groups = torch.zeros((num_rows, length), dtype=torch.long, device=features.device)
        if self.family.name == "video_llava" and length == vision_grid(self.model.config) ** 2 + 1:
            groups[:, 0] = -1  # the per-frame class token stays, unreduced
        flat = features.reshape(num_rows * length, -1)
        group_ids = (torch.arange(num_rows, device=features.device).unsqueeze(1) * (groups >= 0)).masked_fill(
            groups < 0, -1
        )
        plans: dict[int, Reduction] | None = {} if self.record_plans else None
        merged, keep = _reduce_groups(self.reducer, flat, group_ids.reshape(-1), plans)
        self._scratch.projector_keep.append(keep.view(num_rows, length))
        if plans is not None:
            self._scratch.row_plans.extend(plans.get(row) for row in range(num_rows))
        return (merged.view_as(features), *args[1:])

    def _lookup(self, entry: torch.Tensor) -> tuple[EntryLayout, list[Reduction | None] | None]:
        """The layout of an encoded entry and, with ``record_plans`` in vision space, its groups' plans."""
        for record in reversed(self._records):
            for i, (known, layout) in enumerate(zip(record.entries, record.layouts, strict=True)):
                if known is entry:
                    return layout, record.plans[i] if record.plans is not None else None
        for record in reversed(self._records):
            for i, (known, layout) in enumerate(zip(record.entries, record.layouts, strict=True)):
                if known.shape == entry.shape and known.device == entry.device and torch.equal(known, entry):
                    return layout, record.plans[i] if record.plans is not None else None
        for record in self._records:
            for known in record.entries:
                if known.shape[-1] == entry.shape[-1] and bool((known == entry[0]).all(dim=-1).any()):
                    raise NotImplementedError(
                        "tokred.vlm cannot reduce a prefill that is split into chunks (generate's prefill_chunk_size): "
                        "a group's tokens would be reduced piecewise. Pass prefill_chunk_size=None."
                    )
        raise RuntimeError(
            "these visual features were not encoded by the attached model (for example they were computed before "
            "attach() and passed as mm_encoder_outputs), so tokred does not know how they split into groups; "
            "pass pixel inputs after attach() instead"
        )

    # ------------------------------------------------------------------------------------------ hooks
    def _top_pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        labels = kwargs.get("labels")
        if labels is None and args:
            labels = _bind(module.forward, args, kwargs).get("labels")
        if labels is not None:
            raise ValueError(
                "tokred.vlm.attach does not support labels: the reduced sequence is shorter than the labels, "
                "so the loss would be misaligned. Detach the reducer for training or loss computation "
                "(handle.detach()), or compute the loss yourself on the suffix of the logits, which stays aligned."
            )

    def _base_pre_hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._pending = None
        if args:
            kwargs = dict(_bind(module.forward, args, kwargs))
            args = ()
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        changed = False
        for modality in self.family.modalities:
            pixels = [
                k for k in _PIXEL_KEYS if kwargs.get(k) is not None and (k.endswith("videos") == (modality == "video"))
            ]
            if pixels and encoded.get(modality) is None:
                function = getattr(module, f"get_{modality}_features")
                parameters = inspect.signature(function).parameters
                call = {k: v for k, v in kwargs.items() if k in parameters and k != "kwargs" and v is not None}
                encoded[modality] = function(**call, return_dict=True)
                for key in call:
                    if key in _PIXEL_KEYS:  # sizes and grids stay: Qwen computes its 3-D positions from them
                        kwargs.pop(key, None)
                changed = True
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        has_visual = any(encoded.get(m) is not None for m in self.family.modalities)
        if not has_visual:
            self._check_no_orphan_placeholders(module, input_ids, embeds, cache)
            return None
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(
                "tokred.vlm reduces visual tokens only in a prefill that starts from an empty cache: continuing a "
                "cache with new images or videos, and chunked prefill (generate's prefill_chunk_size), are not "
                "supported; run the whole conversation in one call, with prefill_chunk_size=None"
            )
        self._pending = self._collect_visual(module, encoded, input_ids, embeds)
        if changed:
            kwargs["mm_encoder_outputs"] = encoded
            return args, kwargs
        return None

    def _collect_visual(
        self, module: Any, encoded: dict[str, Any], input_ids: torch.Tensor | None, embeds: torch.Tensor | None
    ) -> _PendingVisual:
        config = self.model.config
        reference = input_ids if input_ids is not None else embeds
        length = reference.shape[1]
        flat_parts, group_parts, keep_parts = [], [], []
        plans: list[tuple[str, int, int, int, Reduction | None]] = []
        next_group = 0
        for modality in self.family.modalities:
            output = encoded.get(modality)
            if output is None:
                continue
            token_id = _placeholder_id(config, modality)
            if input_ids is not None:
                placeholders = input_ids == token_id
            else:
                marker = module.get_input_embeddings()(torch.tensor(token_id, device=embeds.device))
                placeholders = (embeds == marker).all(dim=-1)
            entries = list(output.pooler_output)
            found = [self._lookup(entry) for entry in entries]
            layouts = [layout for layout, _ in found]
            num_features = sum(len(layout.groups) for layout in layouts)
            num_placeholders = int(placeholders.sum())
            if num_placeholders != num_features:
                hint = (
                    f"the prompt has no {modality} placeholder tokens (id {token_id})"
                    if num_placeholders == 0
                    else f"the prompt has {num_placeholders} {modality} placeholder tokens (id {token_id})"
                )
                raise ValueError(
                    f"{len(entries)} {modality} input(s) give {num_features} visual tokens but {hint}; "
                    "build input_ids with the model's processor so each image or video has its placeholders"
                )
            flat_parts.append(torch.nonzero(placeholders.reshape(-1)).squeeze(1).cpu())
            for index, (layout, entry_plans) in enumerate(found):
                groups = layout.groups.clone()
                structural = groups < 0
                if self.record_plans:
                    for local in torch.unique(groups[~structural]).tolist():
                        plan = entry_plans[local] if entry_plans is not None and local < len(entry_plans) else None
                        plans.append((modality, index, local, local + next_group, plan))
                groups = torch.where(structural, -1, groups + next_group)
                next_group = int(groups.max()) + 1 if (~structural).any() else next_group
                group_parts.append(groups)
                if layout.keep is not None:
                    keep_parts.append(layout.keep.cpu() | structural)
        flat = torch.cat(flat_parts)
        order = torch.argsort(flat)
        group = torch.cat(group_parts)[order]
        keep = None
        if self.space == "vision":
            if len(keep_parts) != len(group_parts):
                raise RuntimeError("space='vision': some visual inputs were not reduced before the projector")
            keep = torch.cat(keep_parts)[order]
        return _PendingVisual(flat[order], group, keep, length, plans)

    def _check_no_orphan_placeholders(self, module: Any, input_ids: Any, embeds: Any, cache: Any) -> None:
        """A first call whose prompt has visual placeholders but no pixels is a mistake, not text."""
        if input_ids is None or (cache is not None and cache.get_seq_length() > 0):
            return
        config = self.model.config
        for modality in self.family.modalities:
            token_id = _placeholder_id(config, modality)
            count = int((input_ids == token_id).sum()) if token_id is not None else 0
            if count:
                raise ValueError(
                    f"the prompt has {count} {modality} placeholder tokens (id {token_id}) but no {modality} "
                    f"inputs were given; pass the pixel values the processor returned with the prompt"
                )

    def _decoder_pre_hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        pending, self._pending = self._pending, None
        if args:
            kwargs = dict(_bind(module.forward, args, kwargs))
            args = ()
        cache_key = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
        cache = kwargs.get(cache_key)
        if pending is not None:
            return args, self._prefill(module, kwargs, pending, cache_key)
        state = getattr(cache, _STATE_ATTRIBUTE, None) if cache is not None else None
        if state is not None and state.owner == self._id:
            return args, self._decode(kwargs, state, cache)
        return None

    # ------------------------------------------------------------------------------------------ prefill
    def _prefill(
        self, module: torch.nn.Module, kwargs: dict[str, Any], pending: _PendingVisual, cache_key: str
    ) -> dict[str, Any]:
        embeds = kwargs["inputs_embeds"]
        batch, length, width = embeds.shape
        device = embeds.device
        if length != pending.length:
            raise RuntimeError(f"decoder received {length} tokens, expected {pending.length}")
        valid = padding_mask_from(kwargs.get("attention_mask"), batch, length, device)
        flat_index = pending.flat_index.to(device)
        group = pending.group.to(device)
        survive = valid.clone().reshape(-1)
        llm_plans: dict[int, Reduction] | None = {} if self.record_plans and pending.keep is None else None
        if pending.keep is not None:  # reduced in vision space already
            survive[flat_index] = pending.keep.to(device)
        else:
            flat_embeds = embeds.reshape(batch * length, width)
            merged, keep = _reduce_groups(self.reducer, flat_embeds[flat_index], group, llm_plans)
            flat_embeds = flat_embeds.clone()
            flat_embeds[flat_index] = merged
            embeds = flat_embeds.view(batch, length, width)
            survive[flat_index] = keep
        survive = survive.view(batch, length) & valid
        index, new_mask = survivor_index(survive, valid)

        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=device).expand(batch, length)
        if self.positions == "compact":
            group_ids = torch.full((batch * length,), -1, dtype=torch.long, device=device)
            group_ids[flat_index] = group
            positions = compact_positions(positions, survive, valid, group_ids.view(batch, length))
        gather = index.expand(positions.shape[0], *index.shape) if positions.dim() == 3 else index
        new_positions = positions.gather(-1, gather)

        kwargs["inputs_embeds"] = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, width))
        kwargs["attention_mask"] = new_mask.long()
        kwargs["position_ids"] = new_positions
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", False)
        cache = kwargs.get(cache_key)
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=module.config)
            kwargs[cache_key] = cache
        if cache is not None:
            setattr(
                cache,
                _STATE_ATTRIBUTE,
                _PrefillState(self._id, new_mask.long(), index.shape[1], length, new_positions[..., -1:].clone()),
            )
        num_visual = int(flat_index.numel())
        kept_visual = int(survive.reshape(-1)[flat_index].sum())
        self.last_prefill = PrefillStats(
            length, index.shape[1], num_visual, kept_visual, int(group.max()) + 1 if num_visual else 0
        )
        if self.record_plans:
            self.last_plans = [
                GroupPlan(modality, image, local, plan if llm_plans is None else llm_plans[global_id])
                for modality, image, local, global_id, plan in pending.plans
                if (plan if llm_plans is None else llm_plans.get(global_id)) is not None
            ]
        return kwargs

    def _decode(self, kwargs: dict[str, Any], state: _PrefillState, cache: Any) -> dict[str, Any]:
        embeds = kwargs["inputs_embeds"]
        batch, num_new = embeds.shape[:2]
        if batch != state.mask.shape[0]:
            raise RuntimeError(
                f"the cache holds {state.mask.shape[0]} reduced rows but this step has {batch}; tokred.vlm does "
                "not support changing the batch of a reduced cache"
            )
        past = cache.get_seq_length()
        tail = past + num_new - state.prefill_length
        incoming = kwargs.get("attention_mask")
        mask = state.mask.to(embeds.device)
        if isinstance(incoming, torch.Tensor) and incoming.dim() == 2 and incoming.shape[1] >= tail:
            extra = incoming[:, incoming.shape[1] - tail :].to(mask.dtype)
        else:
            extra = torch.ones((batch, tail), dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = torch.cat([mask, extra], dim=1)
        kwargs["position_ids"] = decode_positions(
            state.last_position.to(embeds.device), past, state.prefill_length, num_new
        )
        return kwargs


def _placeholder_id(config: Any, modality: str) -> int | None:
    """The placeholder token id of ``modality``: ``image_token_id`` (Qwen, newer configs) or ``image_token_index``."""
    token_id = getattr(config, f"{modality}_token_id", None)
    return token_id if token_id is not None else getattr(config, f"{modality}_token_index", None)


def _bind(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments of a call by name, with ``**kwargs`` flattened in."""
    bound = inspect.signature(function).bind_partial(*args, **kwargs).arguments
    extra = bound.pop("kwargs", None)
    if isinstance(extra, dict):
        bound.update(extra)
    return dict(bound)


def _reduce_groups(
    reducer: Reducer, tokens: torch.Tensor, group: torch.Tensor, plans: dict[int, Reduction] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reducer on every group of tokens, batching groups of equal size.

    Args:
        reducer: The reducer.
        tokens: ``(T, C)`` tokens of all groups.
        group: Long ``(T,)`` group id of each token; ``-1`` marks structural tokens (kept, unreduced).
        plans: If given, filled with the plan of each group (a batch of one, detached), by group id.

    Returns:
        ``(tokens, keep)``: ``(T, C)`` with each kept token replaced by what it carries after merging, and bool
        ``(T,)`` kept tokens.

    Raises:
        ValueError: If the reducer returns a plan that disagrees with its budget or the group.
    """
    out = tokens.clone()
    keep = group < 0
    ids = group[group >= 0]
    if ids.numel() == 0:
        return out, keep
    positions = torch.nonzero(group >= 0).squeeze(1)
    order = torch.argsort(ids, stable=True)
    sorted_ids, sorted_positions = ids[order], positions[order]
    counts = torch.unique_consecutive(sorted_ids, return_counts=True)[1]
    members = torch.split(sorted_positions, counts.tolist())
    by_size: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
    for member in members:
        by_size[member.numel()].append(member)
    for size, groups in by_size.items():
        index = torch.stack(groups)  # (G, n)
        reduction = reducer(tokens[index])
        expected = min(reducer.budget.resolve(size), size)  # attach() admits only Reducer instances
        kept = reduction.indices
        if (
            kept.dim() != 2
            or kept.shape[0] != index.shape[0]
            or kept.shape[1] != expected
            or reduction.tokens.shape[:2] != kept.shape
            or (kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= size))
            or (kept.shape[1] > 1 and not bool((kept[:, 1:] > kept[:, :-1]).all()))
        ):
            raise ValueError(
                f"reducer {reducer!r} returned {tuple(kept.shape)} kept indices and tokens of shape "
                f"{tuple(reduction.tokens.shape)} for {index.shape[0]} groups of {size} visual tokens; expected "
                f"indices of shape ({index.shape[0]}, {expected}), "
                "ascending and within the group, one token per kept placeholder"
            )
        if plans is not None:
            for row, member in enumerate(groups):
                plans[int(group[member[0]])] = _plan_row(reduction, row)
        chosen = index.gather(1, kept)
        out[chosen.reshape(-1)] = reduction.tokens.reshape(-1, tokens.shape[-1]).to(out.dtype)
        keep[chosen.reshape(-1)] = True
    return out, keep


def _plan_row(reduction: Reduction, row: int) -> Reduction:
    """Row ``row`` of a batched plan as a detached plan of batch one."""
    part = slice(row, row + 1)
    return Reduction(
        reduction.tokens[part].detach(),
        reduction.indices[part].detach(),
        reduction.sizes[part].detach(),
        reduction.assignment[part].detach(),
        reduction.weights[part].detach(),
    )


def attach(
    model: Any,
    reducer: Reducer,
    *,
    space: Literal["vision", "llm"] | None = None,
    positions: Literal["original", "compact"] | None = None,
    video_groups: Literal["frame", "video"] = "frame",
    record_plans: bool = False,
) -> Attachment:
    """Make ``model`` run with fewer visual tokens: ``model(**inputs)`` and ``model.generate(**inputs)`` unchanged.

    Every image, anyres crop or video frame is one token group that the reducer reduces to its budget on its
    own (``num_keep`` per group, or ``keep_ratio`` of each group); structural tokens — LLaVA-NeXT's row
    newlines, Video-LLaVA's per-frame class token, LLaVA-OneVision's video newline — are always kept and not
    counted. Nothing asks for attention weights, so every attention implementation works.

    Example:
        ```python
        from tokred.vlm import ApET, attach

        with attach(model, ApET(num_keep=64)):
            output = model.generate(**inputs, max_new_tokens=32)
        ```

    Args:
        model: A supported transformers model (:data:`~tokred.vlm.models.SUPPORTED_MODELS`), in eval mode.
        reducer: Any tokred :class:`~tokred.core.Reducer`, e.g. ``ApET(num_keep=64)``.
        space: ``"vision"`` reduces the vision features before the projector (ApET's LLaVA setting; merging
            happens in the vision tower's space), ``"llm"`` the projected embeddings. Default: the model
            family's, as in ApET's released code (LLaVA-1.5 and LLaVA-NeXT ``"vision"``, others ``"llm"``).
        positions: ``"original"`` keeps the position every kept token had in the full sequence (gaps where
            tokens were dropped); ``"compact"`` closes the gaps. Default: the family's (``"original"`` for the
            Qwen models' 3-D M-RoPE, ``"compact"`` for the LLaVA models, as in the released code).
        video_groups: ``"frame"`` gives each video frame its own budget, ``"video"`` one budget per video.
        record_plans: Keep the reducer's plan of every token group of each prefill in ``handle.last_plans``
            (a list of :class:`GroupPlan`: which tokens of which image survived, merged or were dropped), for
            pictures such as :func:`tokred.core.visualize.draw_reduction`. Off by default: the plans hold a
            copy of the reduced tokens.

    Returns:
        An :class:`Attachment`; call ``.detach()`` or use it as a context manager.

    Raises:
        TypeError: If the model is not supported (the message lists the supported classes) or ``reducer`` is
            not a tokred reducer.
        ValueError: On an unknown ``space``, ``positions`` or ``video_groups``, or ``space="vision"`` for a model
            without a one-to-one pre-projector token space.
        RuntimeError: If a reducer is already attached to this model.
    """
    family = family_of(model)
    if not isinstance(reducer, Reducer):
        raise TypeError(
            f"reducer must be a tokred Reducer (e.g. tokred.vlm.ApET(num_keep=64) or "
            f"tokred.core.create_reducer('random', num_keep=64)), got {type(reducer).__name__}"
        )
    if reducer.accepts_scores and reducer.requires_scores:
        raise ValueError(
            f"{type(reducer).__name__} needs model-supplied scores, which attach() does not provide; "
            "use an attention-free reducer such as ApET"
        )
    space = space or family.default_space
    positions = positions or family.default_positions
    if space not in ("vision", "llm"):
        raise ValueError(f"space must be 'vision' or 'llm', got {space!r}")
    if positions not in ("original", "compact"):
        raise ValueError(f"positions must be 'original' or 'compact', got {positions!r}")
    if video_groups not in ("frame", "video"):
        raise ValueError(f"video_groups must be 'frame' or 'video', got {video_groups!r}")
    if video_groups == "video" and family.name == "video_llava":
        raise ValueError(
            "video_groups='video' is not available for Video-LLaVA, which encodes each frame separately; "
            "use video_groups='frame'"
        )
    if space == "vision" and not family.vision_space:
        raise ValueError(f"space='vision' is not possible for {family.title}: {family.vision_space_reason}; use 'llm'")
    existing = getattr(model, _MARKER_ATTRIBUTE, None)
    if existing is not None:
        raise RuntimeError(
            f"a reducer is already attached to this model ({existing!r}); call .detach() on that handle first"
        )
    handle = Attachment(model, reducer, family, space, positions, video_groups, record_plans)
    handle._install()
    return handle
