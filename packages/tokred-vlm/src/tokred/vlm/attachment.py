"""``attach``: run any tokred reducer inside a transformers vision-language model, per instance.

How it works:

* The model's own ``get_image_features`` / ``get_video_features`` (and LLaVA-NeXT's ``pack_image_features``)
  are wrapped on the instance, so every time the model — or ``generate``, which encodes images before the
  prefill — encodes pixels, tokred records how each encoded image or video splits into groups (crops, frames)
  and, for ``space="vision"``, reduces the pre-projector features through a pre-hook on the projector
  ([`tokred.vlm.hooks.encoding`][tokred.vlm.hooks.encoding]).
* A forward pre-hook on the multimodal base model (``model.model``) finds the visual placeholder tokens of the
  call and matches them to those records ([`tokred.vlm.hooks.placeholders`][tokred.vlm.hooks.placeholders]).
* A forward pre-hook on the language decoder (``model.get_decoder()``) sees the merged embeddings and the
  positions the model computed, runs the reducer per group (``space="llm"``), drops the removed tokens from the
  embeddings, positions and mask, and stores a small state on the cache; later decode steps are translated from
  it ([`tokred.vlm.hooks.surgery`][tokred.vlm.hooks.surgery]).
* With inner stages (``layers={L: reducer}``), a forward pre-hook on every decoder layer from the first stage on
  shortens the hidden states at layer ``L`` and gives the later layers the short mask and rotary tables
  ([`tokred.vlm.hooks.stages`][tokred.vlm.hooks.stages]).

What is family-specific comes from the model's adapter ([`tokred.vlm.models`][tokred.vlm.models]). Nothing is
patched on a class; [`Attachment.detach`][tokred.vlm.Attachment.detach] removes every hook and wrapper and
leaves the model as it was. The state of a call lives in the objects of that call (the encoder's output, the
cache) or in per-thread storage between two hooks of one forward, so several threads may call ``generate`` on
one attached model at once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from tokred.core import create_reducer
from tokred.core.errors import (
    AttachError,
    IncompatibleReducerError,
    InvalidInputError,
    InvalidTypeError,
    UnsupportedError,
)
from tokred.core.reducer import Reducer
from tokred.vlm.flops import decoder_prefill_flops
from tokred.vlm.hooks.encoding import EncodeRecorder, bind_arguments
from tokred.vlm.hooks.placeholders import VisualTokens, collect_visual_tokens, encode_pixels
from tokred.vlm.hooks.stages import (
    InnerStage,
    StageContext,
    enter_stage,
    has_stage_states,
    layer_types,
    open_context,
)
from tokred.vlm.hooks.surgery import (
    PrefillResult,
    Survivors,
    cache_of,
    forget_states,
    reduce_prefill,
    sequence_state,
    skip_cached_tokens,
    translate_decode,
)
from tokred.vlm.models.base import ModelAdapter, Positions, Space, VideoGroups, adapter_class_for
from tokred.vlm.results import GroupPlan, PrefillStats

__all__ = ["Attachment", "attach"]

_MARKER_ATTRIBUTE = "_tokred_vlm_attachment"
_handle_ids = itertools.count()


class Attachment:
    """The handle [`attach`][tokred.vlm.attach] returns: it owns the hooks and removes them on ``detach()``.

    Usable as a context manager; leaving the block detaches. The same protocol as
    [`tokred.mamba.Attachment`][tokred.mamba.Attachment].

    Attributes:
        model: The model the reducer is attached to.
        reducer: The reducer that runs on each token group.
        adapter: The model's [`ModelAdapter`][tokred.vlm.models.ModelAdapter].
        space: ``"vision"`` or ``"llm"``.
        positions: ``"original"`` or ``"compact"``.
        video_groups: ``"frame"`` or ``"video"``: the token group of a video.
        record_plans: Whether each prefill records the reducer's plans.
        stages: The inner stages (``attach(..., layers=...)``), in layer order.
        last_stats: [`PrefillStats`][tokred.vlm.PrefillStats] of the most recent reduced prefill (under
            concurrent calls, of the one that finished last), or None before the first.
        last_plans: With ``record_plans``, the [`GroupPlan`][tokred.vlm.GroupPlan] of every token group of the
            most recent reduced prefill, in the order the groups appear in the batch; otherwise None.
    """

    def __init__(
        self,
        model: Any,
        reducer: Reducer,
        adapter: ModelAdapter,
        space: Space,
        positions: Positions,
        video_groups: VideoGroups,
        record_plans: bool = False,
        stages: tuple[InnerStage, ...] = (),
    ) -> None:
        self.model = model
        self.reducer = reducer
        self.adapter = adapter
        self.space = space
        self.positions = positions
        self.video_groups = video_groups
        self.record_plans = record_plans
        self.stages = stages
        self.last_stats: PrefillStats | None = None
        self.last_plans: list[GroupPlan] | None = None
        self._id = next(_handle_ids)
        self._undo: list[Callable[[], None]] = []
        self._attached = False
        self._base = model.model
        self._decoder = model.get_decoder()
        self._layer_types = layer_types(self._decoder)
        self._stage_at = {stage.layer: stage for stage in stages}
        self._encoder = EncodeRecorder(self._id, adapter, reducer, space, video_groups, record_plans)
        # Visual tokens found by the base-model hook for the decoder hook of the same forward. Per thread:
        # the two hooks of one forward run in one thread, and other threads' forwards must not see them.
        self._calls = threading.local()
        self._publish = threading.Lock()

    # -------------------------------------------------------------------------------------------- install
    def _install(self) -> None:
        """Register the hooks and wrappers on this model instance."""
        model, base = self.model, self._base
        hooks = [
            model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True),
            base.register_forward_pre_hook(self._base_pre_hook, with_kwargs=True),
            self._decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True),
            # The hand-off of one forward must not outlive it, even when the forward raises.
            self._decoder.register_forward_hook(self._decoder_done, always_call=True),
        ]
        if self.space == "vision":
            hooks.append(self.adapter.projector().register_forward_pre_hook(self._encoder.projector_pre_hook))
        if self.stages:
            for index in range(self.stages[0].layer, len(self._layer_types)):
                layer = self._decoder.layers[index]
                hooks.append(
                    layer.register_forward_pre_hook(functools.partial(self._layer_pre_hook, index), with_kwargs=True)
                )
        self._undo.extend(hook.remove for hook in hooks)
        for modality in self.adapter.modalities:
            self._wrap(base, f"get_{modality}_features", functools.partial(self._encoder.encode, modality))
        if self.adapter.packed_modalities:
            self._wrap(base, "pack_image_features", self._encoder.pack)
        self._wrap_loss_function()
        setattr(model, _MARKER_ATTRIBUTE, self)
        self._attached = True

    def _wrap(self, owner: Any, name: str, replacement: Callable[..., Any]) -> None:
        """Replace ``owner.name`` on the instance by ``replacement(original, *args, **kwargs)``.

        ``functools.wraps`` keeps the signature, which ``generate`` inspects to find the method's arguments.
        """
        if name in vars(owner):
            raise AttachError(f"{type(owner).__name__}.{name} is already overridden on this instance")
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return replacement(original, *args, **kwargs)

        setattr(owner, name, wrapper)
        self._undo.append(lambda: delattr(owner, name))

    def _wrap_loss_function(self) -> None:
        """Route the model's loss through [`_loss_function`][tokred.vlm.Attachment._loss_function], on the instance.

        ``PreTrainedModel.loss_function`` is a property whose setter stores ``_loss_function``; a value set there
        before attach is restored on detach.
        """
        model = self.model
        had_own = "_loss_function" in vars(model)
        previous = vars(model).get("_loss_function")
        original = model.loss_function

        @functools.wraps(original)
        def loss_function(*args: Any, **kwargs: Any) -> Any:
            return self._loss_function(original, *args, **kwargs)

        model._loss_function = loss_function

        def undo() -> None:
            if had_own:
                model._loss_function = previous
            else:
                del model._loss_function

        self._undo.append(undo)

    def detach(self) -> None:
        """Remove every hook and wrapper; the model behaves exactly as before [`attach`][tokred.vlm.attach].

        Calling it twice is harmless.
        """
        if not self._attached:
            return
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
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

    # ---------------------------------------------------------------------------------------------- hooks
    def _top_pre_hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Note whether this call computes a loss: the prefill then hands its survivor columns to the loss."""
        if args:
            kwargs = bind_arguments(module.forward, args, kwargs)
        self._calls.loss = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None
        self._calls.survivors = None

    def _loss_function(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The model's loss on the reduced sequence: labels gathered with the prefill's survivor columns.

        Visual positions carry the ignore index, so the gathered labels define the loss over exactly the text
        tokens the full sequence had; when nothing was dropped the labels are used as given.
        """
        survivors: Survivors | None = getattr(self._calls, "survivors", None)
        self._calls.survivors = None
        if survivors is not None:
            for key in ("labels", "shift_labels"):
                if kwargs.get(key) is not None:
                    kwargs[key] = survivors.gather_labels(kwargs[key])
        return original(*args, **kwargs)

    def _base_pre_hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Find the call's visual tokens and hand them to the decoder hook (encoding a plain call's pixels)."""
        self._calls.visual = None
        if args:
            kwargs = bind_arguments(module.forward, args, kwargs)
            args = ()
        newly_encoded = encode_pixels(module, self.adapter.modalities, kwargs)
        encoded = newly_encoded if newly_encoded is not None else dict(kwargs.get("mm_encoder_outputs") or {})
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        _, cache = cache_of(kwargs)
        has_visual = any(encoded.get(m) is not None for m in self.adapter.modalities)
        state = sequence_state(cache, self._id)
        past = 0
        if cache is not None and (has_visual or state is not None or has_stage_states(cache, self._id)):
            past = int(cache.get_seq_length())
            if past == 0:
                # An emptied cache starts a new sequence: the last one's states would re-map its positions.
                forget_states(cache)
                state = None
        if not has_visual:
            # No visual inputs: text, a decode step, or placeholders without pixels (which the model embeds as
            # ordinary tokens, and so does an attached model). A cache continued with the whole sequence again
            # is the one case that needs rewriting.
            if state is None:
                return None
            return args, skip_cached_tokens(kwargs, state, past)
        if past > 0:
            raise UnsupportedError(
                "tokred.vlm reduces visual tokens only in a prefill that starts from an empty cache: continuing a "
                "cache with new images or videos, and chunked prefill (generate's prefill_chunk_size), are not "
                "supported; run the whole conversation in one call, with prefill_chunk_size=None"
            )
        self._calls.visual = collect_visual_tokens(
            module,
            self.adapter,
            self._id,
            encoded,
            input_ids,
            embeds,
            vision_space=self.space == "vision",
            record_plans=self.record_plans,
        )
        if newly_encoded is None:
            return None
        kwargs["mm_encoder_outputs"] = newly_encoded
        return args, kwargs

    def _decoder_pre_hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Reduce the prefill the base model prepared, or translate a decode step of a reduced sequence."""
        visual: VisualTokens | None = getattr(self._calls, "visual", None)
        self._calls.visual = None
        if args:
            kwargs = bind_arguments(module.forward, args, kwargs)
            args = ()
        if visual is not None:
            visual.raise_if_mismatched()  # the model accepted placeholders its features do not fill
            kwargs, result = reduce_prefill(
                module,
                kwargs,
                visual,
                self.reducer,
                owner=self._id,
                positions=self.positions,
                record_plans=self.record_plans,
            )
            if getattr(self._calls, "loss", False):
                self._calls.survivors = result.survivors
            if self.stages:  # published when the inner stages have run, at the end of the decoder's forward
                embeds = kwargs["inputs_embeds"]
                self._calls.stages = open_context(
                    kwargs, *embeds.shape[:2], embeds.device, prefill=True, group=result.groups
                )
                self._calls.pending = result
            else:
                self._publish_prefill(result.stats, result.plans)
            return args, kwargs
        _, cache = cache_of(kwargs)
        state = sequence_state(cache, self._id)
        if state is not None:
            kwargs = translate_decode(kwargs, state, cache)
        if self.stages and has_stage_states(cache, self._id):
            embeds = kwargs["inputs_embeds"]
            self._calls.stages = open_context(kwargs, *embeds.shape[:2], embeds.device, prefill=False, group=None)
        return (args, kwargs) if state is not None else None

    def _layer_pre_hook(
        self, index: int, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Layer ``index`` of a schedule with inner stages: enter a stage here, or run on the short arguments.

        Does nothing outside a decoder call of this model (a layer called on its own has no context).
        """
        context: StageContext | None = getattr(self._calls, "stages", None)
        if context is None:
            return None
        hidden = args[0]
        stage = self._stage_at.get(index)
        if stage is not None:
            shortened = enter_stage(
                self._decoder,
                stage,
                context,
                hidden,
                kwargs,
                types=self._layer_types,
                owner=self._id,
                positions=self.positions,
            )
            if shortened is not None:
                hidden = shortened
        short = context.short
        if short is None:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = short.masks[self._layer_types[index]]
        kwargs["position_embeddings"] = short.position_embeddings
        if kwargs.get("position_ids") is not None or short.position_ids is not None:
            kwargs["position_ids"] = short.position_ids
        return (hidden, *args[1:]), kwargs

    def _decoder_done(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """End the decoder call: publish a prefill with inner stages, drop what the call handed on."""
        self._calls.visual = None
        context: StageContext | None = getattr(self._calls, "stages", None)
        pending: PrefillResult | None = getattr(self._calls, "pending", None)
        self._calls.stages = self._calls.pending = None
        if context is not None and pending is not None:
            stats = dataclasses.replace(pending.stats, stages=tuple(context.stats))
            self._publish_prefill(stats, pending.plans)
            if getattr(self._calls, "loss", False) and context.short is not None:
                # The logits are in the last stage's columns: compose the plans for the labels.
                first = pending.survivors
                columns = context.columns if first is None else first.index.gather(1, context.columns)
                self._calls.survivors = Survivors(columns, context.mask)

    def _publish_prefill(self, stats: PrefillStats, plans: list[GroupPlan] | None) -> None:
        """Make one prefill's stats (completed with the decoder's per-layer FLOPs) and plans the latest."""
        num_layers = len(self._layer_types)
        config = self._decoder.config
        stats = dataclasses.replace(stats, num_layers=num_layers)  # layer_lengths needs the depth
        stats = dataclasses.replace(
            stats,
            decoder_flops=decoder_prefill_flops(config, stats.layer_lengths, stats.batch),
            dense_decoder_flops=decoder_prefill_flops(config, [stats.original_length] * num_layers, stats.batch),
        )
        with self._publish:  # the stats and plans of one prefill are published together
            self.last_stats = stats
            if self.record_plans:
                self.last_plans = plans


def _check_reducer(reducer: Reducer) -> None:
    """Refuse a reducer no model can run under tokred.vlm, before any model is touched (the CLI asks early)."""
    if reducer.needs_scores is not None:
        raise IncompatibleReducerError(
            f"{type(reducer).__name__} ranks tokens by {reducer.needs_scores!r} scores, which tokred.vlm does not "
            "supply (it asks the model for no attention weights or other scores); use a reducer that needs none, "
            "such as ApET"
        )
    if reducer.budget is None:
        raise IncompatibleReducerError(
            f"{reducer!r} has no budget; give it one, e.g. {type(reducer).__name__}(num_keep=64) or keep_ratio=0.25: "
            "every image, crop or frame keeps that many of its visual tokens"
        )


def _inner_stages(model: Any, layers: Mapping[int, Reducer] | None, positions: Positions) -> tuple[InnerStage, ...]:
    """Check ``attach``'s ``layers`` and order them into stages."""
    if layers is None:
        return ()
    if not isinstance(layers, Mapping):
        raise InvalidTypeError(
            f"layers must be a dict from a decoder layer to a reducer, e.g. {{16: ApET(num_keep=32)}}; got "
            f"{type(layers).__name__}"
        )
    decoder = model.get_decoder()
    num_layers = len(decoder.layers)
    stages = []
    for layer, reducer in sorted(layers.items(), key=lambda item: item[0] if isinstance(item[0], int) else -1):
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers - 1:
            raise InvalidInputError(
                f"layers: {layer!r} is not a decoder layer an inner stage can follow; this model has {num_layers} "
                f"decoder layers, so use an integer L from 1 to {num_layers - 1} (the stage runs after the first L)"
            )
        if not isinstance(reducer, Reducer):
            raise InvalidTypeError(
                f"layers[{layer}] must be a tokred Reducer such as ApET(num_keep=32); got {type(reducer).__name__}"
            )
        _check_reducer(reducer)
        stages.append(InnerStage(layer, reducer))
    if stages and positions == "compact" and getattr(decoder.config, "rope_parameters", {}).get("mrope_section"):
        raise IncompatibleReducerError(
            "inner stages with positions='compact' are not available for M-RoPE models (Qwen): there is no "
            "canonical way to close the gaps of 3-D positions inside the language model; use positions='original'"
        )
    return tuple(stages)


def _resolve_reducer(reducer: Any, config: dict[str, Any]) -> Reducer:
    if isinstance(reducer, type):
        name = getattr(reducer, "name", "") or ""
        by_name = f" or its registered name ({name!r})" if name else ""
        raise InvalidTypeError(
            f"attach needs a reducer instance, such as {reducer.__name__}(num_keep=64){by_name}, not the class "
            f"{reducer.__name__}"
        )
    if isinstance(reducer, str):
        return create_reducer(reducer, **config)
    if not isinstance(reducer, Reducer):
        raise InvalidTypeError(
            "reducer must be a tokred Reducer (e.g. tokred.vlm.ApET(num_keep=64)) or a registered name such as "
            f"'apet'; got {type(reducer).__name__}"
        )
    if config:
        raise InvalidTypeError(
            f"reducer options ({', '.join(sorted(config))}) go with a reducer given by name; "
            f"{type(reducer).__name__} is already built"
        )
    return reducer


def attach(
    model: Any,
    reducer: Reducer | str,
    *,
    layers: Mapping[int, Reducer] | None = None,
    space: Space | None = None,
    positions: Positions | None = None,
    video_groups: VideoGroups = "frame",
    record_plans: bool = False,
    **reducer_config: Any,
) -> Attachment:
    """Make ``model`` run with fewer visual tokens: ``model(**inputs)`` and ``model.generate(**inputs)`` unchanged.

    Every image, anyres crop or video frame is one token group that the reducer reduces to its budget on its
    own (``num_keep`` per group, or ``keep_ratio`` of each group); structural tokens — LLaVA-NeXT's row
    newlines, Video-LLaVA's per-frame class token, LLaVA-OneVision's video newline — are always kept and not
    counted. Nothing asks for attention weights, so every attention implementation works.

    Examples:
        ```python
        from tokred.vlm import ApET, attach

        with attach(model, ApET(num_keep=64)) as handle:  # or attach(model, "apet", num_keep=64)
            output = model.generate(**inputs, max_new_tokens=32)
        print(handle.last_stats)  # prefill length before and after, visual tokens kept
        ```

    Args:
        model: A supported transformers model (see [`tokred.vlm.models`][tokred.vlm.models]), in eval mode.
        reducer: Any tokred [`Reducer`][tokred.core.Reducer] with a budget, e.g. ``ApET(num_keep=64)``, or a
            registered name whose hyper-parameters and budget are given as ``reducer_config``.
        layers: Inner stages, ``{L: reducer_L, ...}``: after the first ``L`` decoder layers, each group's
            surviving visual tokens are reduced again by ``reducer_L`` on the language model's hidden states, and
            the layers from ``L`` on run on the shorter sequence with a shorter KV cache. ``L`` is from 1 to the
            number of decoder layers minus 1; stages run in the order of their layers, each on what the one
            before left (a budget at least that large keeps everything). Any reducer with a budget works;
            [`paper_schedule`][tokred.vlm.paper_schedule] gives ApET's two-stage schedule from an average budget.
        space: ``"vision"`` reduces the vision features before the projector (ApET's LLaVA setting; merging
            happens in the vision tower's space), ``"llm"`` the projected embeddings. Default: the model
            family's, as in ApET's released code (LLaVA-1.5 and LLaVA-NeXT ``"vision"``, others ``"llm"``).
        positions: ``"original"`` keeps the position every kept token had in the full sequence (gaps where
            tokens were dropped); ``"compact"`` closes the gaps. Default: the family's (``"original"`` for the
            Qwen models' 3-D M-RoPE, ``"compact"`` for the LLaVA models, as in the released code).
        video_groups: ``"frame"`` gives each video frame its own budget, ``"video"`` one budget per video.
        record_plans: Keep the reducer's plan of every token group of each prefill in ``handle.last_plans``
            (a list of [`GroupPlan`][tokred.vlm.GroupPlan]: which tokens of which image survived, merged or were
            dropped), for pictures such as [`draw_reduction`][tokred.bench.visualize.draw_reduction]. Off by
            default: the plans hold a copy of the reduced tokens.
        **reducer_config: The hyper-parameters and budget of a reducer given by name (``num_keep=64``).

    Returns:
        An [`Attachment`][tokred.vlm.Attachment]; call ``.detach()`` or use it as a context manager.

    Raises:
        InvalidTypeError: If the model is not supported (the message lists the supported classes), or
            ``reducer`` is a class, not a reducer, or an instance given together with options.
        IncompatibleReducerError: If a reducer (of any stage) has no budget or needs scores the model cannot
            supply, or the options ask for something the model family cannot do (``space="vision"`` without a
            vision space, inner stages with compact M-RoPE positions).
        InvalidInputError: On an unknown ``space``, ``positions`` or ``video_groups``, or a ``layers`` key that is
            not a decoder layer an inner stage can follow.
        AttachError: If a reducer is already attached to this model.
    """
    adapter = adapter_class_for(model)(model)
    built = _resolve_reducer(reducer, reducer_config)
    _check_reducer(built)
    space = space or adapter.default_space
    positions = positions or adapter.default_positions
    if space not in ("vision", "llm"):
        raise InvalidInputError(f"space must be 'vision' or 'llm', got {space!r}")
    if positions not in ("original", "compact"):
        raise InvalidInputError(f"positions must be 'original' or 'compact', got {positions!r}")
    if video_groups not in ("frame", "video"):
        raise InvalidInputError(f"video_groups must be 'frame' or 'video', got {video_groups!r}")
    adapter.check_options(space, positions, video_groups)
    existing = getattr(model, _MARKER_ATTRIBUTE, None)
    if existing is not None:
        raise AttachError(
            f"a reducer is already attached to this model ({existing!r}); call .detach() on that handle first"
        )
    stages = _inner_stages(model, layers, positions)
    handle = Attachment(model, built, adapter, space, positions, video_groups, record_plans, stages)
    handle._install()
    return handle
