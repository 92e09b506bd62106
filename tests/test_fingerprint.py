"""Fingerprints hash a config's non-default fields: adding a defaulted field (top level or
in a nested model) leaves them alone; any value that differs from its default changes them."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import pipeline_from_dict
from pipeline.fingerprint import default_paths, semantic_config
from pipeline.generation import SamplingSettings
from pipeline.models import LoraSettings
from pipeline.runner import fingerprints
from stages.dpo import DpoStageConfig
from stages.generate import GenerateConfig

from .conftest import tiny_pipeline


class LoraWithNewKnob(LoraSettings):
    rank_pattern: dict[str, int] | None = None  # a field added to a nested model in a later version


class DpoWithNewFields(DpoStageConfig):
    """The dpo config as a later version might define it: two more defaulted fields."""

    new_alpha: float | None = Field(default=None)
    new_flag: bool = False
    lora: LoraWithNewKnob = Field(default_factory=LoraWithNewKnob)


class SamplingWithNewKnob(SamplingSettings):
    min_p: float | None = None


class GenerateWithNewSampling(GenerateConfig):
    sampling: SamplingWithNewKnob = Field(default_factory=SamplingWithNewKnob)


def _pipeline(tmp_path, **overrides):
    return pipeline_from_dict(tiny_pipeline(**overrides), tmp_path)


def _swap(pipeline, stage: str, cls: type[BaseModel], **update: Any) -> dict[str, str]:
    """Fingerprints after replacing `stage`'s config by `cls` with the same values (+ `update`)."""
    resolved = pipeline.stage(stage)
    old = resolved.config
    values = {name: getattr(old, name) for name in type(old).model_fields}
    for name, field in cls.model_fields.items():  # nested models: re-validate into the new classes
        if name in values and isinstance(values[name], BaseModel):
            values[name] = field.annotation.model_validate(values[name].model_dump())  # type: ignore[union-attr]
    resolved.config = cls.model_validate({**values, **update})
    try:
        return fingerprints(pipeline)
    finally:
        resolved.config = old


def test_added_defaulted_fields_leave_fingerprints_unchanged(tmp_path, tiny_model_path):
    pipeline = _pipeline(tmp_path)
    before = fingerprints(pipeline)
    assert _swap(pipeline, "align", DpoWithNewFields) == before
    assert _swap(pipeline, "sample", GenerateWithNewSampling) == before


@pytest.mark.parametrize(
    ("stage", "cls", "update"),
    [
        ("align", DpoWithNewFields, {"new_alpha": 1.0}),
        ("align", DpoWithNewFields, {"new_flag": True}),
        ("align", DpoWithNewFields, {"lora": {"r": 4, "alpha": 8, "rank_pattern": {"q_proj": 2}}}),
        ("sample", GenerateWithNewSampling, {"sampling": {"max_new_tokens": 8, "temperature": 1.0, "min_p": 0.1}}),
    ],
)
def test_new_field_set_to_a_non_default_changes_the_stage_and_its_dependents(tmp_path, tiny_model_path, stage, cls, update):
    pipeline = _pipeline(tmp_path)
    before = fingerprints(pipeline)
    after = _swap(pipeline, stage, cls, **update)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {stage} | pipeline.downstream(stage)


