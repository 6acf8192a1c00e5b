"""The reference LLaVA: its config, tokenizer and processor, the bundled checkpoint, and how it is evaluated.

The reference model is a plain transformers ``LlavaForConditionalGeneration`` (a small CLIP vision tower read
from its penultimate layer, a two-layer MLP projector and a four-layer Llama decoder) with a word-level
tokenizer over the words of [`tokred.bench.reference.questions`][tokred.bench.reference.questions].
It is trained from scratch ([`tokred.bench.training.llava`][tokred.bench.training.llava]) to answer templated
questions about pattern scenes ([`tokred.bench.scenes`][tokred.bench.scenes]) with one word, and
bundled with tokred-bench in ``reference_dir("llava_scenes")`` (fp16 weights, loaded in fp32 by
[`load_reference_model`][tokred.bench.reference.llava.load_reference_model]).

A prompt is the one of real LLaVA-1.5 checkpoints: the image first, then the question, then the answer cue
([`prompt`][tokred.bench.reference.llava.prompt]). The processor's chat template renders exactly that from a
user message holding an image and a text part in either order, so
``tokred vlm generate --model llava_scenes --prompt "what color is the striped object?" scene.png`` asks the
model the way it was trained. The image placeholder expands to one token per vision patch
(``(image_size / patch_size) ** 2``, 256 by default). The answer is the next token.

Examples:
    >>> from tokred.bench.reference.llava import evaluate, load_reference_model
    >>> from tokred.bench.reference.questions import make_questions
    >>> model, processor = load_reference_model()
    >>> questions = make_questions(8, split="test", image_size=model.config.vision_config.image_size)
    >>> result = evaluate(model, processor, questions)
    >>> 0.0 <= result.accuracy <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokred.bench.reference import reference_dir
from tokred.bench.reference.questions import QUESTION_KINDS, WORDS, Question, QuestionSet
from tokred.core.errors import MissingFileError
from tokred.vlm.testing import word_level_tokenizer

__all__ = [
    "BOS_TOKEN_ID",
    "CHAT_TEMPLATE",
    "EOS_TOKEN_ID",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "REFERENCE_MODEL",
    "EvalResult",
    "ModelShape",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "encode",
    "evaluate",
    "llava_scenes",
    "load_reference_model",
    "pixel_values",
    "predict",
    "prompt",
    "score",
    "to_pil",
]

REFERENCE_MODEL = "llava_scenes"
"""Name of the bundled checkpoint (its folder is ``reference_dir("llava_scenes")``)."""

PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, UNK_TOKEN_ID, IMAGE_TOKEN_ID = 0, 1, 2, 3, 4
"""Special token ids of the reference tokenizer; words follow from id 5 in the order of
[`WORDS`][tokred.bench.reference.questions.WORDS]."""
IMAGE_TOKEN = "<image>"
"""The image placeholder string of the prompt."""

_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
# Image parts are rendered before text parts, whatever their order in the message: the model was trained on
# "USER: <image>\n{question} ASSISTANT:", the prompt of LLaVA-1.5.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER:"
    "{%- else -%} ASSISTANT:"
    "{%- endif -%}"
    "{%- if message['content'] is string %} {{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' %} <image>{%- endfor -%}"
    "{%- if message['role'] == 'user' and message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
    "{{ '\\n' }}{%- else %} {% endif -%}"
    "{%- for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %} ASSISTANT:{% endif -%}"
)
"""The chat template of the reference processor: the image, then the question, then the answer cue."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a reference LLaVA: everything its builder needs besides the seed.

    See [`build_model`][tokred.bench.reference.llava.build_model].

    Attributes:
        image_size: Side of the square input image in pixels.
        patch_size: Side of a vision patch; ``(image_size / patch_size) ** 2`` visual tokens per image.
        vision_width: Hidden size of the CLIP vision tower.
        vision_layers: Encoder layers of the vision tower; the projector reads the output of the one before
            the last (``vision_feature_layer=-2``), as LLaVA reads CLIP's penultimate layer.
        vision_heads: Attention heads of the vision tower.
        text_width: Hidden size of the Llama decoder.
        text_layers: Decoder layers.
        text_heads: Decoder attention heads.
        mlp_ratio: MLP hidden size / width, in both towers.
        init_std: Standard deviation of the normal initialisation (``initializer_range``) of the decoder, the
            projector and the vision embeddings.
        rope_theta: RoPE base of the decoder.
    """

    image_size: int = 128
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 4
    text_heads: int = 4
    mlp_ratio: int = 3
    init_std: float = 0.08
    rope_theta: float = 10000.0

    @property
    def visual_tokens(self) -> int:
        """Visual tokens per image, ``(image_size // patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an image."""
        side = self.image_size // self.patch_size
        return side, side


def build_tokenizer() -> Any:
    """The reference word-level tokenizer: specials ``<pad> <s> </s> <unk> <image>`` (ids 0-4), then the words.

    The words are [`WORDS`][tokred.bench.reference.questions.WORDS], in order.

    Text is lower-cased and split into words and punctuation; ``<s>`` is prepended; padding is on the left.

    Returns:
        A ``PreTrainedTokenizerFast``.
    """
    vocab = {token: i for i, token in enumerate((*_SPECIAL, *WORDS))}
    return word_level_tokenizer(vocab, BOS_TOKEN_ID, [IMAGE_TOKEN])


def build_processor(shape: ModelShape | None = None) -> Any:
    """The reference ``LlavaProcessor``: a PIL ``CLIPImageProcessor`` sized for ``shape`` and the tokenizer.

    Args:
        shape: Model sizes; the default [`ModelShape`][tokred.bench.reference.llava.ModelShape] if None.

    Returns:
        A ``transformers.LlavaProcessor`` that saves and loads with ``save_pretrained`` / ``from_pretrained``.
    """
    import transformers

    shape = shape or ModelShape()
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(shape: ModelShape | None = None, *, seed: int = 0) -> Any:
    """A freshly initialised reference LLaVA (fp32, train mode), its weights depending only on ``seed``.

    Args:
        shape: Model sizes; the default [`ModelShape`][tokred.bench.reference.llava.ModelShape] if None.
        seed: Seed of the initialisation (the global RNG is forked, so the caller's state is untouched).

    Returns:
        A ``LlavaForConditionalGeneration`` with ``sdpa`` attention.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    shape = shape or ModelShape()
    vocab = len(_SPECIAL) + len(WORDS)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=shape.vision_width,
            intermediate_size=shape.mlp_ratio * shape.vision_width,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
            projection_dim=shape.vision_width,
            initializer_range=shape.init_std,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab,
            hidden_size=shape.text_width,
            intermediate_size=shape.mlp_ratio * shape.text_width,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            num_key_value_heads=shape.text_heads,
            max_position_embeddings=2 * shape.visual_tokens + 64,
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            tie_word_embeddings=True,
            initializer_range=shape.init_std,
            rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        ),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=shape.visual_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    generation = model.generation_config
    generation.pad_token_id, generation.bos_token_id, generation.eos_token_id = PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID
    generation.do_sample = False
    generation.max_new_tokens = 1
    return model


def prompt(question: str | Question) -> str:
    """The chat prompt of a question, as the processor's chat template renders it.

    The image comes first, as in LLaVA-1.5 (``USER: <image>``, newline, ``{question} ASSISTANT:``): the decoder
    reads the visual tokens before it knows the question, so whatever the answer needs is gathered at the
    question's and the answer's positions.

    Args:
        question: The question text or a [`Question`][tokred.bench.reference.questions.Question].

    Returns:
        ``"USER: <image>"``, a newline, the question, then ``" ASSISTANT:"``.
    """
    text = question.text if isinstance(question, Question) else question
    return f"USER: {IMAGE_TOKEN}\n{text} ASSISTANT:"


def to_pil(image: torch.Tensor) -> Any:
    """An fp ``(3, H, W)`` image in ``[0, 1]`` as an 8-bit RGB ``PIL.Image`` (rounded to the nearest level)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(array.cpu().numpy(), mode="RGB")


def pixel_values(images: torch.Tensor, processor: Any) -> torch.Tensor:
    """What the processor makes of square images of its own size, computed in PyTorch (for batched training).

    Equal to ``processor(images=[to_pil(i) for i in images]).pixel_values`` when the images are already
    ``image_size`` pixels square (resize and crop are then no-ops): 8-bit rounding, rescale, normalise.

    Args:
        images: fp tensor ``(B, 3, H, W)`` in ``[0, 1]``.
        processor: The reference processor (for its mean and std).

    Returns:
        fp32 ``(B, 3, H, W)``.
    """
    image_processor = processor.image_processor
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    levels = (images.float().clamp(0, 1) * 255).round()
    return (levels * image_processor.rescale_factor - mean) / std


def llava_scenes() -> Path:
    """The reference LLaVA of tokred-bench: 256 visual tokens per image, one-word answers about pattern scenes.

    The folder of the bundled ``save_pretrained`` checkpoint; tokred-vlm finds it under this name (entry-point
    group ``tokred.vlm_checkpoints``), so ``tokred vlm generate --model llava_scenes`` loads it.
    """
    return reference_dir(REFERENCE_MODEL)


def load_reference_model(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load the reference LLaVA and its processor with ``from_pretrained``, offline.

    Args:
        path: A folder written by the training script; the bundled checkpoint by default.
        dtype: Parameter dtype (the weights are stored in fp16; the default runs them in fp32).

    Returns:
        ``(model, processor)``: a ``LlavaForConditionalGeneration`` in eval mode and its ``LlavaProcessor``.

    Raises:
        MissingFileError: If the folder holds no checkpoint.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(path) if path is not None else llava_scenes()
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"no reference checkpoint in {folder} (config.json missing)")
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, local_files_only=True)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval(), processor


