"""Reward-model kinds register themselves; train_reward's choices and blocks come from the
registry; one ObjectiveSpec for combinations and PPO."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from reward_models.base import kinds, trainable_kinds
from reward_models.combine import CombineSettings, ObjectiveSpec

REPO = Path(__file__).resolve().parents[1]


def test_every_kind_module_registers_itself():
    assert {"plove", "followup", "fine_grained"} == set(trainable_kinds())
    assert {"plove", "followup", "fine_grained", "function", "combined", "rules"} <= set(kinds())
    for name, kind in trainable_kinds().items():
        assert kind.settings is not None and callable(kind.train) and kind.summary, name


def test_train_reward_choices_and_blocks_come_from_the_registry():
    from stages.train_reward import TrainRewardConfig

    assert set(TrainRewardConfig.model_fields) >= set(trainable_kinds())
    cfg = TrainRewardConfig(kind="fine_grained", fine_grained={"aspects": ["relevance"]})
    assert cfg.fine_grained.aspects == ["relevance"]
    with pytest.raises(ValidationError, match="fine_grained|followup|plove"):
        TrainRewardConfig(kind="nope")
    with pytest.raises(ValidationError, match="'plove' settings given but kind is 'followup'"):
        TrainRewardConfig(kind="followup", plove={"bins": 5})


def test_one_objective_spec():
    assert ObjectiveSpec(input="reward_model").label == "reward_model"
    assert ObjectiveSpec(rule={"rule": "prompt_overlap", "value": 0.0}).label == "prompt_overlap"
    assert ObjectiveSpec(path="rm", name="love").normalize is None  # the combination decides
    with pytest.raises(ValidationError, match="exactly one of path, input or rule"):
        ObjectiveSpec(path="rm", input="reward_model")
    with pytest.raises(ValidationError, match="exactly one"):
        ObjectiveSpec(weight=2.0)
    assert CombineSettings(objectives=[{"path": "rm"}]).objectives[0].weight == 1.0


def test_ppo_objectives_keep_their_yaml_keys():
    from pipeline.config import load_pipeline
    from stages.ppo import PpoStageConfig

    cfg = PpoStageConfig(
        objectives=[
            {"name": "relevance", "input": "reward_model"},
            {"rule": {"rule": "prompt_overlap", "value": 0.0}, "weight": 0.5, "normalize": True},
        ]
    )
    assert [o.label for o in cfg.objectives] == ["relevance", "prompt_overlap"]
    with pytest.raises(ValidationError, match="not a `path`"):
        PpoStageConfig(objectives=[{"path": "runs/x/rm"}])
    pipeline = load_pipeline(REPO / "configs" / "ppo_relevance.yaml")
    assert [s.name for s in pipeline.stages] == ["relevance", "rl"]
