"""A small generic name -> component registry, shared by every stage (scorers, tasks, collectors, ...).

Lookups never raise a bare ``KeyError``: an unknown name is a :class:`MoePruneError` whose message
lists what is available, so a typo in a YAML file or on the command line reads as one clear line.

Example::

    SCORERS: Registry[type[Scorer]] = Registry("scorer", base=Scorer)

    @SCORERS.register("exact_match")
    class ExactMatch(Scorer): ...

    SCORERS.get("exact_match")          # -> ExactMatch
    SCORERS.get("exact")                # MoePruneError: unknown scorer 'exact'; available: exact_match
"""

from __future__ import annotations

import importlib
from typing import Generic, Iterator, TypeVar

from moeprune.errors import MoePruneError

__all__ = ["Registry"]

T = TypeVar("T")


class _Lazy:
    """A ``"package.module:attribute"`` placeholder, imported on first lookup."""

    __slots__ = ("target",)

    def __init__(self, target: str) -> None:
        if ":" not in target:
            raise ValueError(f"lazy registry target {target!r} must look like 'package.module:attribute'")
        self.target = target

    def load(self) -> object:
        module_name, _, attr = self.target.partition(":")
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


class Registry(Generic[T]):
    """Maps names to components of one kind.

    Args:
        kind: what the entries are, used in messages ("scorer", "task", ...).
        base: optional type check. A registered class must be a subclass of ``base``; any other
            registered object must be an instance of it.
    """

    def __init__(self, kind: str, *, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, object] = {}
        self._frozen = False

    # -- registration -----------------------------------------------------------------------
    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False):
        """Register ``obj`` under ``name``; without ``obj`` this is a decorator."""
        if obj is None:
            def decorator(target: T) -> T:
                self.register(name, target, overwrite=overwrite)
                return target
            return decorator
        self._check_writable(name, overwrite=overwrite)
        self._check_type(name, obj)
        self._entries[name] = obj
        return obj

    def register_lazy(self, name: str, target: str, *, overwrite: bool = False) -> None:
        """Register ``"package.module:attribute"``, imported (and type-checked) on first lookup."""
        self._check_writable(name, overwrite=overwrite)
        self._entries[name] = _Lazy(target)

    def freeze(self) -> None:
        """Refuse further registrations."""
        self._frozen = True

    # -- lookup -------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        """The entry called ``name``; a one-line MoePruneError listing the available names if none."""
        try:
            obj = self._entries[name]
        except KeyError:
            raise MoePruneError(f"unknown {self.kind} {name!r}; available: {self.available()}") from None
        if isinstance(obj, _Lazy):
            obj = obj.load()
            self._check_type(name, obj)
            self._entries[name] = obj
        return obj  # type: ignore[return-value]

    def available(self) -> str:
        """Comma-separated sorted names (or ``(none)``)."""
        return ", ".join(sorted(self._entries)) or "(none)"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, entries=[{self.available()}])"

    # -- checks -------------------------------------------------------------------------------
    def _check_writable(self, name: str, *, overwrite: bool) -> None:
        if self._frozen:
            raise RuntimeError(f"the {self.kind} registry is frozen; cannot register {name!r}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True to replace it)")

    def _check_type(self, name: str, obj: object) -> None:
        if self.base is None:
            return
        ok = issubclass(obj, self.base) if isinstance(obj, type) else isinstance(obj, self.base)
        if not ok:
            raise TypeError(f"{self.kind} {name!r} must be a {self.base.__name__} (or subclass), got {obj!r}")

