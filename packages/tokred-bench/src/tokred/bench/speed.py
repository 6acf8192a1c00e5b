"""What token reduction saves in wall time at the shapes of real checkpoints, with random weights.

The reference models of tokred-bench are far too small for time to mean anything: a prefill of theirs is all
overhead. Speed does not depend on the weights, so the demo measures it on models built from configs at real
sizes, and says so: "random weights, LLaVA-1.5-7B shapes" and "random weights, Vim-S shapes".

* [`llava_prefill_speedup`][tokred.bench.speed.llava_prefill_speedup]: a ``LlavaForConditionalGeneration`` with
  LLaVA-1.5-7B's CLIP ViT-L/14-336 tower (576 visual tokens), projector and a 4096-wide Vicuna-7B decoder cut to
  a couple of layers; one prefill (``model(**inputs, logits_to_keep=1)``, the tower included) dense and with
  ApET keeping ``keep`` visual tokens.
* [`vim_forward_speedup`][tokred.bench.speed.vim_forward_speedup]: a Vim-S (224 px, 197 tokens, 24 blocks) forward
  dense and with MTR at a FLOPs cut.

Dense and reduced calls alternate, so that background load hits both alike; the speed-up is the median of the
paired ratios.

Examples:
    >>> from tokred.bench.speed import vim_forward_speedup
    >>> tiny = {"img_size": 32, "embed_dim": 32, "depth": 8}
    >>> result = vim_forward_speedup(flops_cut=0.2, model_overrides=tiny, repeats=1)
    >>> result.label, result.speedup > 0
    ('random weights, Vim-S shapes', True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import median
from typing import Any

import torch

__all__ = [
    "IMAGE_TOKEN",
    "SpeedResult",
    "fill_random_weights",
    "llava_7b_config",
    "llava_7b_shaped",
    "llava_prefill_speedup",
    "vim_forward_speedup",
]

IMAGE_TOKEN = 32000
"""The image token of ``llava-hf/llava-1.5-7b-hf``, in a 32064-entry vocabulary."""


@dataclass(frozen=True)
class SpeedResult:
    """One measured speed-up.

    Attributes:
        label: What the model is, e.g. ``"random weights, LLaVA-1.5-7B shapes"``.
        what: What one timed call is.
        dense_ms: Median time of the dense call, in milliseconds.
        reduced_ms: Median time of the reduced call.
        speedup: Median of the paired ratios dense / reduced.
        tokens: ``(dense, reduced)`` token counts the calls processed (visual tokens, or tokens at the end).
        method: The reduction, e.g. ``"ApET, 576 → 64 visual tokens"``.
    """

    label: str
    what: str
    dense_ms: float
    reduced_ms: float
    speedup: float
    tokens: tuple[int, int]
    method: str

    def line(self) -> str:
        """One sentence for the demo's output."""
        return (
            f"speed ({self.label}): {self.what}, dense {self.dense_ms:.0f} ms, {self.method} {self.reduced_ms:.0f} ms: "
            f"{self.speedup:.2f}x faster"
        )


def _paired(dense: Callable[[], Any], reduced: Callable[[], Any], repeats: int) -> tuple[float, float, float]:
    """Median dense and reduced seconds and the median paired ratio, alternating the order every round."""
    times: dict[str, list[float]] = {"dense": [], "reduced": []}
    calls = {"dense": dense, "reduced": reduced}
    for round_ in range(repeats):
        for name in ("dense", "reduced") if round_ % 2 == 0 else ("reduced", "dense"):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    ratios = [d / r for d, r in zip(times["dense"], times["reduced"], strict=True)]
    return median(times["dense"]), median(times["reduced"]), median(ratios)


