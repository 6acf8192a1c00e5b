"""Training the reference LLaVA from scratch on pattern scenes, deterministically, on the CPU.

A tiny LLaVA trained on the answers alone learns the prior of each question kind and then stalls for longer
than a CPU budget allows: its vision tower has to discover colours and patterns and its decoder has to discover
where to look, and neither gets a signal until the other works. Training therefore adds auxiliary losses that
say what each part should compute; all of them act on full token sets (no token is ever dropped or merged, so
benchmarks measure training-free reduction), their small heads are discarded, and the saved model is a plain
``LlavaForConditionalGeneration``.

* **Phase 1** trains the vision tower alone on per-patch labels from the scene's ground truth
  ([`patch_targets`][tokred.bench.training.llava.patch_targets]): the colour and pattern of the object covering
  each patch, and the patch's own column.
* **Phase 2** trains everything on the questions: fresh scenes every step (``images_per_step`` of the ``train``
  split), ``questions_per_image`` questions each
  ([`questions_for_scene`][tokred.bench.reference.questions.questions_for_scene]), the cross-entropy of
  the one answer token, plus

  - the per-patch loss of phase 1;
  - *keyword*: head 0 of the first decoder layer, at the question's colour and pattern words, should attend
    to the patches of the objects with that colour or pattern
    ([`keyword_target`][tokred.bench.training.llava.keyword_target]);
  - *attention*: heads 0 and 1 of the last decoder layer, at the answer position, should attend to the
    patches of the objects that hold the answer, a count's mass per object, a comparison's two objects (or,
    with ``position_target="color_words"``, the question's two colour words) one per head
    ([`attention_target`][tokred.bench.training.llava.attention_target]).

The vision tower runs once per image and its output is shared by the image's questions; everything else is
exactly ``model(**processor(...))`` of each (question, image) prompt (a test checks the logits agree).

Deterministic: fixed seeds, no dropout, and a fixed thread count (``torch.set_num_threads``); the same config
and thread count give the same weights on the same machine.

Examples:
    >>> from tokred.bench.reference.llava import ModelShape
    >>> from tokred.bench.training.llava import TrainConfig, train
    >>> shape = ModelShape(image_size=32, patch_size=8, vision_width=16, text_width=16)
    >>> config = TrainConfig(shape=shape, vision_steps=1, steps=2, images_per_step=2, questions_per_image=2)
    >>> len(train(config).losses)
    2
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokred.bench.reference import CARD_NAME
from tokred.bench.reference.llava import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    ModelShape,
    build_model,
    build_processor,
    encode,
    evaluate,
    load_reference_model,
    pixel_values,
    prompt,
    score,
)
from tokred.bench.reference.questions import (
    ANSWERS,
    QUESTION_KINDS,
    Question,
    make_questions,
    questions_for_scene,
)
from tokred.bench.scenes import COLORS, MAX_OBJECTS, PATTERNS, SceneSet, make_scenes
from tokred.bench.training.probes import linear_probe_accuracy, llava_layer_features
from tokred.core.errors import InvalidInputError

_POSITION_TARGETS = ("objects", "color_words")

__all__ = [
    "HELD_OUT_QUESTIONS",
    "PATCH_CLASSES",
    "SMALL_HELD_OUT_QUESTIONS",
    "PromptTokens",
    "TrainConfig",
    "TrainResult",
    "answer_ids",
    "attention_target",
    "color_word_positions",
    "diagnose",
    "keyword_target",
    "patch_owners",
    "patch_targets",
    "question_loss",
    "relevant_patches",
    "save_checkpoint",
    "train",
    "write_card",
]


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a training run.

    Attributes:
        shape: Model sizes.
        vision_steps: Steps of phase 1, which trains the vision tower alone on the per-patch loss
            ([`patch_targets`][tokred.bench.training.llava.patch_targets]), so that the decoder starts from informative
            visual tokens.
        vision_batch: Scenes per phase-1 step.
        vision_learning_rate: Peak learning rate of phase 1.
        steps: Steps of phase 2, which trains the whole model on the questions (and the auxiliary losses).
        images_per_step: Scenes per phase-2 step, ``B``.
        questions_per_image: Questions per scene, ``Q``: each phase-2 step has ``B * Q`` answers.
        per_kind: Questions of each kind drawn per scene before the list is filled or cut to ``Q``.
        learning_rate: Peak AdamW learning rate of phase 2.
        min_learning_rate: Learning rate at the end of each cosine decay.
        warmup_steps: Steps of linear warm-up from 0, in each phase.
        weight_decay: AdamW weight decay (not applied to norms, biases and embeddings).
        betas: AdamW betas.
        grad_clip: Clip of the global gradient norm (0: none).
        patch_weight: Weight of the per-patch loss on the vision features in phase 2 (0: none).
        attention_weight: Weight of the loss on heads 0 and 1 of the last decoder layer at the answer position:
            cross-entropy against [`attention_target`][tokred.bench.training.llava.attention_target] (0: none).
        keyword_weight: Weight of the loss on head 0 of the first decoder layer at the question's colour and
            pattern words: cross-entropy against
            [`keyword_target`][tokred.bench.training.llava.keyword_target] (0: none).
        position_target: Where the attention loss sends the two heads for a ``position`` question:
            ``"objects"`` (the two objects' patches; the shipped model's recipe) or ``"color_words"`` (the
            question's two colour words); see
            [`attention_target`][tokred.bench.training.llava.attention_target].
        seed: Seed of the weight initialisation and of the question draws.
        threads: ``torch.set_num_threads`` during training (part of what makes a run reproducible).
        log_every: Steps between two log lines.
    """

    shape: ModelShape = field(default_factory=ModelShape)
    vision_steps: int = 400
    vision_batch: int = 32
    vision_learning_rate: float = 6e-3
    steps: int = 900
    images_per_step: int = 16
    questions_per_image: int = 6
    per_kind: int = 2
    learning_rate: float = 2e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    patch_weight: float = 1.0
    attention_weight: float = 1.0
    keyword_weight: float = 1.0
    position_target: str = "objects"
    seed: int = 0
    threads: int = 1
    log_every: int = 50

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return asdict(self)


