"""The two small reference models tokred-bench ships, trained on pattern scenes, and where their files are.

* ``llava_scenes``: a plain transformers ``LlavaForConditionalGeneration`` (256 visual tokens per image) that
  answers one-word questions about a scene ([`tokred.bench.reference.llava`][tokred.bench.reference.llava]).
  Its folder is a ``save_pretrained`` checkpoint, so ``from_pretrained(reference_dir("llava_scenes"))`` and
  ``tokred vlm generate --model llava_scenes`` load it.
* ``vim_scenes``: a Vim that classifies the large object of a scene among 24 classes
  ([`tokred.bench.reference.vim`][tokred.bench.reference.vim]); it is a registered model, so
  ``tokred.mamba.create_model("vim_scenes", pretrained=True)`` and ``tokred mamba classify --model vim_scenes``
  load it.

Each folder holds a ``card.json``: the configuration, the held-out accuracy, the training command and time.

Examples:
    >>> from tokred.bench.reference import REFERENCE_MODELS, load_card, reference_dir
    >>> REFERENCE_MODELS
    ('llava_scenes', 'vim_scenes')
    >>> (reference_dir("llava_scenes") / "config.json").is_file()
    True
    >>> load_card("vim_scenes")["model"]
    'vim_scenes'
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from tokred.core.errors import MissingFileError, UnknownNameError

__all__ = ["CARD_NAME", "REFERENCE_MODELS", "load_card", "reference_dir"]

REFERENCE_MODELS: tuple[str, ...] = ("llava_scenes", "vim_scenes")
"""The names of the bundled reference models."""

CARD_NAME = "card.json"
"""File name of the model card in every reference folder."""


def reference_dir(name: str) -> Path:
    """The folder of a bundled reference model.

    Args:
        name: ``"llava_scenes"`` or ``"vim_scenes"``.

    Returns:
        The folder inside the installed tokred-bench.

    Raises:
        UnknownNameError: If ``name`` is not a bundled model.
        MissingFileError: If the package was installed without the model's files.
    """
    if name not in REFERENCE_MODELS:
        raise UnknownNameError(f"unknown reference model {name!r}; bundled: {', '.join(REFERENCE_MODELS)}")
    folder = Path(str(resources.files("tokred.bench").joinpath("assets", name)))
    if not (folder / CARD_NAME).is_file():
        raise MissingFileError(
            f"the files of the reference model {name} are not in {folder}; reinstall tokred-bench, or retrain it "
            f"with the script scripts/train_{name}.py of the tokred repository"
        )
    return folder


def load_card(name: str) -> dict[str, Any]:
    """The card of a bundled reference model: configuration, held-out accuracy, training command and time."""
    return json.loads((reference_dir(name) / CARD_NAME).read_text(encoding="utf-8"))
