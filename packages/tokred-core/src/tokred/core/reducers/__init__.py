"""The baseline reducers shipped with tokred-core, all attention-free.

They are the yardsticks every benchmark reports next to ApET and MTR: ``random`` (seeded), ``uniform``
(evenly spaced), ``norm`` (largest feature norm), ``divprune`` (max–min diversity), ``tome`` (bipartite
soft matching merge) and ``topk`` (the highest caller-supplied scores). Importing this package registers them.
"""

from tokred.core.reducers.divprune import DivPruneReducer
from tokred.core.reducers.norm import NormReducer
from tokred.core.reducers.random import RandomReducer
from tokred.core.reducers.tome import ToMeReducer
from tokred.core.reducers.topk import TopKReducer
from tokred.core.reducers.uniform import UniformReducer

__all__ = ["DivPruneReducer", "NormReducer", "RandomReducer", "ToMeReducer", "TopKReducer", "UniformReducer"]
