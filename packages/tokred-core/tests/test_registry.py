"""The reducer registry: registration rules and error messages."""

import pytest
import torch

from tokred.core import (
    InvalidTypeError,
    Reducer,
    Reduction,
    Registry,
    RegistryError,
    UnknownNameError,
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
    with pytest.raises(UnknownReducerError, match=r"unknown reducer 'nope'\. Known reducers: ") as exc:
        create_reducer("nope", num_keep=3)
    for name in ("divprune", "norm", "random", "tome", "topk", "uniform"):
        assert name in str(exc.value)
    with pytest.raises(LookupError):
        get_reducer_class("nope")


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UnknownReducerError, match=r"unknown reducer 'tmoe'\. Did you mean 'tome'\?"):
        create_reducer("tmoe", num_keep=3)


def test_a_generic_registry_resolves_aliases_and_refuses_clashes():
    registry = Registry("tokred.tests_nothing", "widget", unknown_error=UnknownNameError)
    registry.register("blue_widget", "B", aliases=("bluewidget",))
    assert registry.get("bluewidget") == "B" and registry.resolve("bluewidget") == "blue_widget"
    assert registry.names() == ["blue_widget"] and registry.names(include_aliases=True) == ["blue_widget", "bluewidget"]
    assert registry.names("red*") == []
    assert "bluewidget" in registry and "green" not in registry
    with pytest.raises(RegistryError, match="alias 'bluewidget' already names another widget"):
        registry.register("other_widget", "O", aliases=("bluewidget",))
    with pytest.raises(UnknownNameError, match=r"unknown widget 'blu_widget'\. Did you mean 'blue_widget'"):
        registry.get("blu_widget")
    registry.unregister("blue_widget")
    assert "bluewidget" not in registry


def test_unexpected_config_is_a_type_error_that_lists_the_arguments():
    with pytest.raises(InvalidTypeError, match=r"reducer 'norm': .*alpha.*it takes num_keep, keep_ratio, num_remove"):
        create_reducer("norm", num_keep=3, alpha=1.0)
    with pytest.raises(InvalidTypeError, match=r"it takes merge, num_keep, keep_ratio, num_remove"):
        create_reducer("uniform", num_keep=3, merged=True)