@dataclass
class TrainResult:
    """What [`train`][tokred.bench.training.llava.train] returns.

    Attributes:
        model: The trained ``LlavaForConditionalGeneration`` (fp32, eval mode).
        processor: Its processor.
        losses: Mean training loss of every step.
        wall_time_s: Wall time of the training loop in seconds (scene rendering included, evaluation not).
        config: The config it was trained with.
    """

    model: Any
    processor: Any
    losses: list[float]
    wall_time_s: float
    config: TrainConfig


HELD_OUT_QUESTIONS = 1000
"""Questions of the ``test`` split the card's accuracy is measured on."""
SMALL_HELD_OUT_QUESTIONS = 128
"""The first questions of that set whose accuracy the card also records (the tests check it)."""


class PromptTokens:
    """Token ids of the training prompts, exactly as the processor makes them at inference.

    The prompt ``"<s> USER: <image>*n {question} ASSISTANT:"`` is tokenised once per question text (cached);
    a batch is left-padded like the processor's.

    Args:
        processor: The reference processor.
        visual_tokens: Placeholders per image, ``n``.
    """

    def __init__(self, processor: Any, visual_tokens: int) -> None:
        self.processor = processor
        self.visual_tokens = visual_tokens
        self._ids: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        """Token ids of the whole prompt of the question ``text``."""
        if text not in self._ids:
            full = prompt(text).replace(IMAGE_TOKEN, IMAGE_TOKEN * self.visual_tokens)
            self._ids[text] = self.processor.tokenizer(full)["input_ids"]
        return self._ids[text]

    def batch(self, questions: list[list[Question]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask, both ``(B * Q, L)``, image by image."""
        rows = [self.ids(q.text) for per_image in questions for q in per_image]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), PAD_TOKEN_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, length - len(row) :] = torch.tensor(row)
            mask[i, length - len(row) :] = 1
        return ids.to(device), mask.to(device)


def question_loss(
    model: Any,
    pixels: torch.Tensor,
    tokens: PromptTokens,
    questions: list[list[Question]],
    *,
    return_logits: bool = False,
    return_features: bool = False,
    return_attention: bool = False,
) -> Any:
    """Mean cross-entropy of the answer tokens, with one vision-tower pass per image.

    Computes what ``model(**processor(...))`` computes for every (image, question) prompt, except that the
    vision tower and the projector run once per image and their output is shared by its questions.

    Args:
        model: A reference ``LlavaForConditionalGeneration``.
        pixels: fp32 ``(B, 3, H, W)``, normalised as the processor does
            ([`pixel_values`][tokred.bench.reference.llava.pixel_values]).
        tokens: The prompt tokenisation.
        questions: ``B`` lists of ``Q`` questions each (the same ``Q`` for every image).
        return_logits: Also return the answer-position logits ``(B * Q, V)``.
        return_features: Also return the vision features before the projector ``(B, n, C_vision)``.
        return_attention: Also return two attention maps, recomputed from the layers' inputs (the model keeps its
            ``sdpa``): heads 0 and 1 of the last decoder layer at the answer position ``(B * Q, 2, L)``, and head
            0 of the first layer at every position ``(B * Q, L, L)``.

    Returns:
        The scalar loss, followed by the logits and the features where asked for.

    Raises:
        ValueError: If the images do not all have the same number of questions.
    """
    batch = pixels.shape[0]
    per_image = len(questions[0])
    if len(questions) != batch or any(len(q) != per_image for q in questions):
        raise InvalidInputError("questions must hold the same number of questions for every image")
    config = model.config
    base = model.model
    # What LlavaModel.get_image_features computes, keeping the pre-projector features.
    hidden = base.vision_tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
    selected = hidden[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    features = base.multi_modal_projector(selected)  # (B, n, D)
    ids, mask = tokens.batch(questions, pixels.device)  # (B*Q, L)
    embeds = model.get_input_embeddings()(ids)
    image = (ids == config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image, features.repeat_interleave(per_image, dim=0).to(embeds.dtype))
    captured: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}  # the layers' inputs
    layers = base.language_model.layers
    hooks = []
    if return_attention:
        for number in {0, len(layers) - 1}:

            def capture(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], number: int = number) -> None:
                captured[number] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

            hooks.append(layers[number].self_attn.register_forward_pre_hook(capture, with_kwargs=True))
    try:
        output = base.language_model(inputs_embeds=embeds, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    logits = model.lm_head(output.last_hidden_state[:, -1])  # (B*Q, V)
    answers = answer_ids(tokens.processor, [q.answer for per in questions for q in per])
    loss = torch.nn.functional.cross_entropy(logits.float(), answers.to(pixels.device))
    out: tuple[Any, ...] = (loss,)
    if return_logits:
        out += (logits,)
    if return_features:
        out += (selected,)
    if return_attention:
        last = torch.full((ids.shape[0], 1), ids.shape[1] - 1, device=ids.device)
        final = layers[-1].self_attn, *captured[len(layers) - 1], mask, last
        answer = torch.stack([_head_attention(*final, head=h)[:, 0] for h in (0, 1)], dim=1)
        every = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        out += (answer, _head_attention(layers[0].self_attn, *captured[0], mask, every))
    return out[0] if len(out) == 1 else out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _head_attention(
    attention: Any,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    queries: torch.Tensor,
    head: int = 0,
) -> torch.Tensor:
    """Causal attention probabilities ``(N, m, L)`` of one head of a Llama attention layer at some positions.

    Args:
        attention: The layer's ``LlamaAttention``.
        hidden: ``(N, L, D)``, the layer's (normalised) input.
        rope: The ``(cos, sin)`` it received, each ``(N or 1, L, head_dim)``.
        mask: ``(N, L)`` padding mask, 1 for real tokens.
        queries: Long ``(N, m)``: the query positions of each row.
        head: The head (query and key heads coincide: the reference decoder has no grouped keys).
    """
    size = attention.head_dim
    part = slice(head * size, (head + 1) * size)
    rows = hidden.shape[0]
    cos, sin = (r.expand(rows, -1, -1) for r in rope)
    pick = queries.unsqueeze(-1).expand(-1, -1, size)
    query = attention.q_proj(hidden)[..., part].gather(1, pick)  # (N, m, hd)
    key = attention.k_proj(hidden)[..., part]  # (N, L, hd)
    query = query * cos.gather(1, pick) + _rotate_half(query) * sin.gather(1, pick)
    key = key * cos + _rotate_half(key) * sin
    logits = (query @ key.transpose(1, 2)).float() * attention.scaling  # (N, m, L)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    hidden_keys = (mask == 0).unsqueeze(1) | (positions.view(1, 1, -1) > queries.unsqueeze(-1))
    return logits.masked_fill(hidden_keys, float("-inf")).softmax(dim=-1)


def answer_ids(processor: Any, words: Sequence[str]) -> torch.Tensor:
    """Long ``(len(words),)``: the token id of each one-word answer.

    Raises:
        ValueError: If a word is not in the vocabulary.
    """
    ids = processor.tokenizer.convert_tokens_to_ids(list(words))
    if any(i == processor.tokenizer.unk_token_id for i in ids):
        raise InvalidInputError(f"an answer is not in the vocabulary: {list(words)}")
    return torch.tensor(ids, dtype=torch.long)


PATCH_CLASSES: tuple[int, ...] = (1 + len(COLORS), 1 + len(PATTERNS), 4)
"""Classes of the three per-patch targets of [`patch_targets`][tokred.bench.training.llava.patch_targets]: colour,
pattern (0: no object) and the patch's column quarter."""

_OWNED = 0.1  # least share of a patch an object must cover to own it


def patch_owners(scenes: SceneSet, shape: ModelShape) -> torch.Tensor:
    """Long ``(B, n)``: the object (index into ``scene.objects``) covering most of each patch, ``-1`` for none.

    An object owns a patch when it covers at least a tenth of it (the scenes' own visible-pixel masks).
    """
    coverage = scenes.patch_coverage(shape.patch_size)  # (B, K, n)
    best, owner = coverage.max(dim=1)
    return torch.where(best >= _OWNED, owner, -1)


def patch_targets(scenes: SceneSet, shape: ModelShape) -> torch.Tensor:
    """Per-patch labels of the auxiliary vision loss: what covers each patch, and where the patch is.

    Args:
        scenes: ``B`` rendered scenes, at the model's image size.
        shape: Model sizes (image and patch size).

    Returns:
        Long ``(B, n, 3)``, row-major patches: colour (0 none, else ``1 +`` index in ``COLORS``) and pattern (0
        none, else ``1 +`` index in ``PATTERNS``) of the owning object
        ([`patch_owners`][tokred.bench.training.llava.patch_owners]), and the patch's column quarter ``0..3`` (what
        ``position`` questions compare).
    """
    side = shape.image_size // shape.patch_size
    owners = patch_owners(scenes, shape)
    out = torch.zeros((len(scenes), shape.visual_tokens, 3), dtype=torch.long)
    out[..., 2] = torch.arange(side * side) % side * 4 // side
    colors = list(COLORS)
    for b, scene in enumerate(scenes.scenes):
        for i, obj in enumerate(scene.objects):
            out[b, owners[b] == i, 0] = 1 + colors.index(obj.color)
            out[b, owners[b] == i, 1] = 1 + PATTERNS.index(obj.pattern)
    return out


def relevant_patches(owners: torch.Tensor, question: Question) -> torch.Tensor:
    """Bool ``(n,)``: the patches of the objects that hold the answer (``question.objects``).

    Args:
        owners: ``(n,)``, the scene's row of [`patch_owners`][tokred.bench.training.llava.patch_owners].
        question: The question.
    """
    relevant = torch.zeros(owners.shape, dtype=torch.bool)
    for i in question.objects:
        relevant |= owners == i
    return relevant


def attention_target(
    owners: torch.Tensor,
    questions: list[list[Question]],
    mask: torch.Tensor,
    image: torch.Tensor,
    color_words: torch.Tensor | None = None,
    *,
    position_target: str = "objects",
) -> torch.Tensor:
    """Where heads 0 and 1 of the last layer should look from the answer position: ``(B * Q, 2, L)``, rows of 1.

    * ``color``, ``pattern``, a ``yes`` to ``exists``: both heads evenly over the patches of the objects that
      hold the answer ([`relevant_patches`][tokred.bench.training.llava.relevant_patches]).
    * ``count``: both heads put ``1 / (MAX_OBJECTS + 1)`` on each counted object (spread over its patches) and
      the rest on ``<s>``, so the attended mass says how many there are.
    * ``position``, with ``position_target="objects"`` (the shipped model's recipe): head 0 on the first
      object named, head 1 on the second. The shipped model's two heads learnt to look at both objects alike
      (about 46% of each head's mass on each), so its ``position`` answers are at chance: the image comes first
      and attention is causal, so no patch can know which colour the question names first.
    * ``position``, with ``position_target="color_words"``: head 0 on the question's first colour word, head 1
      on its second. The colour words can tell first from second, and the keyword loss
      ([`keyword_target`][tokred.bench.training.llava.keyword_target]) teaches each of them to gather its
      object's patches (their columns included) in the first layer. Tried on the full recipe: 92.9% held-out,
      ``position`` 51.6% (still little above chance), but the model came to depend on where the question sits
      in the sequence: with compact positions, every reducer, random included, fell to about 70% at 33% and
      11% of the tokens (91% at 22%). The shipped model keeps ``"objects"``.
    * No object holds the answer (a ``no``, a ``0``): all on ``<s>``.

    Args:
        owners: ``(B, n)`` from [`patch_owners`][tokred.bench.training.llava.patch_owners].
        questions: ``B`` lists of ``Q`` questions.
        mask: ``(B * Q, L)`` padding mask of the prompts.
        image: Bool ``(B * Q, L)``: the image positions.
        color_words: Bool ``(B * Q, L)``: the positions of the question's colour words
            ([`color_word_positions`][tokred.bench.training.llava.color_word_positions]); needed with
            ``position_target="color_words"``.
        position_target: ``"objects"`` or ``"color_words"``, where a comparison's two heads should look.

    Raises:
        InvalidInputError: On an unknown ``position_target``, or ``"color_words"`` without ``color_words``.
    """
    if position_target not in _POSITION_TARGETS:
        raise InvalidInputError(f"position_target must be one of {_POSITION_TARGETS}, not {position_target!r}")
    if position_target == "color_words" and color_words is None:
        raise InvalidInputError('position_target="color_words" needs the colour-word positions (color_words)')
    first = mask.long().argmax(dim=1)  # position of <s> in each left-padded row
    target = torch.zeros((mask.shape[0], 2, mask.shape[1]), dtype=torch.float32)
    row = 0
    for b, per_image in enumerate(questions):
        for question in per_image:
            places = torch.nonzero(image[row]).squeeze(1)
            groups = [places[owners[b] == i] for i in question.objects]
            groups = [g for g in groups if g.numel()]
            words = torch.nonzero(color_words[row]).squeeze(1) if color_words is not None else None
            for head in (0, 1):
                if question.kind == "position" and position_target == "objects" and len(groups) == 2:
                    target[row, head, groups[head]] = 1.0 / groups[head].numel()
                elif question.kind == "position" and words is not None and position_target == "color_words":
                    if words.numel() != 2:
                        raise InvalidInputError(f"a position question names two colours: {question.text!r}")
                    target[row, head, words[head]] = 1.0
                elif question.kind == "count":
                    for group in groups:
                        target[row, head, group] += 1.0 / (MAX_OBJECTS + 1) / group.numel()
                    target[row, head, first[row]] += 1.0 - float(target[row, head].sum())
                elif groups:
                    every = torch.cat(groups)
                    target[row, head, every] = 1.0 / every.numel()
                else:
                    target[row, head, first[row]] = 1.0
            row += 1
    return target


def color_word_positions(ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Bool ``(B * Q, L)``: where the prompts ``ids`` hold a colour word (after the image).

    Args:
        ids: Long ``(B * Q, L)`` prompt tokens.
        tokenizer: The reference tokenizer (one token per word).
    """
    color_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(COLORS)), dtype=torch.long)
    return torch.isin(ids, color_ids)


def keyword_target(
    scenes: SceneSet, owners: torch.Tensor, questions: list[list[Question]], ids: torch.Tensor, tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the question's colour and pattern words should look in the first layer, for the keyword loss.

    Every colour or pattern word of a question (after the image) should attend, with head 0 of the first
    decoder layer, evenly to the patches of the objects that have that colour or pattern (to ``<s>`` if none
    has): the question's words find their objects before the answer position gathers them.

    Returns:
        ``rows`` and ``positions``, long ``(K,)``, the keyword tokens, and their targets ``(K, L)``.
    """
    colors, patterns = set(COLORS), set(PATTERNS)
    tokens = tokenizer.convert_ids_to_tokens(ids.flatten().tolist())
    length = ids.shape[1]
    first = (ids != PAD_TOKEN_ID).long().argmax(dim=1)
    rows, positions, targets = [], [], []
    row = 0
    for b, per_image in enumerate(questions):
        for _ in per_image:
            places = torch.nonzero(ids[row] == IMAGE_TOKEN_ID).squeeze(1)  # left padding shifts them per row
            after = int(places[-1]) + 1
            for position in range(after, length):
                word = tokens[row * length + position]
                if word not in colors and word not in patterns:
                    continue
                attribute = "color" if word in colors else "pattern"
                held = [i for i, o in enumerate(scenes.scenes[b].objects) if getattr(o, attribute) == word]
                target = torch.zeros(length)
                where = places[torch.isin(owners[b], torch.tensor(held, dtype=torch.long))] if held else places[:0]
                if where.numel():
                    target[where] = 1.0 / where.numel()
                else:
                    target[first[row]] = 1.0
                rows.append(row)
                positions.append(position)
                targets.append(target)
            row += 1
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, length)
    return torch.tensor(rows), torch.tensor(positions), torch.stack(targets)


def _optimizer(model: Any, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        plain = parameter.dim() < 2 or "embed" in name or "norm" in name
        (no_decay if plain else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, foreach=False)


def _patch_loss(head: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the three per-patch targets; the pattern counted twice, and only on covered patches."""
    parts = [p.flatten(0, 1).float() for p in torch.split(head(features), PATCH_CLASSES, dim=-1)]
    flat = targets.flatten(0, 1)
    covered = flat[:, 1] > 0
    loss = sum(torch.nn.functional.cross_entropy(parts[i], flat[:, i]) for i in (0, 2))
    if covered.any():
        loss = loss + 2 * torch.nn.functional.cross_entropy(parts[1][covered], flat[covered, 1])
    return loss


def _vision_features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    config = model.config
    hidden = model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
    selected = hidden[config.vision_feature_layer]
    return selected[:, 1:] if config.vision_feature_select_strategy == "default" else selected


class _Log:
    def __init__(self, log: Callable[[str], None] | None, every: int, start: float) -> None:
        self.log, self.every, self.start = log, every, start
        self.values: dict[str, list[float]] = {}

    def add(self, **values: float) -> None:
        for name, value in values.items():
            self.values.setdefault(name, []).append(value)

    def step(self, phase: str, step: int, steps: int) -> None:
        if self.log is None or (step % self.every and step != steps):
            return
        parts = [f"{name} {sum(v[-self.every :]) / len(v[-self.every :]):.4f}" for name, v in self.values.items()]
        self.log(f"{phase} step {step}/{steps}  {'  '.join(parts)}  {time.perf_counter() - self.start:.0f}s")


def train(
    config: TrainConfig, *, device: str | torch.device = "cpu", log: Callable[[str], None] | None = None
) -> TrainResult:
    """Train a reference LLaVA from scratch, in two phases.

    Every hyper-parameter is a field of [`TrainConfig`][tokred.bench.training.llava.TrainConfig].

    Args:
        config: The hyper-parameters.
        device: Where to train; the shipped checkpoint is trained on ``"cpu"`` (other devices are for quick
            experiments and do not reproduce it bit for bit).
        log: Called with a progress line every ``config.log_every`` steps.

    Returns:
        The trained model (fp32, eval mode, on ``device``), its processor, the phase-2 answer losses and the
        wall time.
    """
    device = torch.device(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        start = time.perf_counter()
        shape = config.shape
        processor = build_processor(shape)
        model = build_model(shape, seed=config.seed).to(device).train()
        tokens = PromptTokens(processor, shape.visual_tokens)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            patch_head = torch.nn.Linear(shape.vision_width, sum(PATCH_CLASSES)).to(device)
        next_scene = 0

        def scenes_for(count: int) -> Any:
            nonlocal next_scene
            scenes = make_scenes(count, split="train", start=next_scene, image_size=shape.image_size)
            next_scene += count
            return scenes

        # Phase 1: the vision tower alone, on the per-patch targets.
        vision = torch.nn.ModuleDict({"tower": model.model.vision_tower, "patch": patch_head})
        optimizer = _optimizer(vision, config)
        tracker = _Log(log, config.log_every, start)
        for step in range(config.vision_steps):
            scenes = scenes_for(config.vision_batch)
            pixels = pixel_values(scenes.images.to(device), processor)
            _set_learning_rate(optimizer, config, step, config.vision_steps, config.vision_learning_rate)
            loss = _patch_loss(patch_head, _vision_features(model, pixels), patch_targets(scenes, shape).to(device))
            _update(optimizer, loss, config)
            tracker.add(**{"patch loss": loss.item()})
            tracker.step("vision", step + 1, config.vision_steps)

        # Phase 2: everything, on the questions.
        heads = torch.nn.ModuleDict({"model": model, "patch": patch_head})
        optimizer = _optimizer(heads, config)
        tracker = _Log(log, config.log_every, start)
        losses: list[float] = []
        for step in range(config.steps):
            scenes = scenes_for(config.images_per_step)
            questions = [
                questions_for_scene(s, config.per_kind, seed=config.seed, total=config.questions_per_image)
                for s in scenes.scenes
            ]
            pixels = pixel_values(scenes.images.to(device), processor)
            _set_learning_rate(optimizer, config, step, config.steps, config.learning_rate)
            answer_loss, features, attention, first_layer = question_loss(
                model, pixels, tokens, questions, return_features=True, return_attention=True
            )
            loss = answer_loss
            parts = {"answer loss": answer_loss.item()}
            if config.patch_weight > 0:
                patch = _patch_loss(patch_head, features, patch_targets(scenes, shape).to(device))
                loss = loss + config.patch_weight * patch
                parts["patch loss"] = patch.item()
            ids, mask = tokens.batch(questions, torch.device("cpu"))
            owners = patch_owners(scenes, shape)
            if config.attention_weight > 0:
                color_words = color_word_positions(ids, processor.tokenizer)
                target = attention_target(
                    owners, questions, mask, ids == IMAGE_TOKEN_ID, color_words, position_target=config.position_target
                )
                looking = -(target.to(device) * (attention + 1e-9).log()).sum(-1).mean()
                loss = loss + config.attention_weight * looking
                parts["attention loss"] = looking.item()
            if config.keyword_weight > 0:
                rows, places, target = keyword_target(scenes, owners, questions, ids, processor.tokenizer)
                if rows.numel():
                    finding = -(target.to(device) * (first_layer[rows, places] + 1e-9).log()).sum(-1).mean()
                    loss = loss + config.keyword_weight * finding
                    parts["keyword loss"] = finding.item()
            _update(optimizer, loss, config)
            losses.append(parts["answer loss"])
            tracker.add(**parts)
            tracker.step("answer", step + 1, config.steps)
        wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return TrainResult(model.eval(), processor, losses, wall, config)


def _set_learning_rate(
    optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, steps: int, peak: float
) -> None:
    if step < config.warmup_steps:
        rate = peak * (step + 1) / config.warmup_steps
    else:
        progress = (step - config.warmup_steps) / max(steps - config.warmup_steps, 1)
        rate = config.min_learning_rate + (peak - config.min_learning_rate) * 0.5 * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = rate


def _update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, config: TrainConfig) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip, foreach=False)
    optimizer.step()


def save_checkpoint(model: Any, processor: Any, folder: str | Path) -> Path:
    """Write ``model`` (as fp16 safetensors, with its generation config) and ``processor`` to ``folder``.

    The model itself is left in its dtype; a copy is halved for saving.

    Returns:
        The folder.
    """
    import copy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def diagnose(
    model: Any, processor: Any, held_out: Any, *, probe_questions: tuple[int, int] = (1500, 500)
) -> dict[str, Any]:
    """What the card records about a trained LLaVA before any reducer is measured.

    * ``probe``: the accuracy of a linear probe on the answer position's state after each decoder layer
      ([`llava_layer_features`][tokred.bench.training.probes.llava_layer_features]) predicting the answer word,
      fitted on ``train`` questions and measured on ``validation`` ones: where the answer forms.
    * ``evidence_patches``: per question kind, how many visual tokens the objects holding the answer cover at
      least half of (held-out questions with such objects): how spread the evidence is.

    Args:
        model: The trained model, eval mode, nothing attached.
        processor: Its processor.
        held_out: The held-out question set.
        probe_questions: ``train`` and ``validation`` questions of the probes.
    """
    size = model.config.vision_config.image_size
    patch = model.config.vision_config.patch_size
    fit = make_questions(probe_questions[0], split="train", image_size=size)
    check = make_questions(probe_questions[1], split="validation", image_size=size)
    words = {word: i for i, word in enumerate(ANSWERS)}

    def labels(questions: Any) -> torch.Tensor:
        return torch.tensor([words[q.answer] for q in questions.questions])

    fit_features = llava_layer_features(model, encode(fit, processor, 50))
    check_features = llava_layer_features(model, encode(check, processor, 50))
    probe = [
        round(linear_probe_accuracy(a, labels(fit), b, labels(check), classes=len(ANSWERS)), 3)
        for a, b in zip(fit_features, check_features, strict=True)
    ]
    covered = torch.nn.functional.avg_pool2d(held_out.masks.float(), patch).flatten(2) >= 0.5  # (N, K, n)
    evidence: dict[str, list[int]] = {}
    for row, question in enumerate(held_out.questions):
        if question.objects:
            count = int(covered[row, list(question.objects)].any(0).sum())
            evidence.setdefault(question.kind, []).append(count)
    return {
        "probe": {
            "what": "linear probe on the answer position after each decoder layer, predicting the answer word "
            "(train questions fitted, validation measured)",
            "train_questions": probe_questions[0],
            "eval_questions": probe_questions[1],
            "accuracy_after_layer": probe,
        },
        "evidence_patches": {
            "what": f"visual tokens ({patch} px patches) that the objects holding the answer cover at least half of",
            "of": (size // patch) ** 2,
            "mean_by_kind": {kind: round(sum(v) / len(v), 1) for kind, v in evidence.items()},
        },
    }


def write_card(
    folder: str | Path,
    result: TrainResult,
    *,
    command: str,
    device: str = "cpu",
    probe_questions: tuple[int, int] = (1500, 500),
) -> dict[str, Any]:
    """Evaluate the checkpoint in ``folder`` as users load it and write its card (``card.json``) there.

    The model is loaded with [`load_reference_model`][tokred.bench.reference.llava.load_reference_model] (fp16 weights
    run in fp32 on the CPU) and evaluated on the first
    [`HELD_OUT_QUESTIONS`][tokred.bench.training.llava.HELD_OUT_QUESTIONS] questions of the ``test`` split and on the
    first [`SMALL_HELD_OUT_QUESTIONS`][tokred.bench.training.llava.SMALL_HELD_OUT_QUESTIONS] of them (the set the tests
    check).

    Args:
        folder: A folder written by [`save_checkpoint`][tokred.bench.training.llava.save_checkpoint].
        result: The training run that produced it.
        command: The command line that produced it.
        device: The device it was trained on.
        probe_questions: ``train`` and ``validation`` questions of the card's probes
            ([`diagnose`][tokred.bench.training.llava.diagnose]).

    Returns:
        The card.
    """
    import platform

    import transformers

    folder = Path(folder)
    model, processor = load_reference_model(folder)
    shape = result.config.shape
    questions = make_questions(HELD_OUT_QUESTIONS, split="test", image_size=shape.image_size)
    full = evaluate(model, processor, questions, batch_size=50)
    small = score(questions.questions[:SMALL_HELD_OUT_QUESTIONS], full.predictions[:SMALL_HELD_OUT_QUESTIONS])
    diagnostics = diagnose(model, processor, questions, probe_questions=probe_questions)
    parameters = sum(p.numel() for p in model.parameters())
    card = {
        "name": "tokred llava_scenes",
        "model": "LlavaForConditionalGeneration",
        "description": (
            "A small LLaVA (CLIP vision tower, MLP projector, Llama decoder) trained from scratch to answer "
            "templated questions about tokred.bench.scenes with one word."
        ),
        "config": {
            "image_size": shape.image_size,
            "patch_size": shape.patch_size,
            "visual_tokens": shape.visual_tokens,
            "vision": {
                "width": shape.vision_width,
                "layers": shape.vision_layers,
                "heads": shape.vision_heads,
                "mlp": shape.mlp_ratio * shape.vision_width,
            },
            "decoder": {
                "width": shape.text_width,
                "layers": shape.text_layers,
                "heads": shape.text_heads,
                "mlp": shape.mlp_ratio * shape.text_width,
                "rope_theta": shape.rope_theta,
            },
            "vocab_size": model.config.text_config.vocab_size,
            "parameters": parameters,
            "weights": "float16 safetensors (evaluated in float32)",
        },
        "prompt": prompt("{question}"),
        "question_kinds": list(QUESTION_KINDS),
        "held_out": {
            "split": "test",
            "questions": full.examples,
            "question_seed": 0,
            "accuracy": full.accuracy,
            "per_kind": full.per_kind,
            "small": {"questions": small.examples, "accuracy": small.accuracy, "per_kind": small.per_kind},
        },
        "diagnostics": diagnostics,
        "training": {
            "command": command,
            "device": device,
            "threads": result.config.threads,
            "wall_time_s": round(result.wall_time_s, 1),
            "train_scenes": result.config.vision_steps * result.config.vision_batch
            + result.config.steps * result.config.images_per_step,
            "questions_seen": result.config.steps * result.config.images_per_step * result.config.questions_per_image,
            "final_answer_loss": sum(result.losses[-20:]) / max(len(result.losses[-20:]), 1),
            "config": result.config.to_dict(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": platform.machine(),
        },
    }
    (folder / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card
