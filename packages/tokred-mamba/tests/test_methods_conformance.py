"""MTR and the Vision Mamba baselines pass the reducer conformance suite."""

from tokred.core.testing import ReducerConformance


class TestMTR(ReducerConformance):
    reducer_name = "mtr"


class TestMTRPrune(ReducerConformance):
    reducer_name = "mtr"
    reducer_kwargs = {"merge": False}


class TestMTRWideTargets(ReducerConformance):
    reducer_name = "mtr"
    reducer_kwargs = {"target_ratio": 2.0}


class TestToPViM(ReducerConformance):
    reducer_name = "topvim"


class TestUTR(ReducerConformance):
    reducer_name = "utr"
