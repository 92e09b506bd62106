"""Stage name -> Stage class. Every module in the `stages` package is scanned once.

Third-party stages register with `register(MyStage)` or through the `heedful.stages`
entry-point group.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from .stage import Stage

_REGISTRY: dict[str, type[Stage]] = {}
_SCANNED = False


def register(cls: type[Stage]) -> type[Stage]:
    if not cls.uses:
        raise ValueError(f"{cls.__name__} must set `uses`")
    existing = _REGISTRY.get(cls.uses)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"stage name '{cls.uses}' registered twice: {existing} and {cls}")
    _REGISTRY[cls.uses] = cls
    return cls


def _scan() -> None:
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    import stages

    for info in pkgutil.iter_modules(stages.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"stages.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Stage) and obj is not Stage and obj.uses:
                if obj.__module__ == module.__name__:
                    register(obj)
    for ep in entry_points(group="heedful.stages"):
        register(ep.load())


def get(name: str) -> type[Stage] | None:
    _scan()
    return _REGISTRY.get(name)


def names() -> list[str]:
    _scan()
    return sorted(_REGISTRY)
