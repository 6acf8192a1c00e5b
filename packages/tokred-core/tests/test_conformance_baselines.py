"""Every baseline shipped with tokred-core passes the conformance suite."""

from tokred.core.testing import ReducerConformance


class TestRandom(ReducerConformance):
    reducer_name = "random"
    reducer_kwargs = {"seed": 0}


class TestUniform(ReducerConformance):
    reducer_name = "uniform"


class TestUniformPooled(ReducerConformance):
    reducer_name = "uniform"
    reducer_kwargs = {"merge": True}


class TestNorm(ReducerConformance):
    reducer_name = "norm"


class TestDivPrune(ReducerConformance):
    reducer_name = "divprune"


class TestToMe(ReducerConformance):
    reducer_name = "tome"


class TestTopK(ReducerConformance):
    reducer_name = "topk"


class TestTopKMerging(ReducerConformance):
    reducer_name = "topk"
    reducer_kwargs = {"merge": True}