def _altered(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "-x"
    if value is None:
        return 7
    if isinstance(value, list):
        return [*value, "x"]
    if isinstance(value, dict):
        return {**value, "x": 1}
    raise AssertionError(f"no alteration for {value!r}")


def _with(config: BaseModel, path: str, value: Any) -> BaseModel:
    head, _, rest = path.partition(".")
    if rest:
        return config.model_copy(update={head: _with(getattr(config, head), rest, value)})
    return config.model_copy(update={head: value})


@pytest.mark.parametrize("cls", [DpoStageConfig, GenerateConfig])
def test_changing_any_existing_field_changes_the_fingerprinted_config(cls):
    base = cls()
    seen = {repr(semantic_config(base))}
    for path, default in default_paths(cls).items():
        if isinstance(default, dict) and default == {} and any(p.startswith(path + ".") for p in default_paths(cls)):
            continue  # a nested model: its fields are checked one by one
        changed = semantic_config(_with(base, path, _altered(default)))
        assert repr(changed) not in seen, path
        seen.add(repr(changed))


def test_a_default_spelled_out_is_the_same_config(tmp_path, tiny_model_path):
    plain = fingerprints(_pipeline(tmp_path))
    spelled = fingerprints(
        _pipeline(tmp_path, align={"beta": 0.1, "rpo_alpha": None, "lora": {"r": 4, "alpha": 8, "qlora": False}})
    )
    assert spelled == plain


def test_only_non_default_fields_are_hashed_and_non_semantic_ones_never():
    config = DpoStageConfig(beta=0.2, logging_steps=7, lora=LoraSettings(r=4))
    assert semantic_config(config, exclude={"logging_steps"}) == {"beta": 0.2, "lora": {"r": 4}}


class _Exact(BaseModel):
    kind: Literal["exact"] = "exact"


class _Fuzzy(BaseModel):
    kind: Literal["fuzzy"] = "fuzzy"


class _Rules(BaseModel):
    rule: _Exact | _Fuzzy | None = None
    rules: list[_Exact | _Fuzzy] = Field(default_factory=list)


def test_all_default_members_of_a_union_do_not_fingerprint_alike():
    assert semantic_config(_Rules(rule=_Exact())) != semantic_config(_Rules(rule=_Fuzzy()))
    assert semantic_config(_Rules(rules=[_Exact()])) != semantic_config(_Rules(rules=[_Fuzzy()]))
    assert semantic_config(_Rules()) == {}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")
    known: int = 1


def test_extra_keys_of_an_open_model_are_fingerprinted():
    assert semantic_config(_Open.model_validate({"known": 1, "other": 2})) == {"other": 2}


def test_a_nested_non_semantic_field_is_left_out_of_the_fingerprint():
    """c3po's built-in evaluation may write its replies with another engine without retraining (as
    evaluate_feedback's `engine`), while what it measures still counts."""
    from stages.c3po import C3poConfig, C3poStage

    exclude = C3poStage.non_semantic_fields
    assert "evaluation.engine" in exclude
    base = semantic_config(C3poConfig(), exclude)
    assert semantic_config(C3poConfig(evaluation={"engine": "hf"}), exclude) == base == {}
    changed = semantic_config(C3poConfig(evaluation={"engine": "hf", "max_prompts_per_scope": 5}), exclude)
    assert changed == {"evaluation": {"max_prompts_per_scope": 5}}
    assert semantic_config(C3poConfig(evaluation={"engine": "hf"})) == {"evaluation": {"engine": "hf"}}  # without the exclusion


def test_a_batch_size_that_seeds_sampled_batches_is_fingerprinted():
    """HF generate seeds each batch (seed + b): replies sampled at a temperature change with the batch
    size, so c3po_data's baselines (v5), evaluate_feedback's replies (v2) and c3po's built-in
    evaluation (v3) are another run with another `batch_size`; the device and the engine are not."""
    from stages.c3po import C3poConfig, C3poStage
    from stages.c3po_data import C3poDataConfig, C3poDataStage
    from stages.evaluate_feedback import EvaluateFeedbackConfig, EvaluateFeedbackStage

    exclude = C3poStage.non_semantic_fields
    assert semantic_config(C3poConfig(evaluation={"batch_size": 2}), exclude) == {"evaluation": {"batch_size": 2}}
    for config, stage in ((C3poDataConfig, C3poDataStage), (EvaluateFeedbackConfig, EvaluateFeedbackStage)):
        exclude = stage.non_semantic_fields
        assert semantic_config(config(batch_size=2), exclude) == {"batch_size": 2}, stage.uses
        assert semantic_config(config(device="cpu", engine="hf"), exclude) == semantic_config(config(), exclude) == {}


def test_evaluate_batch_size_is_fingerprinted_and_its_device_is_not():
    """The evaluate stage's simulated users seed each HF batch (seed + b), as the simulate stage's do:
    another `batch_size` samples other turns, so a run with it is not the same run (evaluate v9);
    the device and the engine still are how, not what."""
    from stages.evaluate import EvaluateConfig, EvaluateStage

    exclude = EvaluateStage.non_semantic_fields
    assert semantic_config(EvaluateConfig(batch_size=1), exclude) == {"batch_size": 1}
    assert semantic_config(EvaluateConfig(device="cpu", engine="hf"), exclude) == semantic_config(EvaluateConfig(), exclude) == {}


def test_every_nested_non_semantic_path_names_a_field():
    """A misspelled dotted path would silently fingerprint the field it meant to leave out."""
    from pydantic import BaseModel

    from pipeline import registry

    for name in registry.names():
        cls = registry.get(name)
        for path in cls.non_semantic_fields:
            model: type[BaseModel] = cls.Config
            *heads, last = path.split(".")
            for head in heads:
                annotation = model.model_fields[head].annotation
                assert isinstance(annotation, type) and issubclass(annotation, BaseModel), f"{name}: {path}"
                model = annotation
            if heads:
                assert last in model.model_fields, f"{name}: {path}"


def test_where_a_credential_is_read_is_not_fingerprinted():
    """An API key or admin token file says who may call a server, not what a stage computes; read
    beside the config, its path is absolute, so fingerprinting it would rerun every stage of a moved
    checkout. The model, the server and the rest still count."""
    from feedback.argilla_client import ArgillaConnection
    from pipeline.fingerprint import semantic_config
    from pipeline.llm import LLMSettings
    from stages.deploy import DeployConfig
    from stages.serve_pull import ServePullConfig

    def llm(key, model="served"):
        return semantic_config(LLMSettings(kind="openai", model=model, base_url="http://127.0.0.1:9/v1", api_key_file=key))

    assert llm("/one/checkout/key") == llm("/another/checkout/key") != llm("/one/checkout/key", model="other")
    for cls in (DeployConfig, ServePullConfig):
        assert semantic_config(cls(url="http://a", token_file="/x/t")) == semantic_config(cls(url="http://a", token_file="/y/t"))
        assert semantic_config(cls(url="http://a")) != semantic_config(cls(url="http://b"))
    assert semantic_config(ArgillaConnection(api_key_file="/x/k")) == semantic_config(ArgillaConnection())
