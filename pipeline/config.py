"""Pipeline YAML -> validated, resolved pipeline. Every problem is found before anything runs.

Errors name the file, the line, the key path and what was expected, e.g.
`configs/q.yaml:14: stages[2].with.beta: Input should be a valid number (got 'high')`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import registry
from .errors import ConfigError, Problem
from .models import CONFIG_DIR, check_model_name, local_model
from .paths import config_relative, resolve_data_ref
from .stage import Stage, StageConfig
from .yaml_source import KeyPath, YamlSource

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"


class ResourceSpec(BaseModel):
    """Ray resources for one stage. `num_cpus` defaults to the stage type's own default."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float | None = Field(default=None, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)


class RaySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0)


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    uses: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    inputs: dict[str, str] = Field(default_factory=dict)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    model: str | None = None


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    run_name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: str = "smollm2-135m"
    seed: int = 0
    ray: RaySpec = Field(default_factory=RaySpec)
    stages: list[StageSpec] = Field(min_length=1)


@dataclass
class InputRef:
    """Where an input comes from: an upstream stage output or a file/folder."""

    raw: str
    stage: str | None = None
    output: str | None = None
    path: Path | None = None


@dataclass
class ResolvedStage:
    spec: StageSpec
    cls: type[Stage]
    config: StageConfig
    inputs: dict[str, InputRef]
    model: str
    index: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def deps(self) -> list[str]:
        return sorted({ref.stage for ref in self.inputs.values() if ref.stage})

    @property
    def num_cpus(self) -> float:
        return self.spec.resources.num_cpus or self.cls.default_num_cpus


@dataclass
class Pipeline:
    config: PipelineConfig
    source: Path | None
    stages: list[ResolvedStage] = field(default_factory=list)

    def stage(self, name: str) -> ResolvedStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def downstream(self, name: str) -> set[str]:
        """Every stage that (transitively) consumes `name`'s outputs."""
        out: set[str] = set()
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for stage in self.stages:
                if current in stage.deps and stage.name not in out:
                    out.add(stage.name)
                    frontier.append(stage.name)
        return out


# ----------------------------------------------------------------------------- overrides


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """`stages.align.with.max_steps=2` or `model=tiny`: stage lists are addressed by name.

    VALUE is read as YAML (`3` is an int, `[a, b]` a list). A value YAML cannot read, or a
    dotted key through a value that is not a mapping (`model.x=1` where `model` is a name),
    is a ConfigError naming the `--set` argument rather than a YAML or Python traceback.
    """
    if "=" not in assignment:
        raise ConfigError([Problem("--set", None, assignment, "expected KEY=VALUE")])
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        hint = f"""for text, quote it for YAML too: --set '{key}="..."'"""
        raise ConfigError([Problem("--set", None, assignment, f"the value is not valid YAML ({reason}); {hint}")]) from None
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
            if not match:
                raise ConfigError([Problem("--set", None, key, f"no stage named '{part}'")])
            node = match[0]
        else:
            node = node.setdefault(part, {} if parts[i + 1] != "stages" else [])
        if not isinstance(node, (dict, list)):
            at = ".".join(parts[: i + 1])
            raise ConfigError([Problem("--set", None, assignment, f"'{at}' is {node!r}, not a mapping: cannot set '{key}'")])
    if isinstance(node, list):
        raise ConfigError([Problem("--set", None, key, "cannot assign a whole stage")])
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- loading


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    source = YamlSource.load(path)
    return build_pipeline(source, Path(path).resolve().parent, overrides or [], Path(path))


def pipeline_from_dict(data: dict[str, Any], base_dir: Path, file: str = "<pipeline>") -> Pipeline:
    """Build from an in-memory dict (used by `heedful stage` and tests)."""
    source = YamlSource(data, {}, file)
    return build_pipeline(source, base_dir, [], None)