def llava_7b_config(*, decoder_layers: int = 2, tiny_widths: bool = False) -> Any:
    """The ``LlavaConfig`` of LLaVA-1.5-7B's sizes with ``decoder_layers`` of its 32 decoder layers.

    CLIP ViT-L/14-336 (1024-d, 24 layers, read from the penultimate one, 576 visual tokens), LLaVA's two-layer
    projector, and a Vicuna-7B decoder (4096-d, MLP 11008, 32 heads, vocabulary 32064).

    Args:
        decoder_layers: Decoder layers.
        tiny_widths: The same 576 visual tokens and layout at tiny widths and two tower layers (smoke runs).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny_widths:
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    else:  # openai/clip-vit-large-patch14-336, lmsys/vicuna-7b-v1.5
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
        text = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32}
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            **vision, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5
        ),
        text_config=LlamaConfig(
            **text,
            num_hidden_layers=decoder_layers,
            num_key_value_heads=text["num_attention_heads"],
            vocab_size=32064,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
    )


_POOL = 1_000_003  # a prime: consecutive rows of a weight are distinct windows of the pool


def fill_random_weights(model: torch.nn.Module, *, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Give every parameter of ``model`` cheap pseudo-random values, in place: speed does not depend on them.

    Drawing 700 M independent normals (LLaVA-1.5-7B's tower and two decoder layers, and transformers' own
    initialisation does that and more) takes 10-20 s on a small CPU, longer than the timing itself. Here one
    seeded pool of about a million normals is drawn, and each weight is the pool repeated from an offset of its
    own; biases are zero and norm weights one, so activations stay at the scale of a real model.

    Args:
        model: The module to fill.
        seed: Seed of the pool and the offsets.
        std: Standard deviation of the weights.

    Returns:
        ``model``.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL, generator=generator) * std
    offsets = torch.randint(0, _POOL, (len(list(model.parameters())),), generator=generator).tolist()
    with torch.no_grad():
        for (name, parameter), offset in zip(model.named_parameters(), offsets, strict=True):
            if name.endswith("bias"):
                parameter.zero_()
            elif "norm" in name.rpartition(".")[0].rpartition(".")[2]:  # layer_norm1, pre_layrnorm, norm
                parameter.fill_(1.0)
            else:
                values = torch.roll(pool, offset).to(parameter.dtype)
                flat = parameter.view(-1)
                for start in range(0, flat.numel(), _POOL):
                    chunk = flat[start : start + _POOL]
                    chunk.copy_(values[: chunk.numel()])
    return model


def llava_7b_shaped(*, decoder_layers: int = 2, seed: int = 0) -> Any:
    """A ``LlavaForConditionalGeneration`` of [`llava_7b_config`][tokred.bench.speed.llava_7b_config] with random
    weights ([`fill_random_weights`][tokred.bench.speed.fill_random_weights]), in eval mode (fp32, ``sdpa``).
    """  # noqa: D205
    from transformers import LlavaForConditionalGeneration

    try:  # skip transformers' initialisation, which fill_random_weights overwrites anyway
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers 5 releases
        from contextlib import nullcontext as no_init_weights

    config = llava_7b_config(decoder_layers=decoder_layers)
    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return fill_random_weights(model, seed=seed).eval()


def llava_prefill_speedup(
    *, keep: int = 64, decoder_layers: int = 2, text_tokens: int = 40, repeats: int = 2, model: Any | None = None
) -> SpeedResult:
    """One LLaVA-1.5-7B-shaped prefill, dense and with ApET keeping ``keep`` of the 576 visual tokens.

    The prompt is LLaVA-1.5's layout: 5 text tokens, the image's 576 placeholders, the rest of ``text_tokens``;
    batch 1, ``positions="compact"``, ApET in the vision space (LLaVA's default).

    Args:
        keep: Visual tokens ApET keeps.
        decoder_layers: Decoder layers of the model (of Vicuna-7B's 32).
        text_tokens: Text tokens of the prompt.
        repeats: Timed rounds (dense and reduced alternate; the first round warms up nothing on purpose: the
            calls take seconds, and a second warm-up round would double the cost).
        model: A model from [`llava_7b_shaped`][tokred.bench.speed.llava_7b_shaped] to reuse; built if None.

    Returns:
        The timings. Their ``label`` names LLaVA-1.5-7B's shapes: a ``model`` of other sizes is for tests only.
    """
    from tokred.vlm import ApET, attach

    model = model if model is not None else llava_7b_shaped(decoder_layers=decoder_layers)
    config = model.config
    visual = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(1, config.image_token_id, (1, text_tokens), generator=generator)
    image = torch.full((1, visual), config.image_token_id)
    input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
    side = config.vision_config.image_size
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(1, 3, side, side, generator=generator),
    }

    def prefill() -> None:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)

    def reduced() -> None:
        with attach(model, ApET(num_keep=keep)):
            prefill()

    dense_s, reduced_s, ratio = _paired(prefill, reduced, repeats)
    return SpeedResult(
        label="random weights, LLaVA-1.5-7B shapes",
        what=f"one prefill (CLIP-L/14-336 tower and {config.text_config.num_hidden_layers} of 32 decoder layers, "
        f"{input_ids.shape[1]} tokens)",
        dense_ms=1000 * dense_s,
        reduced_ms=1000 * reduced_s,
        speedup=ratio,
        tokens=(visual, keep),
        method=f"ApET {visual} → {keep} visual tokens",
    )


def vim_forward_speedup(
    *,
    flops_cut: float = 0.4,
    batch: int = 4,
    repeats: int = 2,
    model_overrides: Mapping[str, Any] | None = None,
) -> SpeedResult:
    """A Vim-S forward (224 px, 197 tokens), dense and with MTR at ``flops_cut``.

    Args:
        flops_cut: The FLOPs cut MTR's schedule is solved for.
        batch: Images per forward.
        repeats: Timed rounds after one warm-up of each.
        model_overrides: Constructor overrides of ``vim_small`` (tests shrink it).
    """
    from tokred.mamba import attach, create_model
    from tokred.mamba.flops import token_counts

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("vim_small", **dict(model_overrides or {})).eval()
        images = torch.randn(batch, 3, model.img_size, model.img_size)

    def dense() -> None:
        with torch.no_grad():
            model(images)

    with attach(model, "mtr", flops_cut=flops_cut) as handle:
        schedule = handle.schedule

    def reduced() -> None:
        with attach(model, "mtr", schedule=schedule), torch.no_grad():
            model(images)

    dense()
    reduced()
    dense_s, reduced_s, ratio = _paired(dense, reduced, repeats)
    counts = token_counts(model, schedule=schedule)
    return SpeedResult(
        label="random weights, Vim-S shapes",
        what=f"one forward of {batch} images at {model.img_size} px",
        dense_ms=1000 * dense_s,
        reduced_ms=1000 * reduced_s,
        speedup=ratio,
        tokens=(counts[0], counts[-1]),
        method=f"MTR at a {flops_cut:.0%} FLOPs cut ({counts[0]} → {counts[-1]} tokens)",
    )
