"""Floating-point operations of a language decoder's layers at a prefill, from its config and per-layer lengths.

What a token schedule saves is a matter of the sequence length each layer runs on; this counts the matrix
products of a Llama / Qwen2-style decoder layer (multiply and add counted as two operations):

* projections: ``2 n C (H + 2 H_kv) D`` for q, k, v and ``2 n H D C`` for the output,
* attention: ``4 H n^2 D`` (scores and weighted sum over the whole sequence; causal kernels skip up to half),
* gated MLP: ``6 n C I``,

with ``n`` tokens, width ``C``, ``H`` heads (``H_kv`` key-value heads) of size ``D``, and MLP width ``I``. Norms,
rotary embeddings, softmax, the embeddings and the LM head are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["decoder_layer_flops", "decoder_prefill_flops"]


def decoder_layer_flops(config: Any, length: int, batch: int = 1) -> int:
    """Operations of one decoder layer on ``batch`` sequences of ``length`` tokens.

    Args:
        config: The decoder's config (``hidden_size``, ``intermediate_size``, ``num_attention_heads``, and
            optionally ``num_key_value_heads`` and ``head_dim``).
        length: Tokens per sequence, ``n``.
        batch: Sequences.

    Returns:
        The count, as an integer.
    """
    width = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or width // heads)
    mlp = int(config.intermediate_size)
    n = int(length)
    projections = 2 * n * width * (heads + 2 * kv_heads) * head_dim + 2 * n * heads * head_dim * width
    attention = 4 * heads * n * n * head_dim
    return batch * (projections + attention + 6 * n * width * mlp)


def decoder_prefill_flops(config: Any, layer_lengths: Sequence[int], batch: int = 1) -> int:
    """Operations of all decoder layers, layer ``i`` running on ``layer_lengths[i]`` tokens per sequence.

    Examples:
        ```python
        from transformers import LlamaConfig
        from tokred.vlm.flops import decoder_prefill_flops

        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
        dense = decoder_prefill_flops(config, [640] * 32)  # 576 visual + 64 text tokens
        two_stage = decoder_prefill_flops(config, [160] * 16 + [96] * 16)  # 96 → 32 visual tokens
        print(f"{two_stage / dense:.0%} of the dense decoder's operations")
        ```
    """
    return sum(decoder_layer_flops(config, length, batch) for length in layer_lengths)
