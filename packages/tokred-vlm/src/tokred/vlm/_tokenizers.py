"""The word-level tokenizer shared by the tiny test models and the reference model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["word_level_tokenizer"]


def word_level_tokenizer(vocab: Mapping[str, int], bos_token_id: int, extra_special: Sequence[str]) -> Any:
    """A lower-casing, whitespace-splitting ``PreTrainedTokenizerFast`` over ``vocab`` that adds ``<s>`` in front.

    ``vocab`` must hold ``<pad>``, ``<s>``, ``</s>`` and ``<unk>``; padding is on the left (for generation), and
    ``extra_special`` (image and video placeholders) are registered as special tokens so they never split.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(dict(vocab), unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_token_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tokenizer
