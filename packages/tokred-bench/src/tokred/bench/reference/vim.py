"""The reference Vim: ``vim_scenes``, a registered model with bundled weights.

``vim_scenes`` is a small Vim in the published models' proportions (middle class token, bidirectional Mamba
blocks, state size 16, expansion 2, Δ rank ``ceil(D / 16)``, 196 patches) that classifies the large *target*
object of a pattern scene ([`tokred.bench.scenes`][tokred.bench.scenes]): 24 classes, colour ×
pattern. It takes the scenes' images as they come, fp32 ``(B, 3, 112, 112)`` in ``[0, 1]``, with no
normalisation, and its registration says so (its ``preprocess_config``), so
``tokred mamba classify --model vim_scenes scene.png`` prepares a PNG of a scene the way the model was trained.
``scripts/train_vim_scenes.py`` trains it from scratch on the CPU; the weights it produced ship with tokred-bench
in fp16 and load into an fp32 model.

Examples:
    >>> from tokred.bench.scenes import make_scenes
    >>> from tokred.mamba import create_model
    >>> model = create_model("vim_scenes", pretrained=True).eval()
    >>> model(make_scenes(2, split="test").images).shape
    torch.Size([2, 24])
    >>> model.class_names[:2]
    ('red plain', 'green plain')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokred.bench.reference import reference_dir
from tokred.bench.scenes import NUM_CLASSES, label_name
from tokred.mamba import PreprocessConfig, VisionMamba, register_model
from tokred.mamba.models.vim import build

__all__ = [
    "REFERENCE_MODEL",
    "REFERENCE_WEIGHTS",
    "SCENE_PREPROCESS",
    "VIM_SCENES_CONFIG",
    "vim_scenes",
    "weights_path",
]

REFERENCE_MODEL = "vim_scenes"
"""Registry name of the reference model."""
REFERENCE_WEIGHTS = "vim_scenes.pt"
"""File name of the bundled fp16 state dict in its reference folder."""

SCENE_PREPROCESS = PreprocessConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_ratio=1.0)
"""How ``vim_scenes`` reads an image: resized to 112 px and scaled to ``[0, 1]``, nothing else."""

VIM_SCENES_CONFIG: dict[str, Any] = {
    "img_size": 112,
    "patch_size": 8,
    "embed_dim": 64,
    "depth": 16,
    "d_state": 16,
    "expand": 2,
    "num_classes": NUM_CLASSES,
}
"""Constructor arguments of ``vim_scenes``; the rest are Vim's (conv width 4, Δ rank ``ceil(D / 16)``, middle
class token). Vim-T's proportions at a third of its width and two thirds of its depth, so that it trains from
scratch on two CPU cores in about an hour."""


def weights_path() -> Path:
    """The bundled fp16 state dict of ``vim_scenes``."""
    return reference_dir(REFERENCE_MODEL) / REFERENCE_WEIGHTS


@register_model(
    REFERENCE_MODEL,
    pretrained=weights_path,
    preprocess=SCENE_PREPROCESS,
    class_names=[label_name(label) for label in range(NUM_CLASSES)],
)
def vim_scenes(**overrides: Any) -> VisionMamba:
    """The reference Vim of tokred-bench: 112 px pattern scenes, 24 classes (trained weights: pretrained=True).

    8 px patches (14 × 14 = 196 patches and a middle class token), D = 64, 16 blocks, state size 16, expansion 2.
    """
    return build(VisionMamba, VIM_SCENES_CONFIG, overrides)
