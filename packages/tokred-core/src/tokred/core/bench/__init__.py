"""What ``tokred bench`` and ``tokred demo`` are made of: the suite interface, measurement, tables and plots.

Packages with a reference model implement :class:`ReferenceSuite` and register it in the ``tokred.suites``
entry-point group; everything else here is shared, so every suite is measured and reported the same way.
"""

from tokred.core.bench.measure import applicable_reducers, peak_memory, time_call
from tokred.core.bench.progress import Progress, ProgressTask
from tokred.core.bench.suite import SUITE_ENTRY_POINT_GROUP, BenchResult, DemoReport, ReferenceSuite, load_suites

__all__ = [
    "SUITE_ENTRY_POINT_GROUP",
    "BenchResult",
    "DemoReport",
    "Progress",
    "ProgressTask",
    "ReferenceSuite",
    "applicable_reducers",
    "load_suites",
    "peak_memory",
    "time_call",
]
