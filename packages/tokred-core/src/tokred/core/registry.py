"""The reducer registry: in-process registrations plus plug-ins discovered through entry points."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

from tokred.core.errors import PluginLoadError, RegistryError, UnknownReducerError

__all__ = [
    "REDUCERS",
    "REDUCER_ENTRY_POINT_GROUP",
    "ReducerInfo",
    "Registry",
    "RegistryEntry",
    "available_reducers",
    "create_reducer",
    "get_reducer_class",
    "reducer_info",
    "register_reducer",
]

T = TypeVar("T")

REDUCER_ENTRY_POINT_GROUP = "tokred.reducers"
"""Entry-point group through which distributions declare reducers (``name = "module:Class"``)."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# Where the reducers the docs talk about live, so an unknown-name error can say what to install.
_KNOWN_HOMES = {"apet": "tokred-vlm", "mtr": "tokred-mamba"}


@dataclass(frozen=True)
class RegistryEntry:
    """What a registry knows about one name, without importing a plug-in that has not been loaded yet.

    Attributes:
        name: The registered name.
        target: ``"module:qualname"`` of the registered object.
        distribution: The distribution that declares it (None for an in-process registration).
        loaded: Whether the object has been imported.
    """

    name: str
    target: str
    distribution: str | None
    loaded: bool


