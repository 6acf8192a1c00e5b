"""Test helpers that ship with tokred-core, starting with the reducer conformance suite.

Every reducer's tests, in any tokred package or third-party plug-in, subclass
[`ReducerConformance`][tokred.core.testing.conformance.ReducerConformance] to inherit the same contract checks. Needs
pytest (``tokred-core[testing]``).
"""

from tokred.core.testing.conformance import ReducerConformance, make_tokens

__all__ = ["ReducerConformance", "make_tokens"]
