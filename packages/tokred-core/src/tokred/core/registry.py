"""Registries: in-process registrations plus plug-ins discovered through entry points.

One generic [`Registry`][tokred.core.registry.Registry] serves every registry of the workspace: reducers
(entry-point group ``tokred.reducers``, here), Vision Mamba models (``tokred.models``, in tokred-mamba), VLM
model families (``tokred.vlm_adapters``, in tokred-vlm). A distribution that ships something declares it in its
own ``pyproject.toml``; nothing here knows which distributions exist.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

from tokred.core.errors import InvalidTypeError, PluginLoadError, RegistryError, UnknownNameError, UnknownReducerError

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
    module = getattr(obj, "__module__", None) or type(obj).__module__
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}:{qualname}"


class Registry(Generic[T]):
    """A name → object registry backed by an entry-point group, loaded lazily.

    In-process code registers with [`register`][tokred.core.registry.Registry.register] (usually as a
    decorator). Other distributions declare ``[project.entry-points."<group>"]`` lines; a plug-in is imported
    only when its name is first asked for, and a plug-in that fails to import raises
    [`PluginLoadError`][tokred.core.errors.PluginLoadError] for that name only. Names are lower_snake_case; a
    name may have aliases (other names for the same object, such as the long names of official checkpoints).

    Args:
        group: Entry-point group to discover plug-ins from.
        kind: What the registry holds, for messages ("reducer", "model", …).
        on_register: Optional callback ``(name, obj)`` run when an object is registered (for example to check it
            or to set its ``name`` attribute).
        unknown_error: The exception raised for an unknown name (a subclass of
            [`UnknownNameError`][tokred.core.errors.UnknownNameError]).
        from_entry_point: Optional function that turns the object an entry point loads into the registered
            object (for example a decorated factory into its spec); the identity by default.

    Examples:
        >>> from tokred.core.registry import Registry
        >>> colours = Registry("example.colours", "colour")
        >>> _ = colours.register("sky_blue", "#87ceeb", aliases=("skyblue",))
        >>> colours.get("skyblue"), colours.names()
        ('#87ceeb', ['sky_blue'])
    """

    def __init__(
        self,
        group: str,
        kind: str,
        on_register: Callable[[str, T], None] | None = None,
        *,
        unknown_error: type[UnknownNameError] = UnknownNameError,
        from_entry_point: Callable[[Any], T] | None = None,
    ) -> None:
        self.group = group
        self.kind = kind
        self._on_register = on_register
        self._unknown_error = unknown_error
        self._from_entry_point = from_entry_point
        self._objects: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._entry_points: dict[str, list[metadata.EntryPoint]] | None = None
        self._lock = threading.RLock()

    def register(self, name: str, obj: T | None = None, *, aliases: Iterable[str] = ()) -> Any:
        """Register ``obj`` under ``name`` (and ``aliases``); without ``obj``, return a decorator that does.

        Raises:
            RegistryError: If a name is not lower_snake_case or already names a different object.
        """
        aliases = tuple(aliases)
        for candidate in (name, *aliases):
            if not isinstance(candidate, str) or not _NAME.match(candidate):
                raise RegistryError(f"{self.kind} names are lower_snake_case (like 'my_name'); got {candidate!r}")

        def decorator(target: T) -> T:
            with self._lock:
                existing = self._objects.get(name)
                # Re-running a module (importlib.reload, a notebook cell) re-registers the same definition.
                if existing is not None and existing is not target and _target_of(existing) != _target_of(target):
                    raise RegistryError(
                        f"{self.kind} {name!r} is already registered by {_target_of(existing)}; "
                        f"register {_target_of(target)} under another name"
                    )
                for alias in aliases:
                    if alias in self._objects or self._aliases.get(alias, name) != name:
                        raise RegistryError(f"{self.kind} alias {alias!r} already names another {self.kind}")
                if self._on_register is not None:
                    self._on_register(name, target)
                self._objects[name] = target
                self._aliases.update(dict.fromkeys(aliases, name))
            return target

        return decorator if obj is None else decorator(obj)

    def unregister(self, name: str) -> None:
        """Forget an in-process registration and its aliases (for tests and interactive sessions)."""
        with self._lock:
            self._objects.pop(name, None)
            for alias in [a for a, target in self._aliases.items() if target == name]:
                del self._aliases[alias]

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

    def names(self, pattern: str = "*", *, include_aliases: bool = False) -> list[str]:
        """Every name registered in-process or declared by an installed distribution, sorted.

        Args:
            pattern: Shell-style pattern the names must match (``"vim_*"``).
            include_aliases: Also list the aliases.
        """
        names = set(self._objects) | set(self._discover())
        if include_aliases:
            names |= set(self._aliases)
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))

    def resolve(self, name: str) -> str:
        """The registered name behind ``name`` (itself, or the name an alias stands for)."""
        return self._aliases.get(name, name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = self.resolve(name)
        return name in self._objects or name in self._discover()

    def entries(self) -> list[RegistryEntry]:
        """One [`RegistryEntry`][tokred.core.registry.RegistryEntry] per name, sorted, without importing anything."""
        out = []
        for name in self.names():
            eps = self._discover().get(name, [])
            obj = self._objects.get(name)
            if obj is not None:
                target = _target_of(obj)
                # An entry point may name a factory that registers a spec, so fall back to the only declaration.
                matching = [ep for ep in eps if ep.value == target] or eps[:1]
                dist = _dist_name(matching[0]) if matching else None
                out.append(RegistryEntry(name, target, dist, True))
            else:
                out.append(RegistryEntry(name, eps[0].value, _dist_name(eps[0]), False))
        return out

    def unknown(self, name: str) -> UnknownNameError:
        """The error for an unknown ``name``: it lists the known names and suggests close ones."""
        known = self.names()
        close = difflib.get_close_matches(name, known + sorted(self._aliases), n=3) if isinstance(name, str) else []
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listed = ", ".join(known) or "none"
        return self._unknown_error(
            f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {listed}. {self.kind.capitalize()}s of other "
            "packages and plug-ins appear here once they are installed."
        )

    def get(self, name: str) -> T:
        """The object registered under ``name`` (or an alias), importing its plug-in on first use.

        Raises:
            UnknownNameError: If no registration or installed plug-in provides ``name`` (the registry's
                ``unknown_error`` subclass); the message lists the known names.
            PluginLoadError: If the plug-in that declares ``name`` fails to import, or two distributions
                declare ``name`` with different targets.
        """
        name = self.resolve(name) if isinstance(name, str) else name
        obj = self._objects.get(name)
        if obj is not None:
            return obj
        eps = self._discover().get(name) if isinstance(name, str) else None
        if not eps:
            raise self.unknown(name)
        if len(eps) > 1:
            declared = "; ".join(f"{ep.value} (from {_dist_name(ep)})" for ep in eps)
            raise PluginLoadError(f"{self.kind} {name!r} is declared by several plug-ins: {declared}; uninstall one")
        ep = eps[0]
        try:
            loaded = ep.load()
            value = loaded if self._from_entry_point is None else self._from_entry_point(loaded)
        except Exception as exc:
            raise PluginLoadError(
                f"{self.kind} plug-in {name!r} ({ep.value}, from distribution "
                f"{_dist_name(ep)}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        with self._lock:
            registered = self._objects.get(name)
            if registered is None:
                self.register(name, value)
            elif registered is not value:
                raise RegistryError(
                    f"{self.kind} {name!r}: entry point {ep.value} loaded {_target_of(value)}, "
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


REDUCERS: Registry[Any] = Registry(
    REDUCER_ENTRY_POINT_GROUP, "reducer", on_register=_set_reducer_name, unknown_error=UnknownReducerError
)
"""The reducer registry (entry-point group ``tokred.reducers``)."""


def register_reducer(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator that registers a [`Reducer`][tokred.core.Reducer] subclass under ``name``.

    Args:
        name: lower_snake_case registry name, unique across installed packages.

    Raises:
        RegistryError: If the name is malformed or already taken by another class.

    Examples:
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

    Examples:
        >>> from tokred.core import create_reducer
        >>> create_reducer("tome", keep_ratio=0.25)
        ToMeReducer(keep_ratio=0.25)
    """
    cls = REDUCERS.get(name)
    signature = inspect.signature(cls)
    try:
        bound = signature.bind(**config)
    except TypeError as error:
        raise InvalidTypeError(f"reducer {name!r}: {error}; it takes {_accepted_arguments(cls)}") from None
    # Keywords collected by **budget reach Reducer.__init__, which takes the budget words only.
    extra = [
        key
        for param in signature.parameters.values()
        if param.kind is param.VAR_KEYWORD
        for key in bound.arguments.get(param.name, {})
        if key not in ("num_keep", "keep_ratio", "num_remove")
    ]
    if extra:
        raise InvalidTypeError(
            f"reducer {name!r}: unexpected keyword argument {extra[0]!r}; it takes {_accepted_arguments(cls)}"
        )
    return cls(**config)


def _accepted_arguments(cls: type) -> str:
    params = inspect.signature(cls).parameters.values()
    names = [p.name for p in params if p.kind is not p.VAR_KEYWORD]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        names += ["num_keep", "keep_ratio", "num_remove"]
    return ", ".join(dict.fromkeys(names)) or "no arguments"


def get_reducer_class(name: str) -> Any:
    """The [`Reducer`][tokred.core.Reducer] subclass registered as ``name`` (importing its plug-in if needed)."""
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
