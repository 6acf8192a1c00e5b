"""tokred-bench: pattern scenes, two small reference models, ``tokred bench`` and ``tokred demo``.

Everything that measures and shows lives here, apart from the runtime packages: the scenes the reference models
are trained and measured on ([`tokred.bench.scenes`][tokred.bench.scenes]), the models with their weights and
cards ([`tokred.bench.reference`][tokred.bench.reference]), their training code
([`tokred.bench.training`][tokred.bench.training]), the suites of ``tokred bench`` and ``tokred demo``, the
measurements (and the speed-ups at real checkpoints' shapes, [`tokred.bench.speed`][tokred.bench.speed]), and
[`draw_reduction`][tokred.bench.visualize.draw_reduction], which draws a
[`Reduction`][tokred.core.Reduction] over its image.

Examples:
    >>> from tokred.bench import reference_dir
    >>> from tokred.bench.scenes import make_scenes
    >>> from tokred.mamba import create_model
    >>> model = create_model("vim_scenes", pretrained=True).eval()   # registered by tokred-bench
    >>> scenes = make_scenes(4, split="test")
    >>> model(scenes.images).argmax(-1).shape
    torch.Size([4])
    >>> (reference_dir("llava_scenes") / "model.safetensors").is_file()
    True
"""

from importlib import metadata as _metadata

from tokred.bench.measure import Timing, applicable_reducers, peak_memory, time_call
from tokred.bench.reference import REFERENCE_MODELS, load_card, reference_dir
from tokred.bench.suite import BenchResult, DemoReport, ProgressFactory, ReferenceSuite, load_suites
from tokred.bench.visualize import draw_reduction

try:
    __version__ = _metadata.version("tokred-bench")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "REFERENCE_MODELS",
    "BenchResult",
    "DemoReport",
    "ProgressFactory",
    "ReferenceSuite",
    "Timing",
    "__version__",
    "applicable_reducers",
    "draw_reduction",
    "load_card",
    "load_suites",
    "peak_memory",
    "reference_dir",
    "time_call",
]