def _target_of(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


class Registry(Generic[T]):
    """A name → object registry backed by an entry-point group, loaded lazily.

    In-process code registers with :meth:`register` (usually as a decorator). Other distributions declare
    ``[project.entry-points."<group>"]`` lines; a plug-in is imported only when its name is first asked for,
    and a plug-in that fails to import raises :class:`~tokred.core.errors.PluginLoadError` for that name only.

    Args:
        group: Entry-point group to discover plug-ins from.
        kind: What the registry holds, for messages ("reducer", "model", …).
        on_register: Optional callback ``(name, obj)`` run when an object is registered (for example to set
            its ``name`` attribute).
    """

    def __init__(self, group: str, kind: str, on_register: Callable[[str, T], None] | None = None) -> None:
        self.group = group
        self.kind = kind
        self._on_register = on_register
        self._objects: dict[str, T] = {}
        self._entry_points: dict[str, list[metadata.EntryPoint]] | None = None
        self._lock = threading.RLock()

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that does.

        Raises:
            RegistryError: If ``name`` is not lower_snake_case or already names a different object.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise RegistryError(f"{self.kind} names are lower_snake_case (like 'my_reducer'); got {name!r}")

        def decorator(target: T) -> T:
            with self._lock:
                existing = self._objects.get(name)
                # Re-running a module (importlib.reload, a notebook cell) re-registers the same definition.
                if existing is not None and existing is not target and _target_of(existing) != _target_of(target):
                    raise RegistryError(
                        f"{self.kind} {name!r} is already registered by {_target_of(existing)}; "
                        f"register {_target_of(target)} under another name"
                    )
                self._objects[name] = target
                if self._on_register is not None:
                    self._on_register(name, target)
            return target

        return decorator if obj is None else decorator(obj)

    def unregister(self, name: str) -> None:
        """Forget an in-process registration (for tests and interactive sessions)."""
        with self._lock:
            self._objects.pop(name, None)

    def refresh(self) -> None:
        """Re-read the installed distributions' entry points (after installing a plug-in at run time)."""
        with self._lock:
            self._entry_points = None

    def _discover(self) -> dict[str, list[metadata.EntryPoint]]:
        with self._lock:
            if self._entry_points is None:
                found: dict[str, list[metadata.EntryPoint]] = {}
                for ep in metadata.entry_points(group=self.group):
                    same = found.setdefault(ep.name, [])
                    # One distribution seen twice on sys.path (editable + site) is not a conflict.
                    if all(other.value != ep.value for other in same):
                        same.append(ep)
                self._entry_points = found
            return self._entry_points

    def names(self) -> list[str]:
        """Every name registered in-process or declared by an installed distribution, sorted."""
        return sorted(set(self._objects) | set(self._discover()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._objects or name in self._discover())

    def entries(self) -> list[RegistryEntry]:
        """One :class:`RegistryEntry` per name, sorted, without importing anything."""
        out = []
        for name in self.names():
            eps = self._discover().get(name, [])
            obj = self._objects.get(name)
            if obj is not None:
                dist = next((_dist_name(ep) for ep in eps if ep.value == _target_of(obj)), None)
                out.append(RegistryEntry(name, _target_of(obj), dist, True))
            else:
                out.append(RegistryEntry(name, eps[0].value, _dist_name(eps[0]), False))
        return out

    def get(self, name: str) -> T:
        """The object registered under ``name``, importing its plug-in on first use.

        Raises:
            UnknownReducerError: If no registration or installed plug-in provides ``name``; the message
                lists the known names.
            PluginLoadError: If the plug-in that declares ``name`` fails to import, or two distributions
                declare ``name`` with different targets.
        """
        obj = self._objects.get(name)
        if obj is not None:
            return obj
        eps = self._discover().get(name)
        if not eps:
            known = ", ".join(self.names()) or "none"
            hint = ""
            if name in _KNOWN_HOMES:
                hint = f" {name!r} ships with {_KNOWN_HOMES[name]}: pip install {_KNOWN_HOMES[name]}."
            raise UnknownReducerError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}.{hint}")
        if len(eps) > 1:
            declared = "; ".join(f"{ep.value} (from {_dist_name(ep)})" for ep in eps)
            raise PluginLoadError(f"{self.kind} {name!r} is declared by several plug-ins: {declared}; uninstall one")
        ep = eps[0]
        try:
            loaded = ep.load()
        except Exception as exc:
            raise PluginLoadError(
                f"{self.kind} plug-in {name!r} ({ep.value}, from distribution "
                f"{_dist_name(ep)}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        with self._lock:
            registered = self._objects.get(name)
            if registered is None:
                self.register(name, loaded)
            elif registered is not loaded:
                raise RegistryError(
                    f"{self.kind} {name!r}: entry point {ep.value} loaded {_target_of(loaded)}, "
                    f"but the import registered {_target_of(registered)} under that name"
                )
        return self._objects[name]


def _dist_name(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else dist.metadata["Name"]


def _set_reducer_name(name: str, cls: Any) -> None:
    from tokred.core.reducer import Reducer

    if not (isinstance(cls, type) and issubclass(cls, Reducer)):
        raise RegistryError(f"only Reducer subclasses can be registered as reducers; got {cls!r}")
    if "name" in cls.__dict__ and cls.__dict__["name"] not in ("", name):
        raise RegistryError(f"{_target_of(cls)} is already registered as {cls.__dict__['name']!r}; one class, one name")
    cls.name = name


REDUCERS: Registry[Any] = Registry(REDUCER_ENTRY_POINT_GROUP, "reducer", on_register=_set_reducer_name)


def register_reducer(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator that registers a `Reducer` subclass under ``name``.

    Args:
        name: lower_snake_case registry name, unique across installed packages.

    Raises:
        RegistryError: If the name is malformed or already taken by another class.

    Example:
        >>> import torch
        >>> from tokred.core import Reducer, Reduction, register_reducer, select_top
        >>> @register_reducer("docs_keep_first")
        ... class KeepFirstReducer(Reducer):
        ...     '''Keep the first tokens of every set.'''
        ...     def reduce(self, tokens, num_keep, *, scores, protected, sizes):
        ...         order = -torch.arange(tokens.shape[1], dtype=torch.float32).expand(tokens.shape[:2])
        ...         return Reduction.from_selection(tokens, select_top(order, num_keep, protected), sizes)
        >>> KeepFirstReducer.name
        'docs_keep_first'
    """
    return REDUCERS.register(name)


def create_reducer(name: str, **config: Any) -> Any:
    """Build the reducer registered as ``name`` with the given hyper-parameters and budget.

    Args:
        name: Registry name (``"tome"``, ``"apet"`` with tokred-vlm installed, …).
        **config: Keyword arguments of the reducer's constructor, including ``num_keep`` or ``keep_ratio``.

    Returns:
        The reducer instance.

    Raises:
        UnknownReducerError: If ``name`` is unknown; the message lists the known reducers.
        PluginLoadError: If the plug-in providing ``name`` fails to import.
        TypeError: If ``config`` names an argument the reducer does not take.

    Example:
        >>> from tokred.core import create_reducer
        >>> create_reducer("tome", keep_ratio=0.25)
        ToMeReducer(keep_ratio=0.25)
    """
    return REDUCERS.get(name)(**config)


def get_reducer_class(name: str) -> Any:
    """The `Reducer` subclass registered as ``name`` (importing its plug-in if needed)."""
    return REDUCERS.get(name)


def available_reducers() -> list[str]:
    """Names of every reducer registered in-process or declared by an installed distribution, sorted.

    Listing imports nothing; a broken plug-in shows up here and fails only when it is created.
    """
    return REDUCERS.names()


@dataclass(frozen=True)
class ReducerInfo:
    """A one-line description of a registered reducer, for listings.

    Attributes:
        name: Registry name.
        summary: First line of the class docstring, or the load error for a broken plug-in.
        target: ``"module:Class"``.
        distribution: The distribution that provides it (None when registered in-process only).
        error: The load error message, when the plug-in failed to import.
    """

    name: str
    summary: str
    target: str
    distribution: str | None
    error: str | None = None


def reducer_info(names: Iterable[str] | None = None) -> list[ReducerInfo]:
    """Describe reducers by name (all of them by default), loading each; broken plug-ins are reported, not raised."""
    entries = {e.name: e for e in REDUCERS.entries()}
    out = []
    for name in sorted(entries) if names is None else names:
        entry = entries.get(name)
        if entry is None:
            REDUCERS.get(name)  # raises UnknownReducerError with the known names
            continue
        try:
            cls = REDUCERS.get(name)
        except (PluginLoadError, RegistryError) as exc:
            out.append(ReducerInfo(name, "(failed to load)", entry.target, entry.distribution, str(exc)))
            continue
        doc = (cls.__doc__ or "").strip().splitlines()
        out.append(ReducerInfo(name, doc[0] if doc else "", _target_of(cls), entry.distribution))
    return out
