"""What of a stage's config goes into its fingerprint: the fields that differ from their defaults.

Why not the whole config: hashing every field meant that adding a field to a stage config
(even one defaulting to None, e.g. `rpo_alpha` on dpo) changed the fingerprint of every run
of that stage type, and a user's finished runs redid their stages after an upgrade.

The rule (`semantic_config`):

- a field whose value equals its default is left out, at every level: a nested pydantic
  model (`lora`, `sampling`, a list of reward specs, ...) is itself reduced to its own
  non-default fields, so a field added anywhere with a default leaves fingerprints as they
  were;
- a field set to anything but its default is in (a required field always is), so changing
  any value the user chose reruns the stage; a value spelled out but equal to the default
  is the same config as leaving it out, and fingerprints the same;
- changing a DEFAULT changes what an unchanged config does, which this diff cannot see:
  it is a change of the stage's behaviour, so the stage's `version` (hashed beside the
  config, as for any code change) must be bumped with it. `default_paths` lists every
  default a stage's config reaches; tests/test_fingerprint_defaults.py compares them with
  a recorded snapshot and fails when a default changed without a version bump.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

#: what a fingerprint makes of a folder-naming value (`fingerprint_folders`): pipeline.models `model_fingerprint`
Folders = Callable[[str], str]


def semantic_config(config: BaseModel, exclude: Iterable[str] = (), folders: Folders | None = None) -> dict[str, Any]:
    """The fingerprinted form of `config`: its non-default fields (recursively), JSON-ready.
    `exclude` names fields that cannot change results (`non_semantic_fields`): top-level names,
    or dotted paths into a nested model's fields (`evaluation.engine`). `folders`: applied to the
    value of every non-default field a model lists in `fingerprint_folders()` (a local folder ->
    its content hash); without it those values stay as written."""
    return _diff(config, frozenset(exclude), folders)


def _listed(model: BaseModel, method: str) -> Iterable[str]:
    """The field names a settings model lists through an optional `method`: `fingerprint_folders()`
    (fields naming a local folder, hashed by content when `folders` is given) or `credential_fields()`
    (where an API key or token file is read: who may call a server, not what a stage computes; its
    path, read beside the config (pipeline/paths.py ConfigPath), would otherwise rerun every stage
    of a moved checkout)."""
    listed = getattr(model, method, None)
    return listed() if callable(listed) else ()


def _diff(model: BaseModel, exclude: frozenset[str] = frozenset(), folders: Folders | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    nested: dict[str, set[str]] = {}
    for path in exclude:
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, set()).add(rest)
    by_content = set(_listed(model, "fingerprint_folders")) if folders is not None else set()
    unread = set(_listed(model, "credential_fields"))
    for name, field in type(model).model_fields.items():
        if name in exclude or name in unread:
            continue
        tagged = len(_model_classes(field.annotation)) > 1
        inner = frozenset(nested.get(name, ()))
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        value = _reduced(getattr(model, name), tagged, inner, folders)
        if not field.is_required() and value == _reduced(default, tagged, inner, folders):
            continue
        if name in by_content and folders is not None and isinstance(value, str):
            value = folders(value)
        out[name] = value
    for name, value in (model.__pydantic_extra__ or {}).items():  # a model that allows extra keys
        out[name] = _canon(value)
    return out


def _reduced(value: Any, tagged: bool, exclude: frozenset[str], folders: Folders | None = None) -> Any:
    """`_canon(value)`, leaving out the `exclude`d fields when `value` is a model (a nested model's
    non-semantic fields)."""
    if exclude and isinstance(value, BaseModel):
        return {"__model__": type(value).__name__, **_diff(value, exclude, folders)} if tagged else _diff(value, exclude, folders)
    return _canon(value, tagged, folders)


def _canon(value: Any, tagged: bool = False, folders: Folders | None = None) -> Any:
    """A JSON-ready value in which every pydantic model is reduced to its non-default fields.
    `tagged`: the field admits several model classes (a union), so each model also keeps its
    class name; otherwise two all-default members of the union would fingerprint alike."""
    if isinstance(value, BaseModel):
        return {"__model__": type(value).__name__, **_diff(value, folders=folders)} if tagged else _diff(value, folders=folders)
    if isinstance(value, dict):
        return {str(k): _canon(v, tagged, folders) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canon(v, tagged, folders) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_canon(v, tagged, folders) for v in value), key=repr)
    return to_jsonable_python(value)


def default_paths(model_cls: type[BaseModel], prefix: str = "", _seen: frozenset[type] = frozenset()) -> dict[str, Any]:
    """Every default reachable from `model_cls`, by dotted path (`lora.r`, `sampling.top_p`):
    the field's own default (models reduced as in the fingerprint) and, for fields typed as
    pydantic models (also inside lists, dicts, unions and Optional), their classes' defaults.
    Required fields map to "<required>". Used to detect a default that changed."""
    out: dict[str, Any] = {}
    for name, field in model_cls.model_fields.items():
        path = f"{prefix}{name}"
        classes = _model_classes(field.annotation)
        if field.is_required():
            out[path] = "<required>"
        else:
            out[path] = _canon(field.get_default(call_default_factory=True), len(classes) > 1)
        nested = [c for c in classes if c not in _seen]
        for cls in nested:
            sub = f"{path}[{cls.__name__}]." if len(nested) > 1 else f"{path}."
            out.update(default_paths(cls, sub, _seen | {model_cls}))
    return out


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes an annotation mentions (through Optional/Union/list/dict/...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = typing.get_args(annotation)
    if not args and isinstance(annotation, types.GenericAlias):
        args = annotation.__args__
    found: list[type[BaseModel]] = []
    for arg in args:
        for cls in _model_classes(arg):
            if cls not in found:
                found.append(cls)
    return found
