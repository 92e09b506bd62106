"""Stage name -> Stage class. Every module in the `stages` package is scanned once.

Third-party stages register with `register(MyStage)` or through the `heedful.stages`
entry-point group. A module or entry point that fails to import is skipped with a warning
naming it and its error (`broken()` lists them; `heedful stages` shows them), so one broken
plugin does not take every other stage down with it.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Callable
from functools import partial
from importlib.metadata import entry_points
from typing import Any

from .stage import Stage

_REGISTRY: dict[str, type[Stage]] = {}
_BROKEN: dict[str, str] = {}
_SCANNED = False


def register(cls: type[Stage]) -> type[Stage]:
    if not cls.uses:
        raise ValueError(f"{cls.__name__} must set `uses`")
    existing = _REGISTRY.get(cls.uses)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"stage name '{cls.uses}' registered twice: {existing} and {cls}")
    _REGISTRY[cls.uses] = cls
    return cls


def _guarded(what: str, load: Callable[[], Any]) -> Any:
    """`load()`, or None after recording and warning about the error it raised."""
    try:
        return load()
    except Exception as exc:  # a plugin may raise anything at import; the scan must go on
        _BROKEN[what] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"heedful: stage module {what} failed to load and is skipped ({_BROKEN[what]})", RuntimeWarning, stacklevel=3
        )
        return None


def _scan() -> None:
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    import stages

    for info in pkgutil.iter_modules(stages.__path__):
        if info.name.startswith("_"):
            continue
        name = f"stages.{info.name}"
        module = _guarded(name, partial(importlib.import_module, name))
        if module is None:
            continue
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Stage) and obj is not Stage and obj.uses:
                if obj.__module__ == module.__name__:
                    _guarded(name, partial(register, obj))
    for ep in entry_points(group="heedful.stages"):
        cls = _guarded(f"{ep.value} (entry point '{ep.name}')", ep.load)
        if cls is not None:
            _guarded(f"{ep.value} (entry point '{ep.name}')", partial(register, cls))


def get(name: str) -> type[Stage] | None:
    _scan()
    return _REGISTRY.get(name)


def names() -> list[str]:
    _scan()
    return sorted(_REGISTRY)


def broken() -> dict[str, str]:
    """Stage modules / entry points that failed to load: name -> error."""
    _scan()
    return dict(_BROKEN)
