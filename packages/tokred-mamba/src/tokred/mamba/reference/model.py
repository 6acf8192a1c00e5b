"""The reference Vim of tokred-mamba: ``vim_scenes``, its shipped weights and their card.

``vim_scenes`` is a small Vim (middle class token, bidirectional Mamba blocks, as the published models) that
classifies the large *target* object of a procedural scene (:mod:`tokred.core.scenes`) among smaller
distractors: 24 classes, shape × colour. It takes the scenes' images as they come, fp32 ``(B, 3, 64, 64)`` in
``[0, 1]``, with no normalisation. ``scripts/train_vim_scenes.py`` trains it from scratch on the CPU; the
weights it produced ship with the package in fp16 (:func:`load_reference_vim`).

Example:
    >>> from tokred.core.scenes import make_scenes
    >>> from tokred.mamba.reference import load_reference_vim
    >>> model = load_reference_vim()
    >>> scenes = make_scenes(2, split="test")
    >>> model(scenes.images).shape
    torch.Size([2, 24])
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from tokred.core.scenes import NUM_CLASSES
from tokred.mamba.models import VisionMamba, create_model
from tokred.mamba.models.registry import register_model
from tokred.mamba.models.vim import build

__all__ = [
    "REFERENCE_CARD",
    "REFERENCE_MODEL",
    "REFERENCE_WEIGHTS",
    "load_reference_card",
    "load_reference_vim",
    "reference_asset",
    "vim_scenes",
]

REFERENCE_MODEL = "vim_scenes"
"""Registry name of the reference model."""
REFERENCE_WEIGHTS = "vim_scenes.pt"
"""File name of the shipped fp16 state dict in ``tokred/mamba/assets``."""
REFERENCE_CARD = "vim_scenes.json"
"""File name of the shipped model card in ``tokred/mamba/assets``."""

VIM_SCENES_CONFIG: dict[str, Any] = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 96,
    "depth": 12,
    "d_state": 4,
    "expand": 1,
    "num_classes": NUM_CLASSES,
}
"""Constructor arguments of ``vim_scenes``; the rest are Vim's (conv width 4, Δ rank ``ceil(D / 16)``, middle
class token). The state size and the expansion are smaller than Vim-T's 16 and 2 so that it trains from scratch
on a CPU in minutes."""


@register_model(REFERENCE_MODEL)
def vim_scenes(**overrides: Any) -> VisionMamba:
    """The reference Vim: 64 px scenes, 8 px patches (8 × 8 = 64 patches + a middle class token), D = 96,
    12 blocks, state size 4, expansion 1, 24 classes. Its trained weights load with :func:`load_reference_vim`.
    """  # noqa: D205
    return build(VisionMamba, VIM_SCENES_CONFIG, overrides)


def reference_asset(name: str) -> Path:
    """Path of a file shipped in ``tokred/mamba/assets`` (``vim_scenes.pt``, ``vim_scenes.json``).

    Raises:
        FileNotFoundError: If the package was installed without the file.
    """
    path = Path(str(resources.files("tokred.mamba").joinpath("assets", name)))
    if not path.is_file():
        raise FileNotFoundError(
            f"the reference-model file {name} is not in {path.parent}; reinstall tokred-mamba, or retrain it "
            "with scripts/train_vim_scenes.py"
        )
    return path


def load_reference_card() -> dict[str, Any]:
    """The card of the shipped weights: config, held-out accuracy, training command, wall time, versions."""
    return json.loads(reference_asset(REFERENCE_CARD).read_text(encoding="utf-8"))


def load_reference_vim(*, scan_backend: str = "auto") -> VisionMamba:
    """The trained reference Vim, in fp32 and eval mode.

    The weights ship in fp16 and are widened to fp32 here; the accuracy in the card
    (:func:`load_reference_card`) is that of this fp32 model with the fp16-rounded weights.

    Args:
        scan_backend: Selective-scan backend of the mixers (see :func:`tokred.mamba.ops.selective_scan`).

    Returns:
        ``vim_scenes`` with the shipped weights: input ``(B, 3, 64, 64)`` in ``[0, 1]``, output ``(B, 24)``.
    """
    state = torch.load(reference_asset(REFERENCE_WEIGHTS), map_location="cpu", weights_only=True)
    model = create_model(REFERENCE_MODEL, scan_backend=scan_backend)
    model.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    return model.eval()
