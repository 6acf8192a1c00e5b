"""Linear probes: where in a trained model the answer forms.

A model card records, before any reducer is measured, how much of the label a linear classifier can read off
the class token after each block. A reducer that drops tokens early hurts a model whose label forms early
differently from one whose label forms in the last blocks; the probe says which kind the model is.

Examples:
    >>> import torch
    >>> from tokred.bench.training.probes import linear_probe_accuracy
    >>> x = torch.randn(200, 8)
    >>> y = (x[:, 0] > 0).long()
    >>> linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:], classes=2) > 0.9
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tokred.core.errors import InvalidInputError

__all__ = ["linear_probe_accuracy", "llava_layer_features", "vim_block_features"]


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    *,
    classes: int,
    steps: int = 200,
    weight_decay: float = 1e-3,
) -> float:
    """Accuracy on ``eval_*`` of a multinomial logistic regression fitted on ``train_*``.

    Features are standardised with the training set's mean and standard deviation; the classifier starts at
    zero and is fitted full-batch with L-BFGS, so the result is deterministic.

    Args:
        train_features: ``(N, C)``.
        train_labels: Long ``(N,)`` in ``0 .. classes - 1``.
        eval_features: ``(M, C)``.
        eval_labels: Long ``(M,)``.
        classes: Number of classes.
        steps: L-BFGS iterations.
        weight_decay: L2 penalty on the weights (keeps a separable problem from diverging).

    Returns:
        The fraction of ``eval_labels`` predicted right.

    Raises:
        InvalidInputError: If the shapes do not match.
    """
    if train_features.dim() != 2 or eval_features.shape[1:] != train_features.shape[1:]:
        raise InvalidInputError(
            f"features must be (N, C) and (M, C); got {tuple(train_features.shape)} and {tuple(eval_features.shape)}"
        )
    if train_labels.shape != train_features.shape[:1] or eval_labels.shape != eval_features.shape[:1]:
        raise InvalidInputError("there must be one label per feature row")
    x = train_features.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x = (x - mean) / std
    probe = nn.Linear(x.shape[1], classes, dtype=torch.float64)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(x), train_labels) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = probe((eval_features.double() - mean) / std).argmax(-1)
    return float((predicted == eval_labels).double().mean())


@torch.no_grad()
def vim_block_features(model: nn.Module, images: torch.Tensor, *, batch_size: int = 100) -> torch.Tensor:
    """The class token after every block of a Vim, normalised as the head sees it: ``(depth, B, D)``.

    Entry ``k`` is what ``forward_features`` would return if the model stopped after block ``k + 1``: the
    final norm applied to the residual stream there. The model's train/eval mode is left as it was; it should
    carry no token reduction.

    Args:
        model: A [`VisionMamba`][tokred.mamba.VisionMamba] (middle, first or last class token).
        images: ``(B, 3, H, W)``, as the model takes them.
        batch_size: Images per forward pass.
    """
    if getattr(model, "token_reduction", None) is not None:
        raise InvalidInputError("detach the token reduction before probing the model's blocks")
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        hidden = model.embed(images[start : start + batch_size])
        residual = None
        per_block = []
        for layer in model.layers:
            hidden, residual = layer(hidden, residual)
            stream = residual + hidden.to(residual.dtype)
            per_block.append(model.norm_f(stream)[:, model.cls_index])
        outputs.append(torch.stack(per_block))
    return torch.cat(outputs, dim=1)


@torch.no_grad()
def llava_layer_features(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The decoder's state at the answer position after every layer of a LLaVA: ``(layers, N, D)``.

    Entry ``k`` is the output of decoder layer ``k + 1`` at the last prompt position (the one whose logits give
    the answer); the last entry is after the final norm, as the head sees it.

    Args:
        model: A ``LlavaForConditionalGeneration`` in eval mode, nothing attached.
        batches: Processor outputs (``input_ids``, ``attention_mask``, ``pixel_values``), left-padded.
    """
    outputs = []
    for inputs in batches:
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # embeddings, then one per layer
        outputs.append(torch.stack([h[:, -1] for h in hidden[1:]]))
    return torch.cat(outputs, dim=1)
