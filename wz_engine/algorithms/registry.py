"""Name -> entry registries with built-ins discovered from a package and user entries by module path."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name, an unloadable module path, or a clashing registration; the message says which."""


def load_object(path: str) -> Any:
    """Import `pkg.module:attr` (dotted attributes allowed after the colon) and return the attribute."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(f"expected a module path 'pkg.module:name', got {path!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise RegistryError(f"cannot import module {module_name!r} (from {path!r}): {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Entries of one kind (estimator, policy loss, reward source) by name.

    Built-ins are the modules of `package`: every module in it is imported on the first lookup, and
    registers its entries at import time, so a new built-in is one new file there. A name holding a
    colon is a module path `pkg.module:attr` to an entry (an `entry_type` instance) defined anywhere."""

    def __init__(self, kind: str, package: str, entry_type: type, from_function: Callable[[str, Any], T] | None = None,
                 hint: str = ""):
        self.kind = kind
        self.package = package
        self.entry_type = entry_type
        self.from_function = from_function
        """Turns a plain function found at a module path into an entry (None: not accepted)."""
        self.hint = hint
        """Appended to the error for a module path that holds something else."""
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, entry: T) -> T:
        if not name or ":" in name:
            raise RegistryError(f"{self.kind} name {name!r}: must be non-empty and hold no ':' "
                                "(a colon marks a module path)")
        if name in self._entries and self._entries[name] is not entry:
            raise RegistryError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
        self._entries[name] = entry
        return entry

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The entry registered as `name`, or the one a module path `pkg.module:attr` points at."""
        if not isinstance(name, str):
            raise RegistryError(f"expected a {self.kind} name or a module path, got {name!r}")
        if ":" in name:
            return self._coerce(name, load_object(name))
        self._load_builtins()
        if name in self._entries:
            return self._entries[name]
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RegistryError(f"{name!r} is not one of {names} (or a module path 'pkg.module:name'){hint}")

    def _coerce(self, path: str, obj: Any) -> T:
        if isinstance(obj, self.entry_type):
            return obj
        if self.from_function is not None and callable(obj):
            return self.from_function(path, obj)
        raise RegistryError(f"{path!r} is not a {self.entry_type.__name__}{self.hint}")

    def __contains__(self, name: str) -> bool:
        return name in self.names()
