"""The reducer registry: registration rules and error messages."""

import pytest
import torch

from tokred.core import (
    Reducer,
    Reduction,
    RegistryError,
    UnknownReducerError,
    available_reducers,
    create_reducer,
    get_reducer_class,
    reducer_info,
    register_reducer,
)
from tokred.core.registry import REDUCERS


@pytest.fixture
def scratch_name():
    name = "test_scratch_reducer"
    yield name
    REDUCERS.unregister(name)


def make_class(doc="Keep everything in front.", qualname="Front"):
    class Front(Reducer):
        def reduce(self, tokens, num_keep, *, scores, protected, sizes):
            kept = torch.arange(num_keep).expand(tokens.shape[0], -1)
            return Reduction.from_selection(tokens, kept, sizes)

    Front.__doc__ = doc
    Front.__qualname__ = qualname  # a different qualname is a different definition, not a re-run
    return Front


def test_baselines_are_registered():
    assert {"random", "uniform", "norm", "divprune", "tome"} <= set(available_reducers())
    assert available_reducers() == sorted(available_reducers())


def test_register_create_and_describe(scratch_name):
    cls = register_reducer(scratch_name)(make_class())
    assert cls.name == scratch_name
    assert get_reducer_class(scratch_name) is cls
    assert isinstance(create_reducer(scratch_name, num_keep=2), cls)
    (info,) = reducer_info([scratch_name])
    assert info.summary == "Keep everything in front." and info.distribution is None and info.error is None


def test_duplicate_registration_is_an_error(scratch_name):
    register_reducer(scratch_name)(make_class())
    with pytest.raises(RegistryError, match=r"already registered.*another name"):
        register_reducer(scratch_name)(make_class("Another class.", qualname="Other"))
    with pytest.raises(RegistryError, match="already registered"):
        register_reducer("tome")(make_class(qualname="NotToMe"))


def test_registering_the_same_definition_again_is_allowed(scratch_name):
    cls = make_class()
    register_reducer(scratch_name)(cls)
    assert register_reducer(scratch_name)(cls) is cls


def test_one_class_cannot_take_two_names(scratch_name):
    cls = register_reducer(scratch_name)(make_class())
    with pytest.raises(RegistryError, match="one class, one name"):
        register_reducer("test_scratch_other")(cls)
    REDUCERS.unregister("test_scratch_other")


@pytest.mark.parametrize("bad", ["Tome", "my-reducer", "1st", "", "has space"])
def test_names_must_be_lower_snake_case(bad):
    with pytest.raises(RegistryError, match="lower_snake_case"):
        register_reducer(bad)


def test_only_reducers_can_be_registered():
    with pytest.raises(RegistryError, match="only Reducer subclasses"):
        register_reducer("test_not_a_reducer")(object)
    REDUCERS.unregister("test_not_a_reducer")


def test_unknown_name_lists_known_reducers():
    with pytest.raises(UnknownReducerError, match=r"unknown reducer 'nope'; known reducers: ") as exc:
        create_reducer("nope", num_keep=3)
    for name in ("divprune", "norm", "random", "tome", "topk", "uniform"):
        assert name in str(exc.value)
    with pytest.raises(LookupError):
        get_reducer_class("nope")


def test_unknown_known_elsewhere_names_the_package(monkeypatch):
    monkeypatch.setattr(REDUCERS, "_entry_points", {})  # as if tokred-vlm were not installed
    monkeypatch.setattr(REDUCERS, "_objects", dict(REDUCERS._objects))
    REDUCERS._objects.pop("apet", None)
    with pytest.raises(UnknownReducerError, match="pip install tokred-vlm"):
        create_reducer("apet", num_keep=3)


def test_unexpected_config_is_a_type_error():
    with pytest.raises(TypeError, match="alpha"):
        create_reducer("norm", num_keep=3, alpha=1.0)
