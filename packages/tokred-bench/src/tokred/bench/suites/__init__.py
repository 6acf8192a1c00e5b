"""The two reference suites of ``tokred bench`` and ``tokred demo``: ``vlm`` (the LLaVA) and ``mamba`` (the Vim).

Each is found through the ``tokred.suites`` entry-point group, so another package can add its own
[`ReferenceSuite`][tokred.bench.suite.ReferenceSuite] the same way.
"""

__all__: list[str] = []
