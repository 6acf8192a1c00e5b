"""Training the two reference models from scratch on the CPU, deterministically.

``scripts/train_llava_scenes.py`` and ``scripts/train_vim_scenes.py`` in the repository run
[`tokred.bench.training.llava`][tokred.bench.training.llava] and
[`tokred.bench.training.vim`][tokred.bench.training.vim] with the settings that produced the bundled weights.
"""

__all__: list[str] = []
