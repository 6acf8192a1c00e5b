"""tokred-core: the reducer interface, the registry, shared numerics and baseline reducers.

Everything a token reducer needs that is not specific to one model family lives here and depends only on
PyTorch. ``tokred.vlm`` (ApET, transformers VLMs) and ``tokred.mamba`` (MTR, Vision Mamba) build on it.

Examples:
    >>> import torch
    >>> from tokred.core import create_reducer
    >>> tokens = torch.randn(2, 576, 64)                    # (B, N, C)
    >>> reduction = create_reducer("tome", num_keep=64)(tokens)
    >>> reduction.tokens.shape                              # (B, K, C)
    torch.Size([2, 64, 64])
"""

from importlib import metadata as _metadata

from tokred.core import reducers as _reducers  # registers the baselines
from tokred.core.budget import Budget, BudgetKwargs
from tokred.core.errors import (
    AttachError,
    BudgetError,
    IncompatibleReducerError,
    InvalidInputError,
    InvalidTypeError,
    MissingDependencyError,
    MissingFileError,
    PluginLoadError,
    ReducerContractError,
    RegistryError,
    TokredError,
    UnknownNameError,
    UnknownReducerError,
    UnsupportedError,
)
from tokred.core.reducer import CALLER_SCORES, Reducer, select_top
from tokred.core.reduction import Reduction
from tokred.core.registry import (
    ReducerInfo,
    Registry,
    available_reducers,
    create_reducer,
    get_reducer_class,
    reducer_info,
    register_reducer,
)
from tokred.core.rounds import MergeRounds

try:
    __version__ = _metadata.version("tokred-core")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

del _reducers

__all__ = [
    "CALLER_SCORES",
    "AttachError",
    "Budget",
    "BudgetError",
    "BudgetKwargs",
    "IncompatibleReducerError",
    "InvalidInputError",
    "InvalidTypeError",
    "MergeRounds",
    "MissingDependencyError",
    "MissingFileError",
    "PluginLoadError",
    "Reducer",
    "ReducerContractError",
    "ReducerInfo",
    "Reduction",
    "Registry",
    "RegistryError",
    "TokredError",
    "UnknownNameError",
    "UnknownReducerError",
    "UnsupportedError",
    "__version__",
    "available_reducers",
    "create_reducer",
    "get_reducer_class",
    "reducer_info",
    "register_reducer",
    "select_top",
]