def build_pipeline(source: YamlSource, base_dir: Path, overrides: list[str], path: Path | None) -> Pipeline:
    data = source.data
    if not isinstance(data, dict):
        raise ConfigError([source.problem((), "expected a mapping with run_name, model and stages")])
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(source, (), exc, PipelineConfig)) from None

    problems: list[Problem] = []
    if (msg := check_model_name(config.model, base_dir)) is not None:
        problems.append(source.problem(("model",), msg))

    seen: dict[str, int] = {}
    for i, spec in enumerate(config.stages):
        if spec.name in seen:
            problems.append(
                source.problem(("stages", i, "name"), f"duplicate stage name '{spec.name}' (first at stages[{seen[spec.name]}])")
            )
        seen.setdefault(spec.name, i)

    resolved: list[ResolvedStage] = []
    classes: dict[str, type[Stage]] = {}
    for i, spec in enumerate(config.stages):
        cls = registry.get(spec.uses)
        if cls is None:
            known = registry.names()
            hint = difflib.get_close_matches(spec.uses, known, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            problems.append(
                source.problem(
                    ("stages", i, "uses"), f"unknown stage type '{spec.uses}'{extra}: expected one of {', '.join(known)}"
                )
            )
            continue
        classes[spec.name] = cls

    for i, spec in enumerate(config.stages):
        cls = classes.get(spec.name)
        if cls is None:
            continue
        at = ("stages", i)
        try:
            # every path the settings name (an adapter, a key file, a cache: paths.ConfigPath) and every model (a
            # simulator's, a judge's: models.config_model, checked here) is read against this folder too
            stage_config = cls.Config.model_validate(spec.with_, context={CONFIG_DIR: base_dir})
        except ValidationError as exc:
            problems.extend(_pydantic_problems(source, at + ("with",), exc, cls.Config))
            stage_config = None
        model = local_model(spec.model or config.model, base_dir)
        if spec.model is not None and (msg := check_model_name(spec.model, base_dir)) is not None:
            problems.append(source.problem(at + ("model",), msg))
        inputs = _resolve_inputs(source, at, spec, cls, classes, seen, base_dir, problems)
        if stage_config is not None:
            resolved.append(ResolvedStage(spec, cls, stage_config, inputs, model, i))

    if not problems:
        ordered, cycle = _topological(resolved)
        if cycle:
            problems.append(source.problem(("stages",), f"stages form a cycle: {' -> '.join(cycle)}"))
        resolved = ordered
    if problems:
        raise ConfigError(problems)
    return Pipeline(config, path, resolved)


def _resolve_inputs(
    source, at: KeyPath, spec: StageSpec, cls: type[Stage], classes, seen, base_dir: Path, problems
) -> dict[str, InputRef]:
    refs: dict[str, InputRef] = {}
    for input_name, raw in spec.inputs.items():
        where = at + ("inputs", input_name)
        declared = cls.inputs.get(input_name)
        if declared is None:
            expected = ", ".join(cls.inputs) or "none"
            problems.append(
                source.problem(where, f"unknown input '{input_name}' for stage type '{cls.uses}': expected one of {expected}")
            )
            continue
        ref = _parse_ref(raw, set(seen), base_dir)
        if ref.stage is not None:
            upstream = classes.get(ref.stage)
            if ref.stage == spec.name:
                problems.append(source.problem(where, "a stage cannot consume its own output"))
            elif upstream is None:
                continue  # its own `uses` error is already reported
            elif ref.output not in upstream.outputs:
                outs = ", ".join(upstream.outputs) or "none"
                problems.append(
                    source.problem(
                        where, f"stage '{ref.stage}' ({upstream.uses}) has no output '{ref.output}': its outputs are {outs}"
                    )
                )
            elif upstream.outputs[ref.output].kind not in declared.kinds:
                kind = upstream.outputs[ref.output].kind
                problems.append(
                    source.problem(
                        where,
                        f"'{raw}' is a {kind} artifact; input '{input_name}' of {cls.uses} expects {' or '.join(declared.kinds)}",
                    )
                )
        elif ref.path is not None and not ref.path.exists():
            problems.append(
                source.problem(
                    where, f"file not found: {ref.path} (a stage output is written as STAGE.OUTPUT, a shipped file as data:PATH)"
                )
            )
        refs[input_name] = ref
    for input_name, declared in cls.inputs.items():
        if declared.required and input_name not in spec.inputs:
            problems.append(
                source.problem(
                    at + ("inputs",),
                    f"missing required input '{input_name}' ({' or '.join(declared.kinds)}) for stage type '{cls.uses}'",
                )
            )
    return refs


def _parse_ref(raw: str, stage_names: set[str], base_dir: Path) -> InputRef:
    if raw.startswith("data:"):
        return InputRef(raw, path=resolve_data_ref(raw))
    head, dot, tail = raw.partition(".")
    if dot and "/" not in raw and head in stage_names:
        return InputRef(raw, stage=head, output=tail)
    return InputRef(raw, path=Path(config_relative(raw, base_dir)))


def _topological(stages: list[ResolvedStage]) -> tuple[list[ResolvedStage], list[str] | None]:
    by_name = {s.name: s for s in stages}
    order: list[ResolvedStage] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        if state.get(name) == 2:
            return None
        if state.get(name) == 1:
            return stack[stack.index(name) :] + [name]
        state[name] = 1
        stack.append(name)
        for dep in by_name[name].deps:
            if dep in by_name and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[name] = 2
        order.append(by_name[name])
        return None

    for stage in stages:
        if cycle := visit(stage.name):
            return stages, cycle
    return order, None


def _pydantic_problems(source: YamlSource, prefix: KeyPath, exc: ValidationError, model: type[BaseModel]) -> list[Problem]:
    problems = []
    for err in exc.errors():
        rel = tuple(("with" if p == "with_" else p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            known = _field_names(model, rel[:-1])
            msg = "unknown key" + (f": expected one of {', '.join(known)}" if known else "")
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        problems.append(source.problem(tuple(prefix) + rel, msg))
    return problems


def _field_names(model: type[BaseModel], path: KeyPath) -> list[str]:
    """Field names of the (nested) pydantic model at `path`, for 'expected one of' hints."""
    node: type[BaseModel] = model
    for part in path:
        if isinstance(part, int):
            continue
        info = node.model_fields.get("with_" if part == "with" else part)
        if info is None:
            return []
        candidates = (info.annotation, *getattr(info.annotation, "__args__", ()))
        for arg in list(candidates):
            candidates += tuple(getattr(arg, "__args__", ()))
        inner = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if inner is None:
            return []
        node = inner
    return [f.alias or n for n, f in node.model_fields.items()]