def encode(questions: QuestionSet, processor: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The processor's inputs for consecutive batches of a question set.

    Args:
        questions: The questions and their images.
        processor: The reference processor.
        batch_size: Questions per batch.

    Returns:
        One dict per batch with ``input_ids`` and ``attention_mask`` ``(b, L)`` (left-padded) and
        ``pixel_values`` ``(b, 3, H, W)``.
    """
    out = []
    for begin in range(0, len(questions), batch_size):
        part = slice(begin, min(begin + batch_size, len(questions)))
        texts = [prompt(q) for q in questions.questions[part]]
        images = [to_pil(image) for image in questions.images[part]]
        out.append(dict(processor(text=texts, images=images, return_tensors="pt", padding=True)))
    return out


@dataclass
class EvalResult:
    """Accuracy of a model on a question set.

    Attributes:
        accuracy: Fraction of questions whose greedy first answer token is the right word.
        per_kind: Accuracy per question kind (kinds absent from the set are left out).
        predictions: The predicted word of every question.
        examples: Number of questions.
    """

    accuracy: float
    per_kind: dict[str, float] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)
    examples: int = 0


@torch.no_grad()
def predict(
    model: Any,
    processor: Any,
    encoded: Sequence[dict[str, torch.Tensor]],
    *,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy one-word answers of ``model(**inputs)`` (whatever is attached to it) for encoded batches.

    The answer is the arg-max over the whole vocabulary of the last position's logits: the first token
    ``generate`` would produce.

    Args:
        model: A reference LLaVA (possibly with a reducer attached).
        processor: Its processor.
        encoded: Batches from [`encode`][tokred.bench.reference.llava.encode].
        on_batch: Called with the number of questions after each batch (progress bars).

    Returns:
        The predicted word of every question, in order.
    """
    device = next(model.parameters()).device
    words: list[str] = []
    for inputs in encoded:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        words += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        if on_batch is not None:
            on_batch(len(logits))
    return words


def evaluate(
    model: Any,
    processor: Any,
    questions: QuestionSet,
    *,
    batch_size: int = 32,
    encoded: Sequence[dict[str, torch.Tensor]] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Accuracy of the greedy one-word answers of ``model(**inputs)`` on a question set.

    Args:
        model: A reference LLaVA (possibly with a reducer attached).
        processor: Its processor.
        questions: The questions.
        batch_size: Questions per forward pass.
        encoded: The set's batches from [`encode`][tokred.bench.reference.llava.encode], to skip encoding it again.
        on_batch: Called with the number of questions after each batch (progress bars).

    Returns:
        The accuracy, overall and per kind, with the predicted words.
    """
    if encoded is None:
        encoded = encode(questions, processor, batch_size)
    return score(questions.questions, predict(model, processor, encoded, on_batch=on_batch))


def score(questions: Sequence[Question], predictions: Sequence[str]) -> EvalResult:
    """Accuracy of predicted words against the questions' answers, overall and per kind."""
    right = [p == q.answer for q, p in zip(questions, predictions, strict=True)]
    per_kind = {}
    for kind in QUESTION_KINDS:
        marks = [r for r, q in zip(right, questions, strict=True) if q.kind == kind]
        if marks:
            per_kind[kind] = sum(marks) / len(marks)
    return EvalResult(sum(right) / max(len(right), 1), per_kind, list(predictions), len(right))
